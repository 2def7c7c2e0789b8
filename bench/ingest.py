"""Ingest drain rate against a bare paho subscriber, measured on the same broker in one run.

For each workload a backlog is loaded into the broker for a persistent session
that is offline, then the session connects and drains it:
  * baseline: a bare paho subscriber (MQTT 5, QoS 1) that only counts;
  * eldersafe: the server's ingest pipeline (the same code ``eldersafe server``
    runs) validating every message and writing TimescaleDB, acknowledging each
    message only after its batch committed.
Workloads: 200,000 single-reading telemetry messages; 20,000 messages that
carry 50 readings each (rows/s). Run: ``make bench`` or ``python bench/ingest.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SERVER, SITE, load, services

from gateway.db.migrate import migrate
from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import IngestStore
from gateway.mqtt.consumer import MqttConsumer, MqttEndpoint

DEVICES = 2000
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def make_messages(count: int, readings: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        device = i % DEVICES
        when = (T0 + timedelta(seconds=i // DEVICES)).isoformat()
        items = ",".join(
            f'{{"metric":"m{r}","value":{(i * 7 + r) % 1000 / 10},"unit":"u"}}'
            for r in range(readings)
        )
        payload = f'{{"v":1,"time":"{when}","readings":[{items}]}}'.encode()
        out.append((f"eldersafe/v1/{SITE}/dev-{device}/telemetry", payload))
    return out


def paho_drain(port: int, messages: list[tuple[str, bytes]], client_id: str) -> float:
    """Seconds for a bare paho subscriber to drain the backlog (counting only)."""
    props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    done = threading.Event()
    count = 0
    total = len(messages)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count >= total:
            done.set()

    def client(on_msg: bool) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(*SERVER)
        if on_msg:
            c.on_message = on_message
        return c

    # create the persistent session and its subscription, then go offline
    c = client(False)
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    c.subscribe(f"eldersafe/v1/{SITE}/+/telemetry", qos=1)[1]
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()
    asyncio.run(load(port, messages))
    c = client(True)
    started = time.perf_counter()
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"paho drained only {count} of {total}")
    elapsed = time.perf_counter() - started
    c.disconnect()
    c.loop_stop()
    return elapsed


async def _ingest_drain(
    port: int, dsn: str, messages: list[tuple[str, bytes]], client_id: str
) -> float:
    store = IngestStore(dsn)
    pipeline = IngestPipeline(store)
    consumer = MqttConsumer(
        MqttEndpoint("127.0.0.1", port, *SERVER),
        client_id=client_id,
        filters=[f"eldersafe/v1/{SITE}/+/telemetry"],
        on_publish=pipeline.on_publish,
        session_expiry_s=3600,
    )
    pipeline.attach(consumer)
    # create the session, go offline, load, then measure the drain
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(consumer.connected.wait(), 10)
    await consumer.close()
    task.cancel()
    await load(port, messages)
    total = len(messages)
    writer = asyncio.create_task(pipeline.run())
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    while pipeline.acked < total:  # noqa: ASYNC110 - polling a counter is the measurement
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    writer.cancel()
    await consumer.close()
    task.cancel()
    await store.close()
    return elapsed


def rows_in(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        conn.execute("TRUNCATE telemetry")
        conn.commit()
    return int(row[0]) if row else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batched-messages", type=int, default=20_000)
    args = parser.parse_args()
    results = []
    with services() as (broker, pg):
        assert pg is not None
        migrate(pg.dsn)
        for name, count, readings in [
            ("single reading", args.messages, 1),
            ("50 readings", args.batched_messages, 50),
        ]:
            messages = make_messages(count, readings)
            base = paho_drain(broker.port, messages, f"paho-{readings}")
            ours = uvloop.run(_ingest_drain(broker.port, pg.dsn, messages, f"ingest-{readings}"))
            stored = rows_in(pg.dsn)
            assert stored == count * readings, f"{stored} rows stored, expected {count * readings}"
            results.append((name, count, readings, base, ours))
    print(
        f"\n{'workload':16} {'messages':>9} {'paho msg/s':>11} {'ingest msg/s':>13} "
        f"{'ingest rows/s':>14} {'ratio':>6}"
    )
    for name, count, readings, base, ours in results:
        print(
            f"{name:16} {count:9d} {count / base:11.0f} {count / ours:13.0f} "
            f"{count * readings / ours:14.0f} {base / ours:6.2f}"
        )
    print(
        "\nratio = ingest drain rate / bare paho drain rate (messages); every row verified in the"
        " database; ingest acknowledged each message only after its batch committed."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
