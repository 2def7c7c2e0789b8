"""es-cb1 frame contents: pure bytes <-> frozen dataclasses, no I/O.

Layering: this module knows what a frame *means*; ``framing`` knows where a
frame starts and ends on a noisy line; ``driver`` owns the serial port and the
session state (dedup, offline timers). Decoders raise only ``DecodeError`` so a
reader can count and skip bad input without guessing at exception types.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from device_drivers.crc import crc16_modbus
from device_drivers.model import DecodeError

__all__ = [
    "EXPECTED_LENGTH",
    "MAX_FRAME_LENGTH",
    "RECEIVER_ADDRESS",
    "SYNC",
    "AckPattern",
    "Acknowledge",
    "ButtonEvent",
    "ButtonEventCode",
    "FrameType",
    "Message",
    "ReceiverStatus",
    "button_address",
    "decode_acknowledge",
    "decode_button_event",
    "decode_frame",
    "decode_payload",
    "decode_receiver_status",
    "encode_acknowledge",
    "encode_button_event",
    "encode_frame",
    "encode_receiver_status",
    "parse_button_address",
]

SYNC = b"\xaa\x55"


class FrameType(IntEnum):
    BUTTON_EVENT = 0x01
    RECEIVER_STATUS = 0x02
    ACKNOWLEDGE = 0x81


class ButtonEventCode(IntEnum):
    PRESS = 0x01
    CANCEL = 0x02
    LOW_BATTERY = 0x03
    SUPERVISION = 0x04
    TAMPER = 0x05


class AckPattern(IntEnum):
    ALARM_RECEIVED = 1  # LED blinks
    HELP_COMING = 2  # LED steady for 30 s


#: L (type byte + payload) for every known frame type; anything else is rejected.
EXPECTED_LENGTH: dict[int, int] = {
    FrameType.BUTTON_EVENT: 9,
    FrameType.RECEIVER_STATUS: 6,
    FrameType.ACKNOWLEDGE: 6,
}
#: sync + L + (type + payload) + CRC of the longest known frame.
MAX_FRAME_LENGTH = 2 + 1 + max(EXPECTED_LENGTH.values()) + 2

_EVENT = struct.Struct(">IBBbB")  # button_id, event, battery, rssi, seq
_STATUS = struct.Struct(">IB")  # uptime, firmware
_ACK = struct.Struct(">IB")  # button_id, pattern


RECEIVER_ADDRESS = "receiver"  # the receiver itself, as a device of the site


def button_address(button_id: int) -> str:
    """A button's address as the edge sees it: 8 lowercase hex digits."""
    return f"{button_id:08x}"


def parse_button_address(address: str) -> int:
    """Inverse of ``button_address``; raises ValueError for anything else."""
    if len(address) != 8:
        raise ValueError(f"button address must be 8 hex digits, got {address!r}")
    return int(address, 16)


@dataclass(frozen=True, slots=True)
class ButtonEvent:
    button_id: int
    event: ButtonEventCode
    battery_pct: int | None  # None when the button reports a value above 100
    rssi_dbm: int
    seq: int

    @property
    def address(self) -> str:
        return button_address(self.button_id)


@dataclass(frozen=True, slots=True)
class ReceiverStatus:
    uptime_s: int
    firmware: int


@dataclass(frozen=True, slots=True)
class Acknowledge:
    button_id: int
    pattern: AckPattern


Message = ButtonEvent | ReceiverStatus | Acknowledge


def decode_button_event(payload: bytes) -> ButtonEvent:
    if len(payload) != _EVENT.size:
        raise DecodeError(f"button event payload needs {_EVENT.size} bytes, got {len(payload)}")
    button_id, event, battery, rssi, seq = _EVENT.unpack(payload)
    try:
        code = ButtonEventCode(event)
    except ValueError:
        raise DecodeError(f"unknown button event 0x{event:02x}") from None
    # A bad battery byte must not cost us a PRESS: keep the event, drop the value.
    return ButtonEvent(button_id, code, battery if battery <= 100 else None, rssi, seq)


def decode_receiver_status(payload: bytes) -> ReceiverStatus:
    if len(payload) != _STATUS.size:
        raise DecodeError(f"receiver status payload needs {_STATUS.size} bytes, got {len(payload)}")
    uptime, firmware = _STATUS.unpack(payload)
    return ReceiverStatus(uptime, firmware)


def decode_acknowledge(payload: bytes) -> Acknowledge:
    if len(payload) != _ACK.size:
        raise DecodeError(f"acknowledge payload needs {_ACK.size} bytes, got {len(payload)}")
    button_id, pattern = _ACK.unpack(payload)
    try:
        return Acknowledge(button_id, AckPattern(pattern))
    except ValueError:
        raise DecodeError(f"unknown acknowledge pattern {pattern}") from None


def decode_payload(frame_type: int, payload: bytes) -> Message:
    """Decode the payload of a frame whose CRC has already been checked."""
    if frame_type == FrameType.BUTTON_EVENT:
        return decode_button_event(payload)
    if frame_type == FrameType.RECEIVER_STATUS:
        return decode_receiver_status(payload)
    if frame_type == FrameType.ACKNOWLEDGE:
        return decode_acknowledge(payload)
    raise DecodeError(f"unknown frame type 0x{frame_type:02x}")


def decode_frame(frame: bytes) -> Message:
    """Decode exactly one complete frame (sync through CRC)."""
    if len(frame) < 6 or frame[:2] != SYNC:
        raise DecodeError("not an es-cb1 frame (missing AA 55 or too short)")
    length = frame[2]
    if length < 1 or len(frame) != 3 + length + 2:
        raise DecodeError(f"length byte {length} does not fit a {len(frame)}-byte frame")
    body = frame[2 : 3 + length]
    crc = int.from_bytes(frame[3 + length :], "little")
    if crc16_modbus(body) != crc:
        raise DecodeError("CRC mismatch")
    frame_type = frame[3]
    expected = EXPECTED_LENGTH.get(frame_type)
    if expected is None:
        raise DecodeError(f"unknown frame type 0x{frame_type:02x}")
    if length != expected:
        raise DecodeError(f"frame type 0x{frame_type:02x} needs L={expected}, got {length}")
    return decode_payload(frame_type, bytes(frame[4 : 3 + length]))


def encode_frame(frame_type: int, payload: bytes) -> bytes:
    if not 0 <= frame_type <= 0xFF or len(payload) > 254:
        raise ValueError("frame type must be a byte and the payload at most 254 bytes")
    body = bytes([len(payload) + 1, frame_type]) + payload
    return SYNC + body + crc16_modbus(body).to_bytes(2, "little")


def encode_acknowledge(button_id: int, pattern: AckPattern | int) -> bytes:
    """The 0x81 frame the gateway sends to make a button's LED answer the caller."""
    return encode_frame(FrameType.ACKNOWLEDGE, _ACK.pack(button_id, AckPattern(pattern)))


def encode_button_event(event: ButtonEvent) -> bytes:
    """For tests and tools; the gateway never sends these."""
    battery = 0xFF if event.battery_pct is None else event.battery_pct
    payload = _EVENT.pack(event.button_id, event.event, battery, event.rssi_dbm, event.seq)
    return encode_frame(FrameType.BUTTON_EVENT, payload)


def encode_receiver_status(status: ReceiverStatus) -> bytes:
    """For tests and tools; the gateway never sends these."""
    return encode_frame(FrameType.RECEIVER_STATUS, _STATUS.pack(status.uptime_s, status.firmware))
