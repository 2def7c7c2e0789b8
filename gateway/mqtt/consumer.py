"""A persistent MQTT 5 session that acknowledges a message only when told to.

Ingest must not PUBACK a message before it is durable, so this session hands
each PUBLISH to ``on_publish`` and sends PUBACKs only from ``ack``, all of a
batch in one write. It keeps the session (clean start off, session expiry),
pings, reconnects with backoff and, after a reconnect, lets the broker
redeliver what was not acknowledged. Acks are tagged with the connection
epoch: an ack for a packet id of a closed connection is never sent on a new one.

Whatever goes wrong in one connection (refused, closed mid-handshake, a
protocol error, a bug) ends that connection only: the next attempt is a fresh
one after a backoff. A session the broker should still hold but does not
(CONNACK without session present) and a DISCONNECT "session taken over" are
incidents: messages queued for the session may be gone, so they are logged
as errors, counted and handed to ``on_incident``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from gateway import metrics
from gateway.mqtt.codec import (
    DISCONNECT,
    PINGREQ,
    ConnAck,
    Disconnect,
    MqttProtocolError,
    Packet,
    PubAck,
    Publish,
    SubAck,
    encode_connect,
    encode_pubacks,
    encode_subscribe,
    read_packets,
)
from gateway.mqtt.outbound import Outbound
from gateway.restarting import run_forever

log = logging.getLogger(__name__)

CONNACK_REASONS = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x8A: "banned",
}
SESSION_TAKEN_OVER = 0x8E


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


@dataclass(frozen=True, slots=True)
class SessionIncident:
    """The broker lost the session or gave it to another connection."""

    kind: Literal["session_lost", "taken_over"]
    client_id: str
    detail: str


OnPublish = Callable[[int, Publish], None]
OnIncident = Callable[[SessionIncident], None]


def _writer(transport: asyncio.Transport) -> Callable[[bytes], None]:
    """Writes to this connection only while it is open; what it drops is sent again."""

    def write(data: bytes) -> None:
        if not transport.is_closing():
            transport.write(data)

    return write


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
        on_incident: OnIncident | None = None,
        expected_session: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.filters = filters
        self.on_publish = on_publish
        self.on_incident = on_incident
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        # why the broker should hold our session at the next CONNACK (None: no reason to)
        self.expected_session = expected_session
        self.epoch = 0
        self.connected = asyncio.Event()
        self.session_up = asyncio.Event()  # set at each new session; its reader clears it
        self.connects = 0
        self._proto: _Protocol | None = None
        self._waiters: dict[type, asyncio.Future[Packet]] = {}
        self._paused = False
        self._disconnect_reason: int | None = None
        # the server's own QoS 1 publishes (the device downlink) on this session
        self.outbound = Outbound()

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

    def publish(self, topic: str, payload: bytes, key: Hashable) -> asyncio.Future[int]:
        """QoS 1 on this session; settles with the PUBACK's reason code (``Outbound``)."""
        return self.outbound.publish(topic, payload, key)

    def pause(self) -> None:
        """Stop reading (TCP back-pressure) while the store is behind."""
        proto = self._proto
        if self._paused or proto is None or proto.transport is None:
            return
        if not proto.transport.is_closing():
            proto.transport.pause_reading()
            self._paused = True

    def resume(self) -> None:
        proto = self._proto
        transport = proto.transport if proto is not None else None
        if self._paused and transport is not None and not transport.is_closing():
            transport.resume_reading()
        self._paused = False

    # -- session ------------------------------------------------------------------
    def _on_control(self, packet: Packet) -> None:
        if type(packet) is PubAck:
            self.outbound.acked(packet)
            return
        waiter = self._waiters.pop(type(packet), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(packet)
        elif isinstance(packet, Disconnect):
            self._disconnect_reason = packet.reason_code
            if packet.reason_code != SESSION_TAKEN_OVER:
                log.warning("broker sent DISCONNECT (reason 0x%02x)", packet.reason_code)

    async def _expect(self, kind: type, proto: _Protocol, within_s: float) -> Packet:
        """The next packet of ``kind``; fails as soon as the connection is lost."""
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        self._waiters[kind] = fut
        either: list[asyncio.Future[Any]] = [fut, proto.lost]
        await asyncio.wait(either, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        if proto.lost.done():
            raise ConnectionError(
                f"connection closed while waiting for {kind.__name__}: {proto.lost.result()}"
            )
        raise TimeoutError(f"no {kind.__name__} within {within_s} s")

    def _incident(self, kind: Literal["session_lost", "taken_over"], detail: str) -> None:
        log.error("mqtt session incident (%s) for %s: %s", kind, self.client_id, detail)
        metrics.MQTT_SESSIONS_LOST.labels(kind).inc()
        if self.on_incident is not None:
            self.on_incident(SessionIncident(kind, self.client_id, detail))

    def _check_session(self, session_present: bool) -> None:
        if not session_present and self.expected_session is not None:
            self._incident(
                "session_lost",
                f"the broker has no session although {self.expected_session}; messages"
                " queued for it since are lost",
            )
        self.expected_session = f"this process had it at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        # A new epoch before the new connection exists: from here on every ack
        # of the previous connection is refused, whenever it comes.
        self.epoch += 1
        self._proto = None
        self._disconnect_reason = None
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(self), ep.host, ep.port), 10
        )
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
            connack = cast(ConnAck, await self._expect(ConnAck, proto, 10))
            if connack.reason_code != 0:
                raise MqttConnectError(connack.reason_code)
            self._check_session(connack.session_present)
            if transport.is_closing():
                raise ConnectionError("connection closed right after CONNACK")
            transport.write(encode_subscribe(1, [(f, 1) for f in self.filters]))
            suback = cast(SubAck, await self._expect(SubAck, proto, 10))
            refused = [
                f for f, rc in zip(self.filters, suback.reason_codes, strict=False) if rc >= 0x80
            ]
            if refused:
                raise MqttConnectError(0x87)
            self.connects += 1
            self.connected.set()
            self.outbound.attach(_writer(transport), connack.session_present)
            self.session_up.set()
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
                if transport.is_closing():
                    break
                transport.write(PINGREQ)
            exc = proto.lost.result() if proto.lost.done() else None
            if exc is not None:
                log.warning("mqtt connection lost: %s", exc)
            elif self._disconnect_reason is None:
                log.warning("mqtt connection closed by the broker")
        finally:
            if self._disconnect_reason == SESSION_TAKEN_OVER:  # in the handshake too
                self._incident(
                    "taken_over",
                    "another connection with this account took the session over (DISCONNECT"
                    " 0x8E); messages delivered to it are not ours to store",
                )
            self.connected.clear()
            self.outbound.detach()
            self._waiters.clear()
            if not transport.is_closing():
                transport.close()

    async def run(self) -> None:
        """Keep the session up until cancelled; no failure of one connection ends it."""
        await run_forever(
            "mqtt session",
            self._session,
            log=log,
            transient=(OSError, TimeoutError, MqttConnectError),
        )

    async def close(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(DISCONNECT)
            proto.transport.close()
