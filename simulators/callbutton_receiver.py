"""A virtual es-cb1 call-button receiver on a pseudo-terminal (DEVICES.md section 2).

The simulator owns the pty master; the driver opens ``slave_path`` exactly as it
would open /dev/ttyUSB0. Buttons send every event three times (the RF repeats)
with one seq; the receiver reports its status every ``status_interval_s``; line
noise and broken frames are injected on demand; the receiver can go silent;
every 0x81 acknowledge the gateway sends is recorded.

Written from DEVICES.md alone (its own CRC): nothing here imports
``device_drivers``, so a shared misreading of the spec cannot hide.

    sim = CallButtonReceiverSimulator(status_interval_s=30)
    await sim.start()
    driver = CallButtonReceiverDriver(sim.slave_path)
    await sim.press(0x0001E240)
    ack = await sim.wait_for_ack()
    await sim.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import time
import tty
from dataclasses import dataclass

__all__ = [
    "CANCEL",
    "LOW_BATTERY",
    "PRESS",
    "SUPERVISION",
    "TAMPER",
    "AckRecord",
    "CallButtonReceiverSimulator",
    "VirtualButton",
    "crc16",
    "frame",
]

PRESS, CANCEL, LOW_BATTERY, SUPERVISION, TAMPER = 0x01, 0x02, 0x03, 0x04, 0x05
_TYPE_EVENT, _TYPE_STATUS, _TYPE_ACK = 0x01, 0x02, 0x81
_SYNC = b"\xaa\x55"


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS, bit by bit (deliberately not the driver's table version)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def frame(frame_type: int, payload: bytes) -> bytes:
    body = bytes([len(payload) + 1, frame_type]) + payload
    return _SYNC + body + struct.pack("<H", crc16(body))


@dataclass(slots=True)
class VirtualButton:
    button_id: int
    battery: int = 95
    rssi: int = -60
    seq: int = 0

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq


@dataclass(frozen=True, slots=True)
class AckRecord:
    """An acknowledge frame the gateway sent to the receiver."""

    button_id: int
    pattern: int  # 1 alarm received (blink), 2 help is coming (steady)
    raw: bytes
    at: float


class CallButtonReceiverSimulator:
    """Receiver + buttons; the pty is the serial cable."""

    def __init__(
        self,
        *,
        status_interval_s: float = 30.0,
        firmware: int = 0x12,
        repeats: int = 3,
        repeat_gap_s: float = 0.005,
        seed: int | None = None,
    ) -> None:
        self.status_interval_s = status_interval_s
        self.firmware = firmware
        self.repeats = repeats
        self.repeat_gap_s = repeat_gap_s
        self.buttons: dict[int, VirtualButton] = {}
        self.acks: list[AckRecord] = []
        self.garbage_received = 0  # bytes from the gateway that formed no valid frame
        self.frames_sent = 0
        self.silent = False
        self._rng = random.Random(seed)
        self._master = -1
        self._slave = -1
        self.slave_path = ""
        self._rx = bytearray()
        self._tx = bytearray()
        self._ack_event = asyncio.Event()
        self._status_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> str:
        """Open the pty and start the status beacon; returns the path for the driver."""
        self._loop = asyncio.get_running_loop()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: bytes go through as sent
        # Keep our slave fd open so the pty survives the driver closing and reopening it.
        os.set_blocking(self._master, False)
        self.slave_path = os.ttyname(self._slave)
        self._started_at = time.monotonic()
        self._loop.add_reader(self._master, self._on_readable)
        if self.status_interval_s > 0:
            self._status_task = asyncio.create_task(self._status_beacon())
        return self.slave_path

    async def stop(self) -> None:
        """Close the pty: the driver's port fails, as if the USB cable were pulled."""
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
            self._status_task = None
        if self._loop is not None and self._master >= 0:
            self._loop.remove_reader(self._master)
            self._loop.remove_writer(self._master)
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1

    async def __aenter__(self) -> CallButtonReceiverSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the wire ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Queue bytes for the line; a full pty buffer delays them, never drops them."""
        if self._master < 0:
            raise RuntimeError("simulator not started")
        self._tx += data
        self._flush()

    def _flush(self) -> None:
        assert self._loop is not None
        while self._tx:
            try:
                n = os.write(self._master, self._tx)
            except BlockingIOError:
                self._loop.add_writer(self._master, self._flush)
                return
            del self._tx[:n]
        self._loop.remove_writer(self._master)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: nobody has the slave open right now
        if data:
            self._rx += data
            self._parse_rx()

    def _parse_rx(self) -> None:
        """Find 0x81 frames in what the gateway sent; count everything else."""
        buf = self._rx
        while True:
            start = buf.find(_SYNC)
            if start < 0:
                keep = 1 if buf.endswith(b"\xaa") else 0
                self.garbage_received += len(buf) - keep
                del buf[: len(buf) - keep]
                return
            self.garbage_received += start
            del buf[:start]
            if len(buf) < 3:
                return
            length = buf[2]
            total = 3 + length + 2
            if len(buf) < total:
                return
            body = bytes(buf[2 : 3 + length])
            crc = struct.unpack("<H", buf[3 + length : total])[0]
            if length == 6 and buf[3] == _TYPE_ACK and crc16(body) == crc:
                button_id, pattern = struct.unpack(">IB", body[2:])
                self.acks.append(AckRecord(button_id, pattern, bytes(buf[:total]), time.time()))
                self._ack_event.set()
                del buf[:total]
            else:
                self.garbage_received += 1
                del buf[:1]

    async def wait_for_ack(self, count: int = 1, timeout: float = 2.0) -> AckRecord:  # noqa: ASYNC109
        """Wait until ``count`` acknowledges have arrived in total; return the last."""
        async with asyncio.timeout(timeout):
            while len(self.acks) < count:
                self._ack_event.clear()
                await self._ack_event.wait()
        return self.acks[count - 1]

    # -- receiver ----------------------------------------------------------------------

    def status_frame(self) -> bytes:
        uptime = int(time.monotonic() - self._started_at)
        return frame(_TYPE_STATUS, struct.pack(">IB", uptime, self.firmware))

    async def send_status(self) -> None:
        if not self.silent:
            self._write(self.status_frame())
            self.frames_sent += 1

    async def _status_beacon(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval_s)
            await self.send_status()

    def go_silent(self) -> None:
        """The receiver stops sending anything (hung firmware, unpowered)."""
        self.silent = True

    def resume(self) -> None:
        self.silent = False

    # -- buttons -----------------------------------------------------------------------

    def add_button(self, button_id: int, *, battery: int = 95, rssi: int = -60) -> VirtualButton:
        button = VirtualButton(button_id, battery, rssi)
        self.buttons[button_id] = button
        return button

    def event_frame(
        self,
        button_id: int,
        event: int,
        *,
        seq: int,
        battery: int | None = None,
        rssi: int | None = None,
    ) -> bytes:
        button = self.buttons.get(button_id) or self.add_button(button_id)
        payload = struct.pack(
            ">IBBbB",
            button_id,
            event,
            button.battery if battery is None else battery,
            button.rssi if rssi is None else rssi,
            seq,
        )
        return frame(_TYPE_EVENT, payload)

    async def send_event(
        self,
        button_id: int,
        event: int,
        *,
        repeats: int | None = None,
        seq: int | None = None,
        battery: int | None = None,
        rssi: int | None = None,
    ) -> int:
        """One physical event: ``repeats`` identical frames (same seq). Returns the seq."""
        button = self.buttons.get(button_id) or self.add_button(button_id)
        if seq is None:
            seq = button.next_seq()
        data = self.event_frame(button_id, event, seq=seq, battery=battery, rssi=rssi)
        for i in range(self.repeats if repeats is None else repeats):
            if i and self.repeat_gap_s:
                await asyncio.sleep(self.repeat_gap_s)
            if not self.silent:
                self._write(data)
                self.frames_sent += 1
        return seq

    async def press(self, button_id: int, **kw: int) -> int:
        return await self.send_event(button_id, PRESS, **kw)

    async def cancel(self, button_id: int, **kw: int) -> int:
        return await self.send_event(button_id, CANCEL, **kw)

    async def low_battery(self, button_id: int, **kw: int) -> int:
        return await self.send_event(button_id, LOW_BATTERY, **kw)

    async def supervision(self, button_id: int, **kw: int) -> int:
        return await self.send_event(button_id, SUPERVISION, **kw)

    async def tamper(self, button_id: int, **kw: int) -> int:
        return await self.send_event(button_id, TAMPER, **kw)

    # -- faults ------------------------------------------------------------------------

    async def inject_noise(self, data: bytes | None = None, length: int = 32) -> bytes:
        """Random bytes (or ``data``) on the line, as EMI or a flapping cable would."""
        noise = data if data is not None else bytes(self._rng.randrange(256) for _ in range(length))
        self._write(noise)
        return noise

    async def inject_corrupt_frame(self, kind: str = "bad_crc", button_id: int = 0xDEAD) -> bytes:
        """A broken frame: "bad_crc", "cut" (first half only), "unknown_type", "bad_length"."""
        good = self.event_frame(button_id, PRESS, seq=0xEE)
        if kind == "bad_crc":
            bad = good[:-2] + bytes([good[-2] ^ 0xFF, good[-1]])
        elif kind == "cut":
            bad = good[: len(good) // 2]
        elif kind == "unknown_type":
            bad = frame(0x7E, good[4:-2])
        elif kind == "bad_length":
            body = bytes([0x30]) + good[3:-2]
            bad = _SYNC + body + struct.pack("<H", crc16(body))
        else:
            raise ValueError(f"unknown corruption {kind!r}")
        self._write(bad)
        return bad
