"""Incremental es-cb1 framer: feed it bytes as they arrive, take whole frames out.

It never blocks and never raises on line noise: anything that is not a valid
frame is counted in ``LineCounters`` and skipped, and the framer resynchronises
on the next ``AA 55``. After a rejected candidate it moves on by *one* byte, so
a frame that starts inside a cut or corrupt one is still found.

An unknown frame type is rejected as soon as its header is in, rather than
waiting for L bytes: on a noisy line a random length byte could otherwise hold
up a real button press behind it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from device_drivers.callbutton.codec import EXPECTED_LENGTH, MAX_FRAME_LENGTH, SYNC
from device_drivers.crc import crc16_modbus

__all__ = ["Framer", "LineCounters", "RawFrame"]


@dataclass(slots=True)
class LineCounters:
    """What the reader saw on the line; the driver exposes it for metrics."""

    frames: int = 0  # frames with a good CRC handed on
    noise_bytes: int = 0  # bytes skipped while hunting for AA 55
    resyncs: int = 0  # hunts for the next AA 55 (after noise or a rejected candidate)
    bad_crc: int = 0
    cut_frames: int = 0  # bad CRC because another frame started inside this one
    unknown_type: int = 0
    bad_length: int = 0  # length byte that does not fit the frame type
    decode_errors: int = 0  # CRC fine, payload invalid (set by the driver)
    duplicates: int = 0  # RF repeats suppressed (set by the driver)
    stale_partials: int = 0  # partial frames dropped after a silent gap (driver)

    @property
    def rejected(self) -> int:
        return self.bad_crc + self.cut_frames + self.unknown_type + self.bad_length

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """A frame whose sync, length, type and CRC were valid."""

    frame_type: int
    payload: bytes
    raw: bytes


class Framer:
    """Byte-stream to frames. Pure state machine; no I/O, no clocks."""

    def __init__(self, counters: LineCounters | None = None) -> None:
        self.counters = counters if counters is not None else LineCounters()
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[RawFrame]:
        """Add bytes; return every frame now complete (possibly none)."""
        self._buf += data
        frames: list[RawFrame] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        return frames

    def discard_partial(self) -> int:
        """Drop a half-received frame (the line went quiet); returns bytes dropped."""
        dropped = len(self._buf)
        if dropped:
            self._buf.clear()
        return dropped

    def _skip_to_sync(self) -> None:
        """Drop bytes before the next AA 55; keep a trailing AA that may start one."""
        idx = self._buf.find(SYNC)
        if idx < 0:
            idx = len(self._buf) - 1 if self._buf.endswith(SYNC[:1]) else len(self._buf)
        if idx:
            self.counters.noise_bytes += idx
            self.counters.resyncs += 1
            del self._buf[:idx]

    def _reject_candidate(self) -> None:
        """The candidate at offset 0 is bad: resync from the byte after its sync."""
        del self._buf[:1]
        self._skip_to_sync()

    def _next(self) -> RawFrame | None:
        while True:
            self._skip_to_sync()
            buf = self._buf
            if len(buf) < 4:
                return None  # need sync + L + type
            length, frame_type = buf[2], buf[3]
            expected = EXPECTED_LENGTH.get(frame_type)
            if expected is None:
                if length < 1 or 3 + length + 2 > MAX_FRAME_LENGTH:
                    self.counters.bad_length += 1
                else:
                    self.counters.unknown_type += 1
                self._reject_candidate()
                continue
            if length != expected:
                self.counters.bad_length += 1
                self._reject_candidate()
                continue
            total = 3 + length + 2
            if len(buf) < total:
                return None
            body = bytes(buf[2 : 3 + length])
            crc = int.from_bytes(buf[3 + length : total], "little")
            if crc16_modbus(body) != crc:
                if buf.find(SYNC, 1, total) >= 0:
                    self.counters.cut_frames += 1
                else:
                    self.counters.bad_crc += 1
                self._reject_candidate()
                continue
            raw = bytes(buf[:total])
            del buf[:total]
            self.counters.frames += 1
            return RawFrame(frame_type, raw[4 : 3 + length], raw)
