"""The `es-wb1` wristband reader's BLE side: bleak scanner + GATT connections.

Layering: ``advert``/``gatt`` decode bytes (pure); ``state`` is the alarm state
machine (dedup, telemetry pacing, silence), driven by the injected clock; this
module owns the I/O. It touches only bleak's public API (``BleakScanner``,
``BleakClient``) so the same code runs over BlueZ in production and over the
project's bumble backend (``device_drivers.ble``); the backend classes and their
extra keyword arguments are constructor parameters (``None`` = bleak's default).

Bleak callbacks (adverts, notifications, disconnects) only put items on one
queue or settle a future; a single consumer hands items to the state machine
and awaits the sink, so observations leave in order and with back-pressure.

Addresses: ``BLEDevice.address`` upper-cased (``AA:BB:CC:DD:EE:FF`` as BlueZ
reports it; a UUID on macOS). Configured addresses are normalised the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner

from device_drivers.model import (
    Command,
    CommandAction,
    CommandError,
    Observation,
    ObservationSink,
)
from device_drivers.wristband import gatt
from device_drivers.wristband.advert import COMPANY_ID, raw_has_alarm
from device_drivers.wristband.state import (
    DEDUP_WINDOW_S,
    PROFILE,
    WristbandStats,
    WristbandTracker,
    normalize_address,
)

__all__ = ["DEDUP_WINDOW_S", "WristbandDriver", "WristbandStats", "normalize_address"]

log = logging.getLogger(__name__)


def _reraise_lost_cancel() -> None:
    """Python 3.11's ``asyncio.wait_for`` (used inside bumble) can swallow a
    cancellation that races with completion; do not carry on as if connected."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# Queue items: what the bleak callbacks and helper tasks hand to the consumer.
@dataclass(frozen=True, slots=True)
class _AdvertSeen:
    device: BLEDevice
    adv: AdvertisementData
    at: float  # clock time


@dataclass(frozen=True, slots=True)
class _GattValue:
    address: str
    uuid: str
    data: bytes
    from_read: bool  # read at connect time, not a notification


@dataclass(frozen=True, slots=True)
class _Tick:
    at: float


@dataclass(frozen=True, slots=True)
class _LinkUp:
    address: str


_Item = _AdvertSeen | _GattValue | _Tick | _LinkUp


