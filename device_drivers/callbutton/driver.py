"""es-cb1 session: a serial call-button receiver turned into typed observations.

Transport: a pyserial URL or device path (``/dev/ttyUSB0``, a pty slave,
``socket://host:port``, ``rfc2217://``...) opened with pyserial-asyncio-fast,
or any ``SerialOpener`` the caller passes in. Everything below the session
(``framing``, ``codec``) is pure and tested without a port.

The driver suppresses the RF repeats it sees itself (same button and seq within
the dedup window) but still tags every Occurrence with a ``dedup_key``: the
edge's durable ledger is the real guard across receivers and restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress

from device_drivers.callbutton.codec import (
    RECEIVER_ADDRESS,
    AckPattern,
    ButtonEvent,
    ButtonEventCode,
    FrameType,
    ReceiverStatus,
    button_address,
    decode_payload,
    encode_acknowledge,
    parse_button_address,
)
from device_drivers.callbutton.framing import Framer, LineCounters
from device_drivers.model import (
    Command,
    CommandAction,
    CommandError,
    Condition,
    ConditionKind,
    DecodeError,
    LinkStatus,
    Observation,
    ObservationSink,
    Occurrence,
    OccurrenceKind,
    Scalar,
)

__all__ = ["RECEIVER_ADDRESS", "CallButtonReceiverDriver", "SerialOpener", "open_serial_port"]

log = logging.getLogger(__name__)

SerialOpener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

_OCCURRENCE_KINDS = {
    ButtonEventCode.PRESS: OccurrenceKind.SOS,
    ButtonEventCode.CANCEL: OccurrenceKind.CANCEL,
    ButtonEventCode.SUPERVISION: OccurrenceKind.SUPERVISION,
}
_CONDITION_KINDS = {
    ButtonEventCode.LOW_BATTERY: ConditionKind.LOW_BATTERY,
    ButtonEventCode.TAMPER: ConditionKind.TAMPER,
}
_ACK_PATTERNS = {
    CommandAction.ACKNOWLEDGE: AckPattern.HELP_COMING,
    CommandAction.ALARM_RECEIVED: AckPattern.ALARM_RECEIVED,
}


async def open_serial_port(
    url: str, baudrate: int = 9600
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a pyserial URL or path as asyncio streams (9600 8N1 per DEVICES.md)."""
    import serial_asyncio_fast  # local: keeps the pure layers importable without it

    reader, writer = await serial_asyncio_fast.open_serial_connection(
        url=url, baudrate=baudrate, bytesize=8, parity="N", stopbits=1
    )
    return reader, writer


