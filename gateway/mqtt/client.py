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
* Inbound QoS 1 messages are acknowledged by the application, not by paho
  (``manual_ack``): ``ack(message)`` once the message is durably taken, and
  the PUBACKs leave in arrival order (MQTT 5 §4.6). The broker may have at most
  ``receive_maximum`` unacknowledged PUBLISHes with us (the MQTT 5 Receive
  Maximum sent in CONNECT), so the inbound queue is bounded by the protocol and
  never has to drop one (a broker that sends more anyway, as Mosquitto 2.0.11
  does once PUBACKs flow, is counted, and its messages kept). A PUBACK belongs
  to the connection that delivered the message: after a reconnect the broker
  sends the message again, and the old one is forgotten rather than
  acknowledged on the wrong connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections import Counter, deque
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
    mid: int = 0  # packet id, for the PUBACK (QoS 1)
    link: int = 0  # the connection that delivered it; its PUBACK can only go there


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
    # MQTT 5 Receive Maximum: QoS 1 PUBLISHes the broker may send us before our PUBACKs
    receive_maximum: int = 32
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
        qos0_queue_size: int = 100,
    ) -> None:
        if not 0 < settings.max_outstanding < 65_535:
            raise ValueError("max_outstanding must be in 1..65534 (16-bit packet ids)")
        if not 0 < settings.receive_maximum < 65_536:
            raise ValueError("receive_maximum must be in 1..65535 (MQTT 5)")
        self.settings = settings
        self.will = will
        self._on_connect_hook = on_connect
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()  # every subscription granted on this connection
        self.connections = 0  # successful CONNACKs so far
        self.last_error = ""
        # inbound: QoS 1 bounded by receive_maximum (the broker's promise), QoS 0 by this
        self._inbox: deque[Message] = deque()
        self._inbox_ready = asyncio.Event()
        self._qos0_queue_size = qos0_queue_size
        self.messages_dropped = 0  # QoS 0 only: nothing was promised for them
        self.messages_received = 0
        self.messages_acked = 0  # PUBACKs sent for inbound QoS 1 messages
        self.receive_maximum_exceeded = 0  # the broker sent more than we allowed
        self._exceeded_on_link = 0  # warned for this connection already
        self.max_unacknowledged = 0  # high-water mark of inbound messages awaiting our PUBACK
        # PUBACK order: (link, mid) in arrival order, and which of them are taken
        self._ack_order: deque[tuple[int, int]] = deque()
        self._taken: set[tuple[int, int]] = set()
        # paho-side connection number; bumped on connect and disconnect (paho's thread)
        self._link = 0
        self._link_lock = threading.Lock()
        self._current_link = 0  # the same, as the event loop has seen it
        self.published = 0  # QoS 1 messages handed to the connection
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._pending_topics: dict[int, str] = {}
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
            manual_ack=True,  # PUBACK only once the application has taken the message
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
        client.on_subscribe = self._cb_subscribe
        client.on_connect_fail = self._cb_connect_fail
        client.on_socket_open = _no_delay
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry_s
        props.ReceiveMaximum = s.receive_maximum
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
        self.subscribed.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("MQTT client closed"))
        self._pending.clear()
        self._pending_topics.clear()

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
        link = self._next_link()
        self._call(self._on_up, link)  # before any message of this connection
        if self.settings.subscriptions:
            client.subscribe([(topic, qos) for topic, qos in self.settings.subscriptions])

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._call(self._set_error, "connect failed")

    def _cb_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._call(self._on_down, self._next_link(), str(reason))

    def _next_link(self) -> int:
        with self._link_lock:
            self._link += 1
            return self._link

    def _cb_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        self._call(self._on_subscribed, refused)

    def _cb_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._call(self._settle, mid, reason.value, str(reason))

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain, msg.mid, self._link)
        self._call(self._deliver, message)

    # -- on the loop -------------------------------------------------------------------

    def _set_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("mqtt: %s", text)
        self.last_error = text

    def _on_up(self, link: int) -> None:
        self._forget_older_links(link)
        self.connections += 1
        self.connected.set()
        self.last_error = ""
        log.info("mqtt connected to %s:%s", self.settings.host, self.settings.port)
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _on_down(self, link: int, reason: str) -> None:
        self._forget_older_links(link)
        if self.connected.is_set():
            log.log(
                logging.INFO if self._closing else logging.WARNING, "mqtt disconnected: %s", reason
            )
        self.connected.clear()
        self.subscribed.clear()
        self.last_error = f"disconnected: {reason}"

    def _forget_older_links(self, link: int) -> None:
        """Inbound QoS 1 messages of a lost connection: the broker sends them again."""
        self._current_link = link
        self._ack_order = deque(k for k in self._ack_order if k[0] >= link)
        self._taken = {k for k in self._taken if k[0] >= link}
        self._inbox = deque(m for m in self._inbox if m.qos == 0 or m.link >= link)

    def _on_subscribed(self, refused: list[str]) -> None:
        if refused:
            log.error("mqtt: subscription refused by the broker: %s", ", ".join(refused))
            return
        self.subscribed.set()

    def _settle(self, mid: int, code: int, reason: str) -> None:
        fut = self._pending.pop(mid, None)
        self._pending_topics.pop(mid, None)
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
        if message.link < self._current_link:
            return  # its connection is gone; the broker sends it again (QoS 1)
        self.messages_received += 1
        if message.qos == 0:
            log.debug("mqtt: message on %s delivered (QoS 0)", message.topic)
            if sum(1 for m in self._inbox if m.qos == 0) >= self._qos0_queue_size:
                self.messages_dropped += 1
                log.error("mqtt: inbound QoS 0 queue full, dropped message on %s", message.topic)
                return
        else:
            self._ack_order.append((message.link, message.mid))
            unacknowledged = len(self._ack_order)
            self.max_unacknowledged = max(self.max_unacknowledged, unacknowledged)
            log.debug(
                "mqtt: message %d on %s delivered (%d unacknowledged)",
                message.mid,
                message.topic,
                unacknowledged,
            )
            if unacknowledged > self.settings.receive_maximum:
                # Kept all the same: dropping would lose it. Mosquitto 2.0.11 does this:
                # each PUBACK moves up to Receive Maximum queued messages into flight.
                self.receive_maximum_exceeded += 1
                if self._exceeded_on_link != message.link:
                    self._exceeded_on_link = message.link
                    log.warning(
                        "mqtt: the broker sends beyond our Receive Maximum %d "
                        "(%d unacknowledged); kept",
                        self.settings.receive_maximum,
                        unacknowledged,
                    )
        self._inbox.append(message)
        self._inbox_ready.set()

    def _send_acks(self) -> None:
        """PUBACK the taken messages at the head of the arrival order."""
        client = self._client
        while self._ack_order and self._ack_order[0] in self._taken:
            key = self._ack_order.popleft()
            self._taken.discard(key)
            if client is None:
                continue
            with self._link_lock:  # paho must not reconnect between the check and the ack
                if key[0] != self._link:
                    continue  # the connection is gone; the broker sends the message again
                client.ack(key[1], 1)
            self.messages_acked += 1

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
        self._pending_topics[info.mid] = topic
        self.published += 1
        return fut

    async def publish_and_wait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await (await self.publish(topic, payload, qos=qos, retain=retain))

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def outstanding_topics(self) -> Counter[str]:
        """Topics of the QoS 1 messages handed over and not yet acknowledged (for health)."""
        return Counter(self._pending_topics.values())

    @property
    def unacknowledged(self) -> int:
        """Inbound QoS 1 messages delivered and not yet acknowledged to the broker."""
        return len(self._ack_order)

    async def receive(self) -> Message:
        """The next message on the subscriptions, in arrival order.

        A QoS 1 message is not acknowledged to the broker until ``ack`` is
        called for it: until then the broker keeps it and sends it again on the
        next connection.
        """
        while not self._inbox:
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        return self._inbox.popleft()

    async def messages(self) -> AsyncIterator[Message]:
        """``receive`` until cancelled."""
        while True:
            yield await self.receive()

    def ack(self, message: Message) -> None:
        """The application has taken ``message`` (durably): let the broker forget it.

        PUBACKs leave in arrival order, so one taken early waits for those
        delivered before it. A message of a connection that is gone is not
        acknowledged: the broker delivers it again and the application
        recognises it (its ledger).
        """
        if message.qos == 0:
            return
        key = (message.link, message.mid)
        if key not in self._ack_order:
            return  # its connection is gone (or acknowledged already)
        self._taken.add(key)
        self._send_acks()


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """An alarm is a small message: with Nagle's algorithm on, the kernel holds it back
    while an earlier segment (a reading, a PUBACK) waits for the broker's acknowledgement,
    which Linux may delay by 40 ms. paho leaves it on; asyncio's transports turn it off."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