@dataclass(slots=True)
class _Link:
    """The BLE side of one wristband: where it was last heard, its connection."""

    address: str
    device: BLEDevice | None = None
    last_advert: float | None = None  # clock time
    heard: asyncio.Event = field(default_factory=asyncio.Event)
    client: BleakClient | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class WristbandDriver:
    """Reads `es-wb1` wristbands over BLE; implements the ``Driver`` protocol."""

    def __init__(
        self,
        addresses: Iterable[str] = (),
        *,
        scanner_backend: type[BaseBleakScanner] | None = None,
        client_backend: type[BaseBleakClient] | None = None,
        backend_kwargs: Mapping[str, Any] | None = None,
        offline_after_s: float = 300.0,
        dedup_window_s: float = DEDUP_WINDOW_S,
        connect_timeout_s: float = 10.0,
        reconnect_delay_s: float = 1.0,
        max_reconnect_delay_s: float = 30.0,
        command_timeout_s: float = 10.0,
        reading_min_gap_s: float = 5.0,
        reading_refresh_s: float = 60.0,
        max_backlog: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        stats: WristbandStats | None = None,
    ) -> None:
        """``addresses``: wristbands to keep connected and to watch for silence.

        Others are reported when heard and connected to only while in alarm.
        ``stats`` lets a wrapper keep the counters across runs.
        """
        self._configured = [normalize_address(a) for a in addresses]
        self._scanner_backend = scanner_backend
        self._client_backend = client_backend
        self._backend_kwargs = dict(backend_kwargs or {})
        self.offline_after_s = offline_after_s
        self.dedup_window_s = dedup_window_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_delay_s = reconnect_delay_s
        self.max_reconnect_delay_s = max_reconnect_delay_s
        self.command_timeout_s = command_timeout_s
        self.reading_min_gap_s = reading_min_gap_s
        self.reading_refresh_s = reading_refresh_s
        self.max_backlog = max_backlog
        self._clock = clock
        self.stats = stats if stats is not None else WristbandStats()
        self._tracker = self._new_tracker()
        self._links: dict[str, _Link] = {}
        self._queue: asyncio.Queue[_Item] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._connect_lock: asyncio.Lock | None = None

    def _new_tracker(self) -> WristbandTracker:
        return WristbandTracker(
            self._configured,
            offline_after_s=self.offline_after_s,
            dedup_window_s=self.dedup_window_s,
            reading_min_gap_s=self.reading_min_gap_s,
            reading_refresh_s=self.reading_refresh_s,
            stats=self.stats,
            started_at=self._clock(),
        )

    def counters_snapshot(self) -> dict[str, dict[str, int]]:
        return {"line": self.stats.as_dict()}

    # ------------------------------------------------------------------ run
    async def run(self, sink: ObservationSink) -> None:
        """Scan, keep connections, emit observations; until cancelled."""
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        self._connect_lock = asyncio.Lock()
        self._tracker.restart(self._clock())
        self._links = {a: _Link(a) for a in self._configured}
        scanner = BleakScanner(
            detection_callback=self._on_advert,
            backend=self._scanner_backend,
            **self._backend_kwargs,
        )
        await scanner.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for link in self._links.values():
                    link.task = tasks.create_task(self._connection_loop(link))
                tasks.create_task(self._ticker(queue))
                while True:
                    item = await queue.get()
                    for observation in self._handle(item):
                        await sink(observation)
        finally:
            self._tasks = None
            self._queue = None
            with contextlib.suppress(Exception):
                await scanner.stop()

    # ------------------------------------------------------ bleak callbacks
    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """Bleak detection callback: triage and enqueue, nothing else."""
        queue = self._queue
        payload = adv.manufacturer_data.get(COMPANY_ID)
        if queue is None or payload is None:
            return
        if queue.qsize() >= self.max_backlog and not raw_has_alarm(payload):
            self.stats.adverts_shed += 1  # telemetry only; a newer advert will follow
            return
        queue.put_nowait(_AdvertSeen(device, adv, self._clock()))

    def _notify_callback(
        self, address: str, queue: asyncio.Queue[_Item]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_notify(char: BleakGATTCharacteristic, data: bytearray) -> None:
            queue.put_nowait(_GattValue(address, char.uuid, bytes(data), from_read=False))

        return on_notify

    # ------------------------------------------------------- connections
    async def _connection_loop(self, link: _Link) -> None:
        """Keep one wristband connected and subscribed; reconnect with backoff."""
        delay = self.reconnect_delay_s
        dropped_at = float("-inf")
        while True:
            await self._wait_heard_since(link, dropped_at)
            dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            try:
                await self._connect(link, dropped)
                _reraise_lost_cancel()
                delay = self.reconnect_delay_s
                await dropped
                log.info("%s: disconnected", link.address)
            except asyncio.CancelledError:
                await self._disconnect(link)
                raise
            except Exception as exc:
                self.stats.connect_failures += 1
                log.warning("%s: connection failed: %r", link.address, exc)
                await self._disconnect(link)
            link.client = None
            link.connected.clear()
            self._tracker.set_link(link.address, False)
            dropped_at = self._clock()
            if not self._tracker.wants_connection(link.address):
                link.task = None
                return  # joined for an alarm that is over
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay_s)

    async def _wait_heard_since(self, link: _Link, since: float) -> None:
        """Do not dial a wristband that is not advertising (no connect storms)."""
        while link.device is None or link.last_advert is None or link.last_advert < since:
            link.heard.clear()
            await link.heard.wait()

    async def _connect(self, link: _Link, dropped: asyncio.Future[None]) -> None:
        assert link.device is not None and self._connect_lock is not None
        queue = self._queue
        assert queue is not None

        def on_disconnect(_client: BleakClient) -> None:
            if not dropped.done():
                dropped.set_result(None)

        client = BleakClient(
            link.device,
            disconnected_callback=on_disconnect,
            timeout=self.connect_timeout_s,
            backend=self._client_backend,
            **self._backend_kwargs,
        )
        link.client = client
        async with self._connect_lock, asyncio.timeout(self.connect_timeout_s):
            await client.connect()  # most adapters handle one LE connect at a time
        callback = self._notify_callback(link.address, queue)
        await client.start_notify(gatt.ALARM_EVENT_UUID, callback)  # the one that matters
        for uuid in (gatt.BATTERY_LEVEL_UUID, gatt.HEART_RATE_MEASUREMENT_UUID):
            if client.services.get_characteristic(uuid) is not None:
                await client.start_notify(uuid, callback)
        for uuid in (gatt.ALARM_EVENT_UUID, gatt.BATTERY_LEVEL_UUID):
            if client.services.get_characteristic(uuid) is not None:
                data = bytes(await client.read_gatt_char(uuid))
                queue.put_nowait(_GattValue(link.address, uuid, data, from_read=True))
        queue.put_nowait(_LinkUp(link.address))
        self.stats.connects += 1
        link.connected.set()
        log.info("%s: connected and subscribed", link.address)

    async def _disconnect(self, link: _Link) -> None:
        client, link.client = link.client, None
        link.connected.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.connect_timeout_s):
                    await client.disconnect()

    def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(address)
        return link

    def _ensure_connection(self, link: _Link) -> None:
        if link.task is None and self._tasks is not None:
            link.task = self._tasks.create_task(self._connection_loop(link))

    async def _ticker(self, queue: asyncio.Queue[_Item]) -> None:
        period = max(0.05, min(1.0, self.offline_after_s / 4))
        while True:
            await asyncio.sleep(period)
            queue.put_nowait(_Tick(self._clock()))

    # ------------------------------------------------------------- execute
    async def execute(self, command: Command) -> None:
        """Write a command to the wristband's Command characteristic."""
        if command.action is CommandAction.ACKNOWLEDGE:
            payload = gatt.encode_acknowledge()
        elif command.action is CommandAction.LOCATE:
            payload = gatt.encode_locate()
        elif command.action is CommandAction.SET_CLOCK:
            when = command.args.get("unix_seconds", time.time())
            try:
                payload = gatt.encode_set_clock(int(when))
            except (TypeError, ValueError) as exc:
                raise CommandError(f"set_clock: bad time {when!r}", recoverable=False) from exc
        else:
            raise CommandError(f"{PROFILE} cannot {command.action}", recoverable=False)
        if self._queue is None:
            raise CommandError("wristband driver is not running", recoverable=True)
        address = normalize_address(command.address)
        self._tracker.band(address)
        link = self._link(address)
        self._ensure_connection(link)
        try:
            async with asyncio.timeout(self.command_timeout_s):
                await link.connected.wait()
                client = link.client
                if client is None or not client.is_connected:
                    raise ConnectionError("connection dropped")
                await client.write_gatt_char(gatt.COMMAND_UUID, payload, response=True)
        except Exception as exc:
            raise CommandError(
                f"{address}: {command.action} failed: {exc!r}", recoverable=True
            ) from exc
        self.stats.commands += 1
        log.info("%s: %s written (%s)", address, command.action, payload.hex())

    # ------------------------------------------------- into the state machine
    def _handle(self, item: _Item) -> list[Observation]:
        tracker = self._tracker
        if isinstance(item, _AdvertSeen):
            address = normalize_address(item.device.address)
            out = tracker.advert(
                address, item.adv.local_name, item.adv.manufacturer_data, item.adv.rssi, item.at
            )
            if out is None:
                return []
            link = self._link(address)
            link.device = item.device
            link.last_advert = item.at
            link.heard.set()
            if tracker.wants_connection(address):
                self._ensure_connection(link)  # a stranger in alarm: join to acknowledge
            return out
        if isinstance(item, _GattValue):
            return tracker.gatt_value(
                item.address, item.uuid, item.data, from_read=item.from_read, now=self._clock()
            )
        if isinstance(item, _LinkUp):
            tracker.set_link(item.address, True)
            return tracker.heard(item.address, self._clock())
        busy = {a for a, link in self._links.items() if link.task is not None}
        out = tracker.tick(item.at, busy=busy)
        for address in set(self._links) - set(tracker.bands):
            del self._links[address]
        return out
