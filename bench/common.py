"""Shared bench plumbing: private broker and database, a fast QoS 1 loader."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.broker_auth import BrokerAccount, hash_password
from gateway.local.mosquitto import MosquittoInstance
from gateway.local.postgres import PostgresInstance
from gateway.mqtt.codec import ConnAck, PubAck, encode_connect, encode_publish, read_packets

SERVER = ("server", "bench-server-secret")
PAHO = ("bench-paho", "bench-paho-secret")  # the baseline subscriber's own account (session)
LOADER = ("gw-bench", "bench-gateway-secret")
SITE = "bench"


@contextmanager
def services(
    with_database: bool = True,
) -> Iterator[tuple[MosquittoInstance, PostgresInstance | None]]:
    root = Path(tempfile.mkdtemp(prefix="eldersafe-bench-"))
    root.chmod(0o755)
    broker = MosquittoInstance(root / "mqtt", max_queued_messages=5_000_000)
    broker.configure(
        [
            BrokerAccount(SERVER[0], hash_password(SERVER[1]), None),
            BrokerAccount(PAHO[0], hash_password(PAHO[1]), None),
            BrokerAccount(LOADER[0], hash_password(LOADER[1]), SITE),
        ]
    )
    broker.start()
    pg = None
    if with_database:
        pg = PostgresInstance(root / "pg")
        pg.init()
        pg.start()
    try:
        yield broker, pg
    finally:
        broker.stop()
        if pg is not None:
            pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def load(port: int, messages: list[tuple[str, bytes]], window: int = 20_000) -> None:
    """Publish QoS 1 as fast as the broker acknowledges, keeping ``window`` in flight."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        encode_connect("bench-loader", username=LOADER[0], password=LOADER[1], clean_start=True)
    )
    buf = bytearray()
    acked = 0
    sent = 0

    async def read_some() -> list[object]:
        data = await reader.read(1 << 20)
        if not data:
            raise ConnectionError("broker closed the loader's connection")
        buf.extend(data)
        packets, used = read_packets(buf)
        del buf[:used]
        return list(packets)

    packets = await read_some()
    assert packets and isinstance(packets[0], ConnAck) and packets[0].reason_code == 0, packets
    total = len(messages)
    while acked < total:
        chunk = []
        while sent < total and sent - acked < window:
            topic, payload = messages[sent]
            chunk.append(encode_publish(topic, payload, qos=1, packet_id=sent % 65535 + 1))
            sent += 1
        if chunk:
            writer.write(b"".join(chunk))
            await writer.drain()
        for p in await read_some():
            if isinstance(p, PubAck):
                if p.reason_code >= 0x80:
                    raise RuntimeError(f"broker refused a publish: 0x{p.reason_code:02x}")
                acked += 1
    writer.close()
