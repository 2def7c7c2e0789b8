"""Sans-IO MQTT 5 codec for the packets eldersafe uses (after OASIS MQTT 5.0).

``read_packets`` parses every whole packet in a buffer and reports how many
bytes it used; a partial packet is left for the next read ("need more bytes"),
never waited for. Hot path: PUBLISH parsing is a few slices per message, which
is what lets one Python process drain a QoS 1 backlog faster than paho.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple


class MqttProtocolError(ValueError):
    """The peer sent bytes that are not valid MQTT 5 for us."""


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    SUBSCRIBE = 8
    SUBACK = 9
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


# property identifiers we write or must understand
PROP_SESSION_EXPIRY = 0x11
PROP_RECEIVE_MAXIMUM = 0x21


class Publish(NamedTuple):
    """A PUBLISH. Immutable like the other packets, but a tuple: ``read_packets`` builds
    one per message of a backlog, and ``tuple.__new__`` costs a tenth of a frozen
    dataclass's ``__init__``."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    retain: bool = False
    dup: bool = False


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    reason_code: int


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class Other:
    packet_type: int
    body: bytes = field(repr=False)


Packet = Publish | ConnAck | SubAck | PubAck | PingResp | Disconnect | Other


def encode_varint(n: int) -> bytes:
    if n < 0 or n > 268_435_455:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def _bin(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 30,
    clean_start: bool = False,
    session_expiry: int = 0,
    receive_maximum: int = 65535,
    will: Publish | None = None,
) -> bytes:
    flags = 0
    if clean_start:
        flags |= 0x02
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    props = bytes([PROP_SESSION_EXPIRY]) + struct.pack("!I", session_expiry)
    props += bytes([PROP_RECEIVE_MAXIMUM]) + struct.pack("!H", receive_maximum)
    body = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
    body += encode_varint(len(props)) + props + _str(client_id)
    if will is not None:
        body += encode_varint(0) + _str(will.topic) + _bin(will.payload)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _bin(password.encode())
    return _packet(0x10, body)


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + encode_varint(0)
    for topic_filter, qos in filters:
        body += _str(topic_filter) + bytes([qos])
    return _packet(0x82, body)


def encode_publish(
    topic: str, payload: bytes, *, qos: int = 1, packet_id: int | None = None, retain: bool = False
) -> bytes:
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    body = _str(topic)
    if qos:
        if packet_id is None:
            raise ValueError("QoS > 0 needs a packet id")
        body += struct.pack("!H", packet_id)
    body += b"\x00" + payload
    return _packet(first, body)


_PUBACK = struct.Struct("!BBH")


def encode_pubacks(packet_ids: list[int]) -> bytes:
    """All acknowledgements of a batch in one buffer (one write to the socket)."""
    pack = _PUBACK.pack
    return b"".join([pack(0x40, 2, pid) for pid in packet_ids])


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _read_varint(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Return (value, new position); raise IndexError when more bytes are needed."""
    mult = 1
    value = 0
    for i in range(4):
        if pos >= end:
            raise IndexError
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos
        mult *= 128
        if i == 3:
            break
    raise MqttProtocolError("malformed variable byte integer")


def _parse(first: int, body: memoryview) -> Packet:
    """Parse one complete packet's body other than PUBLISH (``read_packets`` does those);
    an IndexError means the packet is malformed."""
    ptype = first >> 4
    n = len(body)
    if ptype == 4:
        return PubAck((body[0] << 8) | body[1], body[2] if n > 2 else 0)
    if ptype == 2:
        return ConnAck(bool(body[0] & 1), body[1])
    if ptype == 9:
        plen, p = _read_varint(body, 2, n)
        if p + plen > n:
            raise IndexError
        return SubAck((body[0] << 8) | body[1], tuple(body[p + plen :]))
    if ptype == 13:
        return PingResp()
    if ptype == 14:
        return Disconnect(body[0] if n else 0)
    return Other(ptype, bytes(body))


_new_tuple = tuple.__new__


def read_packets(buf: bytearray) -> tuple[list[Packet], int]:
    """Parse all complete packets at the start of ``buf``; return them and the bytes used.

    The hot path of a backlog: a PUBLISH is parsed inline, without a call per
    field, reading ``buf`` directly with every index checked against the
    packet's own end, and built as a tuple.
    """
    packets: list[Packet] = []
    append = packets.append
    pos = 0
    end = len(buf)
    mv = memoryview(buf)
    try:
        while pos < end:
            first = buf[pos]
            # the remaining length inline when it takes one or two bytes (< 16 KiB)
            if pos + 3 < end and buf[pos + 1] < 0x80:
                length, body_start = buf[pos + 1], pos + 2
            elif pos + 3 < end and buf[pos + 2] < 0x80:
                length, body_start = (buf[pos + 1] & 0x7F) | (buf[pos + 2] << 7), pos + 3
            else:
                try:
                    length, body_start = _read_varint(buf, pos + 1, end)
                except IndexError:
                    break
            body_end = body_start + length
            if body_end > end:
                break
            try:
                if first >> 4 == 3:
                    p = body_start + 2 + ((buf[body_start] << 8) | buf[body_start + 1])
                    if p > body_end or body_start + 2 > body_end:
                        raise IndexError
                    topic = str(mv[body_start + 2 : p], "utf-8")
                    qos = (first >> 1) & 0x03
                    packet_id = None
                    if qos:
                        if p + 2 > body_end:
                            raise IndexError
                        packet_id = (buf[p] << 8) | buf[p + 1]
                        p += 2
                    if p >= body_end:  # MQTT 5: the property length is always there
                        raise IndexError
                    props = buf[p]
                    if props < 0x80:
                        p += 1 + props
                    else:
                        props, p = _read_varint(buf, p, body_end)
                        p += props
                    if p > body_end:
                        raise IndexError
                    fields = (topic, bytes(mv[p:body_end]), qos, packet_id, first & 1 == 1)
                    append(_new_tuple(Publish, (*fields, first & 8 == 8)))
                else:
                    append(_parse(first, mv[body_start:body_end]))
            except (IndexError, UnicodeDecodeError):
                raise MqttProtocolError(f"malformed packet of type {first >> 4}") from None
            pos = body_end
    finally:
        mv.release()
    return packets, pos
