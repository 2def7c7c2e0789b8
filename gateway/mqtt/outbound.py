"""QoS 1 publishes of the server's own MQTT session: packet ids, a window, re-send after reconnect.

The server has one broker account and so one session (``use_username_as_clientid``:
a second connection would take it over), so its downlink goes out on the
consumer's connection. This part holds what MQTT 5 §4.4 asks of a sender:

* a packet id is never one in use: not one of ours in flight or queued, and
  never the SUBSCRIBE's (1);
* a message stays in flight until its PUBACK. After a reconnect it is sent
  again with its original packet id, DUP set, when the broker kept the
  session; as a new message when the broker lost it. A PUBACK is never
  guessed, so a message is never lost;
* at most ``window`` messages are in flight (below Mosquitto's default
  Receive Maximum of 20); the rest wait in order;
* ``publish`` with the ``key`` of a message still in flight (or acknowledged
  and not yet collected) returns that message's future instead of sending it
  again: a caller that stopped waiting and asks again makes no duplicate.

Sans-IO apart from the ``write`` the session attaches: the consumer calls
``attach`` when a connection is up, ``detach`` when it ends, ``acked`` for
each PUBACK. Futures only settle here; nothing else runs in the callback.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from gateway.mqtt.codec import PubAck, encode_publish

SUBSCRIBE_PACKET_ID = 1  # the consumer's SUBSCRIBE; never given to a PUBLISH
DUP_FLAG = 0x08


@dataclass(slots=True)
class _Message:
    key: Hashable
    packet_id: int
    packet: bytes  # DUP clear
    done: asyncio.Future[int]  # the PUBACK's reason code


class Outbound:
    """The publishing half of one persistent session (see the module docstring)."""

    def __init__(self, window: int = 16, remember_acked: int = 4096) -> None:
        if not 0 < window < 65_000:
            raise ValueError("window must be in 1..64999")
        self.window = window
        self.remember_acked = remember_acked
        self._in_flight: OrderedDict[int, _Message] = OrderedDict()  # by packet id, send order
        self._waiting: deque[_Message] = deque()
        self._by_key: dict[Hashable, _Message] = {}
        self._acked: OrderedDict[Hashable, asyncio.Future[int]] = OrderedDict()
        self._write: Callable[[bytes], None] | None = None
        self._next_id = SUBSCRIBE_PACKET_ID

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged (in flight or waiting for the window)."""
        return len(self._in_flight) + len(self._waiting)

    def publish(self, topic: str, payload: bytes, key: Hashable) -> asyncio.Future[int]:
        """Send ``payload`` at QoS 1; the future settles with the PUBACK's reason code."""
        acked = self._acked.pop(key, None)
        if acked is not None:
            return acked
        known = self._by_key.get(key)
        if known is not None:
            return known.done
        if self.pending >= 65_000:
            raise OverflowError("no free packet id: 65,000 messages unacknowledged")
        packet_id = self._take_id()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        packet = encode_publish(topic, payload, packet_id=packet_id)
        message = _Message(key, packet_id, packet, done)
        self._by_key[key] = message
        self._waiting.append(message)
        self._fill()
        return done

    def attach(self, write: Callable[[bytes], None], session_present: bool) -> None:
        """A connection is up: first what was in flight (DUP if the broker kept the
        session, else as new messages), then what waited, up to the window."""
        self._write = write
        for message in self._in_flight.values():
            packet = message.packet
            if session_present:
                packet = bytes([packet[0] | DUP_FLAG]) + packet[1:]
            write(packet)
        self._fill()

    def detach(self) -> None:
        """The connection ended: in-flight messages stay, to be sent again."""
        self._write = None

    def acked(self, puback: PubAck) -> None:
        message = self._in_flight.pop(puback.packet_id, None)
        if message is None:
            return  # not ours (a PUBACK for a message an earlier run sent)
        del self._by_key[message.key]
        if not message.done.done():
            message.done.set_result(puback.reason_code)
        self._acked[message.key] = message.done
        while len(self._acked) > self.remember_acked:
            self._acked.popitem(last=False)
        self._fill()

    def _fill(self) -> None:
        write = self._write
        while write is not None and self._waiting and len(self._in_flight) < self.window:
            message = self._waiting.popleft()
            self._in_flight[message.packet_id] = message
            write(message.packet)

    def _take_id(self) -> int:
        used = self._in_flight.keys() | {m.packet_id for m in self._waiting}
        while True:
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id != SUBSCRIBE_PACKET_ID and self._next_id not in used:
                return self._next_id
