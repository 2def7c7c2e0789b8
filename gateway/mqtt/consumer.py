"""A persistent MQTT 5 session that acknowledges a message only when told to.

Ingest must not PUBACK a message before it is durable, so this session hands
each PUBLISH to ``on_publish`` and sends PUBACKs only from ``ack``, all of a
batch in one write. It keeps the session (clean start off, session expiry),
pings, reconnects with backoff and, after a reconnect, lets the broker
redeliver what was not acknowledged. Acks are tagged with the connection
epoch: an ack for a packet id of a closed connection is never sent on a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from gateway.mqtt.codec import (
    DISCONNECT,
    PINGREQ,
    ConnAck,
    Disconnect,
    MqttProtocolError,
    Packet,
    Publish,
    SubAck,
    encode_connect,
    encode_pubacks,
    encode_subscribe,
    read_packets,
)

log = logging.getLogger(__name__)

CONNACK_REASONS = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x8A: "banned",
}


class MqttConnectError(ConnectionError):
    def __init__(self, reason_code: int) -> None:
        super().__init__(
            f"broker refused the connection: {CONNACK_REASONS.get(reason_code, hex(reason_code))}"
        )
        self.reason_code = reason_code


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


OnPublish = Callable[[int, Publish], None]


class _Protocol(asyncio.Protocol):
    def __init__(self, session: MqttConsumer) -> None:
        self.session = session
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.last_rx = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self.buf
        buf += data
        try:
            packets, used = read_packets(buf)
        except MqttProtocolError as exc:
            log.error("broker sent a malformed packet (%s); reconnecting", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if used:
            del buf[:used]
        on_publish = self.session.on_publish
        epoch = self.session.epoch
        for packet in packets:
            if type(packet) is Publish:
                on_publish(epoch, packet)
            else:
                self.session._on_control(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class MqttConsumer:
    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        client_id: str,
        filters: list[str],
        on_publish: OnPublish,
        keepalive: int = 30,
        session_expiry_s: int = 7 * 24 * 3600,
        receive_maximum: int = 65535,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.filters = filters
        self.on_publish = on_publish
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.epoch = 0
        self.connected = asyncio.Event()
        self.connects = 0
        self._proto: _Protocol | None = None
        self._waiters: dict[type, asyncio.Future[Packet]] = {}
        self._paused = False

    # -- called by the pipeline -------------------------------------------------
    def ack(self, epoch: int, packet_ids: list[int]) -> bool:
        """Send PUBACKs for ``packet_ids`` if their connection is still the current one."""
        proto = self._proto
        if epoch != self.epoch or proto is None or proto.transport is None:
            return False
        if proto.transport.is_closing():
            return False
        if packet_ids:
            proto.transport.write(encode_pubacks(packet_ids))
        return True

    def pause(self) -> None:
        """Stop reading (TCP back-pressure) while the store is behind."""
        proto = self._proto
        if proto is not None and proto.transport is not None and not self._paused:
            proto.transport.pause_reading()
            self._paused = True

    def resume(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None and self._paused:
            proto.transport.resume_reading()
        self._paused = False

    # -- session ------------------------------------------------------------------
    def _on_control(self, packet: Packet) -> None:
        waiter = self._waiters.pop(type(packet), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(packet)
        elif isinstance(packet, Disconnect):
            log.warning("broker sent DISCONNECT (reason 0x%02x)", packet.reason_code)

    async def _expect(self, kind: type, within_s: float) -> Packet:
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        self._waiters[kind] = fut
        return await asyncio.wait_for(fut, within_s)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(self), ep.host, ep.port), 10
        )
        self.epoch += 1
        self._proto = proto
        self._paused = False
        try:
            transport.write(
                encode_connect(
                    self.client_id,
                    username=ep.username,
                    password=ep.password,
                    keepalive=self.keepalive,
                    clean_start=False,
                    session_expiry=self.session_expiry_s,
                    receive_maximum=self.receive_maximum,
                )
            )
            connack = cast(ConnAck, await self._expect(ConnAck, 10))
            if connack.reason_code != 0:
                raise MqttConnectError(connack.reason_code)
            transport.write(encode_subscribe(1, [(f, 1) for f in self.filters]))
            suback = cast(SubAck, await self._expect(SubAck, 10))
            refused = [
                f for f, rc in zip(self.filters, suback.reason_codes, strict=False) if rc >= 0x80
            ]
            if refused:
                raise MqttConnectError(0x87)
            self.connects += 1
            self.connected.set()
            log.info(
                "mqtt session up (%s, session present: %s)", self.client_id, connack.session_present
            )
            interval = max(1.0, self.keepalive / 2)
            while not proto.lost.done():
                await asyncio.wait([proto.lost], timeout=interval)
                if proto.lost.done():
                    break
                if not self._paused and time.monotonic() - proto.last_rx > self.keepalive * 1.5:
                    log.warning("mqtt keep-alive timed out; reconnecting")
                    transport.abort()
                    break
                transport.write(PINGREQ)
            exc = proto.lost.result() if proto.lost.done() else None
            if exc is not None:
                log.warning("mqtt connection lost: %s", exc)
        finally:
            self.connected.clear()
            self._waiters.clear()
            if not transport.is_closing():
                transport.close()

    async def run(self) -> None:
        """Keep the session up until cancelled."""
        backoff = 0.2
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except (OSError, TimeoutError, MqttConnectError) as exc:
                log.warning("mqtt session failed: %s", exc)
            if time.monotonic() - started > 10:
                backoff = 0.2
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(DISCONNECT)
            proto.transport.close()
