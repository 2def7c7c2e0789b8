"""paho-mqtt wrapped once for asyncio: ``async with`` to run, awaitable PUBACKs, ``async for``.

paho runs its network loop on its own thread; its callbacks do nothing but hand
results to the event loop (``call_soon_threadsafe``), where futures are settled
and queues filled. The rest of the edge never sees paho.

* ``publish`` returns when the message is handed over; ``await`` the returned
  future for the broker's PUBACK (or a ``PublishError`` carrying the MQTT 5
  reason, e.g. an ACL refusal, which MQTT 3.1.1 would hide).
* Unacknowledged QoS 1 messages survive a reconnect: paho re-sends them (DUP)
  on the next connection and their futures settle then.
* At most ``max_outstanding`` QoS>0 messages are outstanding at once (a
  semaphore): paho's packet ids are 16 bits and are taken at ``publish`` time,
  so more than 65,535 outstanding would reuse an id and lose a message.
* The last will and an ``on_connect`` hook (the birth message) are set here;
  the session is persistent (clean start off, session expiry) so commands sent
  while the link was down are delivered on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

# PUBACK reasons that will not change by sending the same message again.
PERMANENT_REASONS = frozenset({0x90, 0x95, 0x99})  # topic invalid, too large, payload format


class PublishError(RuntimeError):
    def __init__(self, reason_code: int, reason: str) -> None:
        super().__init__(f"broker refused the message: {reason} ({reason_code:#x})")
        self.reason_code = reason_code
        self.permanent = reason_code in PERMANENT_REASONS


class NotConnected(ConnectionError):
    """A QoS 0 message cannot be sent now (it would be lost silently otherwise)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    max_outstanding: int = 1000
    tls_ca_file: str | None = None
    subscriptions: tuple[tuple[str, int], ...] = field(default_factory=tuple)


class MqttClient:
    """One broker connection for the edge; use as ``async with MqttClient(...) as c``."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        message_queue_size: int = 10_000,
    ) -> None:
        if not 0 < settings.max_outstanding < 65_535:
            raise ValueError("max_outstanding must be in 1..65534 (16-bit packet ids)")
        self.settings = settings
        self.will = will
        self._on_connect_hook = on_connect
        self.connected = asyncio.Event()
        self.connections = 0  # successful CONNACKs so far
        self.last_error = ""
        self._messages: asyncio.Queue[Message] = asyncio.Queue(message_queue_size)
        self.messages_dropped = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._slots = asyncio.Semaphore(settings.max_outstanding)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> MqttClient:
        self._loop = asyncio.get_running_loop()
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls_ca_file:
            client.tls_set(ca_certs=s.tls_ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client.max_inflight_messages_set(min(s.max_outstanding, 1000))
        client.max_queued_messages_set(0)  # our semaphore bounds it; paho must never refuse
        client.reconnect_delay_set(max(1, int(s.reconnect_min_s)), max(1, int(s.reconnect_max_s)))
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_message = self._cb_message
        client.on_connect_fail = self._cb_connect_fail
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry_s
        client.connect_async(
            s.host, s.port, keepalive=s.keepalive_s, clean_start=False, properties=props
        )
        self._client = client
        client.loop_start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._closing = True
        await asyncio.to_thread(self._stop_paho, client)
        self.connected.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("MQTT client closed"))
        self._pending.clear()

    @staticmethod
    def _stop_paho(client: mqtt.Client) -> None:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()

    # -- paho callbacks (paho's thread): only hand over to the loop ----------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop shutting down
                loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._call(self._set_error, f"connect refused: {reason}")
            return
        for topic, qos in self.settings.subscriptions:
            client.subscribe(topic, qos=qos)
        self._call(self._on_up)

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._call(self._set_error, "connect failed")

    def _cb_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._call(self._on_down, str(reason))

    def _cb_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._call(self._settle, mid, reason.value, str(reason))

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._call(self._deliver, Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain))

    # -- on the loop -------------------------------------------------------------------

    def _set_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("mqtt: %s", text)
        self.last_error = text

    def _on_up(self) -> None:
        self.connections += 1
        self.connected.set()
        self.last_error = ""
        log.info("mqtt connected to %s:%s", self.settings.host, self.settings.port)
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _on_down(self, reason: str) -> None:
        if self.connected.is_set():
            log.log(
                logging.INFO if self._closing else logging.WARNING, "mqtt disconnected: %s", reason
            )
        self.connected.clear()
        self.last_error = f"disconnected: {reason}"

    def _settle(self, mid: int, code: int, reason: str) -> None:
        fut = self._pending.pop(mid, None)
        if fut is None:
            return
        self._slots.release()
        if fut.done():
            return
        if code >= 0x80:
            fut.set_exception(PublishError(code, reason))
        else:
            fut.set_result(None)

    def _deliver(self, message: Message) -> None:
        try:
            self._messages.put_nowait(message)
        except asyncio.QueueFull:
            self.messages_dropped += 1
            log.error("mqtt: inbound queue full, dropped message on %s", message.topic)

    # -- API ---------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Hand a message to the connection; the returned future settles on PUBACK.

        QoS 1 messages are kept (and re-sent) across reconnects until acknowledged.
        QoS 0 raises ``NotConnected`` when there is no connection, so the caller
        can count what it could not send.
        """
        client = self._client
        if client is None:
            raise ConnectionError("MQTT client not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if qos == 0:
            if not self.connected.is_set():
                raise NotConnected("not connected")
            info = client.publish(topic, payload, qos=0, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise NotConnected(mqtt.error_string(info.rc))
            fut.set_result(None)
            return fut
        await self._slots.acquire()
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except BaseException:
            self._slots.release()
            raise
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._slots.release()
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        # NO_CONN: paho keeps the message and sends it on the next connection.
        self._pending[info.mid] = fut  # before any yield: _settle runs after this
        return fut

    async def publish_and_wait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await (await self.publish(topic, payload, qos=qos, retain=retain))

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def messages(self) -> AsyncIterator[Message]:
        """Messages on the subscriptions, in arrival order, until cancelled."""
        while True:
            yield await self._messages.get()