class CallButtonReceiverDriver:
    """Reads one es-cb1 receiver; implements ``device_drivers.model.Driver``."""

    def __init__(
        self,
        port: str,
        *,
        buttons: Iterable[int | str] = (),
        baudrate: int = 9600,
        receiver_offline_after_s: float = 90.0,
        button_supervision_s: float = 3600.0,
        dedup_window_s: float = 60.0,
        partial_frame_timeout_s: float = 1.0,
        opener: SerialOpener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``buttons``: ids (int or 8-hex address) supervised for check-ins.

        ``opener`` replaces the serial port (any stream pair works); all timings
        are parameters so tests can shrink them.
        """
        self.port = port
        self.baudrate = baudrate
        self.receiver_offline_after_s = receiver_offline_after_s
        self.button_supervision_s = button_supervision_s
        self.dedup_window_s = dedup_window_s
        self.partial_frame_timeout_s = partial_frame_timeout_s
        self._opener: SerialOpener = opener or (lambda: open_serial_port(port, baudrate))
        self._clock = clock
        self._supervised = {b if isinstance(b, int) else parse_button_address(b) for b in buttons}
        self.counters = LineCounters()
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._seen: dict[tuple[int, int], float] = {}  # (button_id, seq) -> first seen
        self._receiver_offline: bool | None = None
        self._receiver_last_heard = 0.0
        self._button_last_heard: dict[int, float] = {}
        self._button_offline: dict[int, bool] = {}

    # -- session ---------------------------------------------------------------------

    async def run(self, sink: ObservationSink) -> None:
        """Read until cancelled; raise when the serial port fails or closes."""
        reader, writer = await self._opener()
        framer = Framer(self.counters)
        now = self._clock()
        self._receiver_last_heard = now
        self._receiver_offline = None
        self._button_last_heard = dict.fromkeys(self._supervised, now)
        self._button_offline = {}
        self._writer = writer
        self.connected.set()
        last_byte_at = now
        try:
            while True:
                data: bytes | None = None
                with suppress(TimeoutError):
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                    async with asyncio.timeout(self._tick_s()):
                        data = await reader.read(4096)
                if data == b"":
                    raise ConnectionError(f"serial port {self.port} closed")
                now = self._clock()
                if data:
                    last_byte_at = now
                    for frame in framer.feed(data):
                        await self._on_frame(frame.frame_type, frame.payload, frame.raw, sink)
                elif framer.pending and now - last_byte_at >= self.partial_frame_timeout_s:
                    dropped = framer.discard_partial()
                    self.counters.stale_partials += 1
                    log.warning("es-cb1 %s: dropped %d-byte partial frame", self.port, dropped)
                await self._check_timers(sink)
        finally:
            self.connected.clear()
            self._writer = None
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    def _tick_s(self) -> float:
        shortest = min(
            self.receiver_offline_after_s, self.button_supervision_s, self.partial_frame_timeout_s
        )
        return max(0.01, min(1.0, shortest / 4))

    async def _on_frame(
        self, frame_type: int, payload: bytes, raw: bytes, sink: ObservationSink
    ) -> None:
        if frame_type != FrameType.ACKNOWLEDGE:  # our own echo proves nothing
            await self._receiver_heard(sink)  # any other CRC-valid frame: receiver alive
        try:
            message = decode_payload(frame_type, payload)
        except DecodeError as exc:
            self.counters.decode_errors += 1
            log.warning("es-cb1 %s: undecodable frame %s: %s", self.port, raw.hex(" "), exc)
            return
        if isinstance(message, ButtonEvent):
            await self._on_button_event(message, sink)
        elif isinstance(message, ReceiverStatus):
            await sink(LinkStatus(RECEIVER_ADDRESS, online=True))
        elif frame_type == FrameType.ACKNOWLEDGE:
            # Our own downlink echoed back (a half-duplex RS-485 adapter): not an input.
            log.debug("es-cb1 %s: ignoring echoed acknowledge %s", self.port, raw.hex(" "))

    async def _receiver_heard(self, sink: ObservationSink) -> None:
        self._receiver_last_heard = self._clock()
        if self._receiver_offline is not False:
            self._receiver_offline = False
            await sink(Condition(RECEIVER_ADDRESS, ConditionKind.OFFLINE, active=False))
            await sink(LinkStatus(RECEIVER_ADDRESS, online=True))

    def _is_repeat(self, event: ButtonEvent, now: float) -> bool:
        horizon = now - self.dedup_window_s
        if len(self._seen) > 256:
            self._seen = {k: t for k, t in self._seen.items() if t > horizon}
        key = (event.button_id, event.seq)
        first = self._seen.get(key)
        if first is not None and first > horizon:
            return True
        self._seen[key] = now
        return False

    async def _on_button_event(self, event: ButtonEvent, sink: ObservationSink) -> None:
        now = self._clock()
        address = event.address
        self._button_last_heard[event.button_id] = now
        if self._button_offline.get(event.button_id):
            self._button_offline[event.button_id] = False
            await sink(Condition(address, ConditionKind.OFFLINE, active=False))
        if self._is_repeat(event, now):
            self.counters.duplicates += 1
            return
        data: dict[str, Scalar] = {
            "seq": event.seq,
            "event": event.event.name.lower(),
            "rssi": event.rssi_dbm,
        }
        if event.battery_pct is not None:
            data["battery"] = event.battery_pct
        observations: list[Observation] = []
        if (kind := _OCCURRENCE_KINDS.get(event.event)) is not None:
            observations.append(
                Occurrence(
                    address=address,
                    kind=kind,
                    dedup_key=f"{address}:{event.seq}",
                    dedup_window_s=self.dedup_window_s,
                    data=data,
                )
            )
        elif (condition := _CONDITION_KINDS.get(event.event)) is not None:
            observations.append(Condition(address, condition, active=True, data=data))
        observations.append(
            LinkStatus(address, online=True, battery=event.battery_pct, rssi=event.rssi_dbm)
        )
        for observation in observations:
            await sink(observation)

    async def _check_timers(self, sink: ObservationSink) -> None:
        now = self._clock()
        if (
            self._receiver_offline is not True
            and now - self._receiver_last_heard >= self.receiver_offline_after_s
        ):
            self._receiver_offline = True
            silent = round(now - self._receiver_last_heard, 3)
            await sink(
                Condition(
                    RECEIVER_ADDRESS, ConditionKind.OFFLINE, active=True, data={"silent_s": silent}
                )
            )
            await sink(LinkStatus(RECEIVER_ADDRESS, online=False))
        for button_id in self._supervised:
            last = self._button_last_heard.get(button_id, now)
            if not self._button_offline.get(button_id) and now - last >= self.button_supervision_s:
                self._button_offline[button_id] = True
                address = button_address(button_id)
                silent = round(now - last, 3)
                await sink(
                    Condition(
                        address, ConditionKind.OFFLINE, active=True, data={"silent_s": silent}
                    )
                )
                await sink(LinkStatus(address, online=False))

    def counters_snapshot(self) -> dict[str, dict[str, int]]:
        return {"line": self.counters.as_dict()}

    # -- downlink --------------------------------------------------------------------

    async def execute(self, command: Command) -> None:
        """ACKNOWLEDGE (LED steady, "help is coming") or ALARM_RECEIVED (LED blinks)."""
        pattern = _ACK_PATTERNS.get(command.action)
        if pattern is None:
            raise CommandError(f"es-cb1 cannot {command.action}", recoverable=False)
        try:
            button_id = parse_button_address(command.address)
        except ValueError as exc:
            raise CommandError(str(exc), recoverable=False) from None
        frame = encode_acknowledge(button_id, pattern)
        async with self._write_lock:
            writer = self._writer
            if writer is None or writer.is_closing():
                raise CommandError(f"serial port {self.port} not open", recoverable=True)
            try:
                writer.write(frame)
                await writer.drain()
            except (OSError, ConnectionError) as exc:
                raise CommandError(f"write to {self.port} failed: {exc}", recoverable=True) from exc
