"""Pure codecs for the `es-wb1` GATT characteristics (DEVICES.md 1.2).

Decoders take the bytes of one read or notification and return a frozen value
or raise DecodeError; encoders build the Command characteristic's payloads.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from device_drivers.model import DecodeError

# 16-bit SIG UUIDs in the 128-bit form bleak reports.
BATTERY_SERVICE_UUID = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL_UUID = "00002a19-0000-1000-8000-00805f9b34fb"
HEART_RATE_SERVICE_UUID = "0000180d-0000-1000-8000-00805f9b34fb"
HEART_RATE_MEASUREMENT_UUID = "00002a37-0000-1000-8000-00805f9b34fb"
ALARM_SERVICE_UUID = "5e1a0001-2f6b-4c3e-9d5a-0e5c0a1b2c3d"
ALARM_EVENT_UUID = "5e1a0002-2f6b-4c3e-9d5a-0e5c0a1b2c3d"
COMMAND_UUID = "5e1a0003-2f6b-4c3e-9d5a-0e5c0a1b2c3d"

ALARM_EVENT_LENGTH = 8


class AlarmType(enum.IntEnum):
    SOS = 1
    FALL = 2
    CANCEL = 3  # by the wearer
    REMOVED = 4  # taken off the wrist
    GEOFENCE_EXIT = 5


class CommandCode(enum.IntEnum):
    ACKNOWLEDGE = 0x01
    LOCATE = 0x02
    SET_CLOCK = 0x03


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    type: AlarmType
    event_seq: int
    time: int  # Unix seconds by the wristband's clock
    confidence: int  # % (falls; 100 for buttons)
    reserved: int


@dataclass(frozen=True, slots=True)
class HeartRateMeasurement:
    """Standard Heart Rate Measurement (Bluetooth SIG HRS 3.1)."""

    bpm: int
    sensor_contact: bool | None  # None: the sensor does not report contact
    energy_expended_kj: int | None
    rr_intervals: tuple[int, ...]  # in 1/1024 s, as sent


def decode_alarm_event(data: bytes) -> AlarmEvent:
    raw = bytes(data)
    if len(raw) != ALARM_EVENT_LENGTH:
        raise DecodeError(f"alarm event: expected {ALARM_EVENT_LENGTH} bytes, got {len(raw)}")
    kind, seq, when, confidence, reserved = struct.unpack("<BBIBB", raw)
    try:
        alarm_type = AlarmType(kind)
    except ValueError:
        raise DecodeError(f"alarm event: unknown type {kind}") from None
    return AlarmEvent(alarm_type, seq, when, confidence, reserved)


def decode_heart_rate(data: bytes) -> HeartRateMeasurement:
    raw = bytes(data)
    if not raw:
        raise DecodeError("heart rate measurement: empty")
    flags = raw[0]
    offset = 1
    if flags & 0x01:
        if len(raw) < offset + 2:
            raise DecodeError("heart rate measurement: truncated uint16 value")
        bpm = int.from_bytes(raw[offset : offset + 2], "little")
        offset += 2
    else:
        if len(raw) < offset + 1:
            raise DecodeError("heart rate measurement: truncated uint8 value")
        bpm = raw[offset]
        offset += 1
    contact: bool | None = bool(flags & 0x02) if flags & 0x04 else None
    energy: int | None = None
    if flags & 0x08:
        if len(raw) < offset + 2:
            raise DecodeError("heart rate measurement: truncated energy expended")
        energy = int.from_bytes(raw[offset : offset + 2], "little")
        offset += 2
    rest = raw[offset:]
    if flags & 0x10:
        if len(rest) % 2:
            raise DecodeError("heart rate measurement: odd RR-interval bytes")
        rr = tuple(v for (v,) in struct.iter_unpack("<H", rest))
    elif rest:
        raise DecodeError(f"heart rate measurement: {len(rest)} trailing bytes")
    else:
        rr = ()
    return HeartRateMeasurement(bpm, contact, energy, rr)


def decode_battery_level(data: bytes) -> int:
    raw = bytes(data)
    if len(raw) != 1:
        raise DecodeError(f"battery level: expected 1 byte, got {len(raw)}")
    if raw[0] > 100:
        raise DecodeError(f"battery level: {raw[0]} % out of range")
    return raw[0]


def encode_acknowledge() -> bytes:
    """ "Help is coming": the wristband vibrates, lights green, clears SOS/fall."""
    return bytes([CommandCode.ACKNOWLEDGE])


def encode_locate() -> bytes:
    return bytes([CommandCode.LOCATE])


def encode_set_clock(unix_seconds: int) -> bytes:
    if not 0 <= unix_seconds <= 0xFFFFFFFF:
        raise ValueError(f"set clock: {unix_seconds} does not fit uint32")
    return struct.pack("<BI", CommandCode.SET_CLOCK, unix_seconds)
