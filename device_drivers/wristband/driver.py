"""The `es-wb1` wristband reader: bleak scanner + GATT connections -> observations.

Layering: ``advert``/``gatt`` decode bytes (pure); this module owns time, state
and I/O. It touches only bleak's public API (``BleakScanner``, ``BleakClient``)
so the same code runs over BlueZ in production and over the project's bumble
backend in tests; the backend classes and their extra keyword arguments are
constructor parameters (``None`` = bleak's platform default).

Bleak callbacks (adverts, notifications, disconnects) only put items on one
queue or settle a future; a single consumer turns items into observations and
awaits the sink, so observations leave in order and with back-pressure.

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
    Condition,
    ConditionKind,
    DecodeError,
    LinkStatus,
    Observation,
    ObservationSink,
    Occurrence,
    OccurrenceKind,
    Reading,
    Scalar,
)
from device_drivers.wristband import gatt
from device_drivers.wristband.advert import (
    COMPANY_ID,
    WristbandAdvert,
    decode_advert,
    is_wristband_name,
    raw_has_alarm,
)

log = logging.getLogger(__name__)

PROFILE = "es-wb1"
DEDUP_WINDOW_S = 900.0  # > the 10 min an alarm flag may stay in adverts


def _reraise_lost_cancel() -> None:
    """Python 3.11's ``asyncio.wait_for`` (used inside bumble) can swallow a
    cancellation that races with completion; do not carry on as if connected."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def normalize_address(address: str) -> str:
    """The one address form this driver reports and accepts."""
    return address.strip().upper()


@dataclass(slots=True)
class WristbandStats:
    """Counters: nothing is dropped without showing up here."""

    adverts: int = 0
    adverts_shed: int = 0  # telemetry-only adverts dropped under backlog
    decode_errors: int = 0
    occurrences: int = 0
    alarm_notifications: int = 0  # Alarm Event values received over GATT
    duplicates_suppressed: int = 0  # repeats of an event already reported
    connects: int = 0  # connected and subscribed
    connect_failures: int = 0
    commands: int = 0


# Queue items: what the bleak callbacks and helper tasks hand to the consumer.
@dataclass(frozen=True, slots=True)
class _AdvertSeen:
    device: BLEDevice
    adv: AdvertisementData
    at: float  # monotonic


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
class _Band:
    """What the driver knows about one wristband."""

    address: str
    configured: bool
    device: BLEDevice | None = None
    last_heard: float | None = None  # monotonic
    heard: asyncio.Event = field(default_factory=asyncio.Event)
    online: bool | None = None  # None: not yet decided
    advert: WristbandAdvert | None = None
    rssi: int | None = None
    battery: int | None = None
    low_battery: bool | None = None
    flag_seq: dict[OccurrenceKind, str] = field(default_factory=dict)  # set flag -> dedup key
    emitted: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (value, t)
    status_at: float = float("-inf")
    client: BleakClient | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    warned_decode: bool = False


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
    ) -> None:
        """``addresses``: wristbands to keep connected and to watch for silence.

        Others are reported when heard and connected to only while in alarm.
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
        self.stats = WristbandStats()
        self._bands: dict[str, _Band] = {}
        self._seen_keys: dict[str, float] = {}  # dedup ledger: key -> monotonic time
        self._queue: asyncio.Queue[_Item] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._started_at = 0.0

    # ------------------------------------------------------------------ run
    async def run(self, sink: ObservationSink) -> None:
        """Scan, keep connections, emit observations; until cancelled."""
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        self._connect_lock = asyncio.Lock()
        self._started_at = time.monotonic()
        self._bands = {a: _Band(a, configured=True) for a in self._configured}
        scanner = BleakScanner(
            detection_callback=self._on_advert,
            backend=self._scanner_backend,
            **self._backend_kwargs,
        )
        await scanner.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for band in self._bands.values():
                    band.task = tasks.create_task(self._connection_loop(band))
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
        queue.put_nowait(_AdvertSeen(device, adv, time.monotonic()))

    def _notify_callback(
        self, address: str, queue: asyncio.Queue[_Item]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_notify(char: BleakGATTCharacteristic, data: bytearray) -> None:
            queue.put_nowait(_GattValue(address, char.uuid, bytes(data), from_read=False))

        return on_notify

    # ------------------------------------------------------- connections
    async def _connection_loop(self, band: _Band) -> None:
        """Keep one wristband connected and subscribed; reconnect with backoff."""
        delay = self.reconnect_delay_s
        dropped_at = float("-inf")
        while True:
            await self._wait_heard_since(band, dropped_at)
            dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            try:
                await self._connect(band, dropped)
                _reraise_lost_cancel()
                delay = self.reconnect_delay_s
                await dropped
                log.info("%s: disconnected", band.address)
            except asyncio.CancelledError:
                await self._disconnect(band)
                raise
            except Exception as exc:
                self.stats.connect_failures += 1
                log.warning("%s: connection failed: %r", band.address, exc)
                await self._disconnect(band)
            band.client = None
            band.connected.clear()
            dropped_at = time.monotonic()
            if not band.configured and not (band.advert and band.advert.alarm):
                band.task = None
                return  # joined for an alarm that is over
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay_s)

    async def _wait_heard_since(self, band: _Band, since: float) -> None:
        """Do not dial a wristband that is not advertising (no connect storms)."""
        while band.device is None or band.last_heard is None or band.last_heard < since:
            band.heard.clear()
            await band.heard.wait()

    async def _connect(self, band: _Band, dropped: asyncio.Future[None]) -> None:
        assert band.device is not None and self._connect_lock is not None
        queue = self._queue
        assert queue is not None

        def on_disconnect(_client: BleakClient) -> None:
            if not dropped.done():
                dropped.set_result(None)

        client = BleakClient(
            band.device,
            disconnected_callback=on_disconnect,
            timeout=self.connect_timeout_s,
            backend=self._client_backend,
            **self._backend_kwargs,
        )
        band.client = client
        async with self._connect_lock, asyncio.timeout(self.connect_timeout_s):
            await client.connect()  # most adapters handle one LE connect at a time
        callback = self._notify_callback(band.address, queue)
        await client.start_notify(gatt.ALARM_EVENT_UUID, callback)  # the one that matters
        for uuid in (gatt.BATTERY_LEVEL_UUID, gatt.HEART_RATE_MEASUREMENT_UUID):
            if client.services.get_characteristic(uuid) is not None:
                await client.start_notify(uuid, callback)
        for uuid in (gatt.ALARM_EVENT_UUID, gatt.BATTERY_LEVEL_UUID):
            if client.services.get_characteristic(uuid) is not None:
                data = bytes(await client.read_gatt_char(uuid))
                queue.put_nowait(_GattValue(band.address, uuid, data, from_read=True))
        queue.put_nowait(_LinkUp(band.address))
        self.stats.connects += 1
        band.connected.set()
        log.info("%s: connected and subscribed", band.address)

    async def _disconnect(self, band: _Band) -> None:
        client, band.client = band.client, None
        band.connected.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.connect_timeout_s):
                    await client.disconnect()

    def _ensure_connection(self, band: _Band) -> None:
        if band.task is None and self._tasks is not None:
            band.task = self._tasks.create_task(self._connection_loop(band))

    async def _ticker(self, queue: asyncio.Queue[_Item]) -> None:
        period = max(0.05, min(1.0, self.offline_after_s / 4))
        while True:
            await asyncio.sleep(period)
            queue.put_nowait(_Tick(time.monotonic()))

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
        band = self._band(address)
        self._ensure_connection(band)
        try:
            async with asyncio.timeout(self.command_timeout_s):
                await band.connected.wait()
                client = band.client
                if client is None or not client.is_connected:
                    raise ConnectionError("connection dropped")
                await client.write_gatt_char(gatt.COMMAND_UUID, payload, response=True)
        except Exception as exc:
            raise CommandError(
                f"{address}: {command.action} failed: {exc!r}", recoverable=True
            ) from exc
        self.stats.commands += 1
        log.info("%s: %s written (%s)", address, command.action, payload.hex())

    # ------------------------------------------------------------ decoding
    def _band(self, address: str) -> _Band:
        band = self._bands.get(address)
        if band is None:
            band = self._bands[address] = _Band(address, configured=False)
        return band

    def _handle(self, item: _Item) -> list[Observation]:
        if isinstance(item, _AdvertSeen):
            return self._handle_advert(item)
        if isinstance(item, _GattValue):
            return self._handle_gatt(item)
        if isinstance(item, _LinkUp):
            return self._heard(self._band(item.address), time.monotonic())
        return self._handle_tick(item)

    def _handle_advert(self, item: _AdvertSeen) -> list[Observation]:
        address = normalize_address(item.device.address)
        if not is_wristband_name(item.adv.local_name) and address not in self._bands:
            return []  # someone else's use of the test company id
        self.stats.adverts += 1
        band = self._band(address)
        try:
            advert = decode_advert(item.adv.manufacturer_data)
        except DecodeError as exc:
            self.stats.decode_errors += 1
            level = logging.DEBUG if band.warned_decode else logging.WARNING
            log.log(level, "%s: bad advert: %s", address, exc)
            band.warned_decode = True
            return []
        band.device = item.device
        band.rssi = item.adv.rssi
        band.advert = advert
        now = item.at
        out = self._advert_alarms(band, advert)  # alarms first: they are what is urgent
        out += self._battery(band, advert.battery, now, low=advert.battery_low)
        out += self._heard(band, now)
        out += self._readings(
            band,
            now,
            {
                "heart_rate_bpm": (advert.heart_rate, "bpm"),
                "spo2_pct": (advert.spo2, "%"),
                "steps": (advert.steps, "steps"),
                "activity": (advert.activity, "index"),
                "battery_pct": (advert.battery, "%"),
            },
        )
        band.heard.set()
        return out

    def _advert_alarms(self, band: _Band, advert: WristbandAdvert) -> list[Observation]:
        """SOS/fall flags -> occurrences, one per (address, event_seq).

        The advert carries one seq for possibly two set flags. A flag that rises
        alone takes the current seq. If both rise at once (first sighting) the
        SOS takes the seq and the fall gets a key "before <seq>": both alarms
        reach a person, at worst one twice, never none.
        """
        out: list[Observation] = []
        states = ((OccurrenceKind.SOS, advert.sos), (OccurrenceKind.FALL, advert.fall))
        for kind, active in states:
            if not active:
                band.flag_seq.pop(kind, None)
            elif kind in band.flag_seq:
                self.stats.duplicates_suppressed += 1  # the flag repeats in every advert
        new = [kind for kind, active in states if active and kind not in band.flag_seq]
        current_key = self._alarm_key(band.address, advert.event_seq)
        taken = current_key in band.flag_seq.values()
        for kind in new:
            key = current_key if not taken else f"{current_key}:{kind}-before"
            taken = True
            band.flag_seq[kind] = key
            out += self._occurrence(
                band, kind, key, None, {"event_seq": advert.event_seq, "source": "advert"}
            )
        if new and not band.configured:
            self._ensure_connection(band)  # join to get the event and to acknowledge
        return out

    def _handle_gatt(self, item: _GattValue) -> list[Observation]:
        band = self._band(item.address)
        now = time.monotonic()
        try:
            if item.uuid == gatt.ALARM_EVENT_UUID:
                event = gatt.decode_alarm_event(item.data)
                self.stats.alarm_notifications += not item.from_read
                return self._alarm_event(band, event, item) + self._heard(band, now)
            if item.uuid == gatt.BATTERY_LEVEL_UUID:
                level = gatt.decode_battery_level(item.data)
                out = self._battery(band, level, now, low=None) + self._heard(band, now)
                return out + self._readings(band, now, {"battery_pct": (level, "%")}, force=True)
            if item.uuid == gatt.HEART_RATE_MEASUREMENT_UUID:
                hr = gatt.decode_heart_rate(item.data)
                out = self._heard(band, now)
                return out + self._readings(band, now, {"heart_rate_bpm": (hr.bpm or None, "bpm")})
        except DecodeError as exc:
            if item.from_read and item.data == bytes(len(item.data)):
                return []  # all zero: no alarm event yet
            self.stats.decode_errors += 1
            log.warning("%s: bad %s value %s: %s", band.address, item.uuid, item.data.hex(), exc)
        return []

    def _alarm_event(
        self, band: _Band, event: gatt.AlarmEvent, item: _GattValue
    ) -> list[Observation]:
        data: dict[str, Scalar] = {
            "event_seq": event.event_seq,
            "source": "gatt",
            "confidence": event.confidence,
        }
        kind = {
            gatt.AlarmType.SOS: OccurrenceKind.SOS,
            gatt.AlarmType.FALL: OccurrenceKind.FALL,
            gatt.AlarmType.CANCEL: OccurrenceKind.CANCEL,
            gatt.AlarmType.REMOVED: OccurrenceKind.REMOVED,
            gatt.AlarmType.GEOFENCE_EXIT: OccurrenceKind.GEOFENCE_EXIT,
        }[event.type]
        if kind in (OccurrenceKind.SOS, OccurrenceKind.FALL):
            if item.from_read:
                # The last event, read at connect: an alarm only if the adverts
                # still show it; otherwise it is history, not a new call for help.
                advert = band.advert
                flag = advert is not None and (
                    advert.sos if kind is OccurrenceKind.SOS else advert.fall
                )
                if not (flag and advert is not None and advert.event_seq == event.event_seq):
                    return []
            key = self._alarm_key(band.address, event.event_seq)
            if band.flag_seq.get(kind) == key:
                self.stats.duplicates_suppressed += 1
                return []
            band.flag_seq[kind] = key
        elif item.from_read:
            return []  # cancel/removed/geofence are pulses: only live notifications count
        else:
            key = f"{self._alarm_key(band.address, event.event_seq)}:{kind}:{event.time}"
            if kind is OccurrenceKind.CANCEL:
                band.flag_seq.clear()
        return self._occurrence(band, kind, key, float(event.time), data)

    @staticmethod
    def _alarm_key(address: str, event_seq: int) -> str:
        return f"{PROFILE}:{address}:{event_seq}"

    def _occurrence(
        self,
        band: _Band,
        kind: OccurrenceKind,
        key: str,
        occurred_at: float | None,
        data: dict[str, Scalar],
    ) -> list[Observation]:
        now = time.monotonic()
        seen = self._seen_keys.get(key)
        if seen is not None and now - seen < self.dedup_window_s:
            self.stats.duplicates_suppressed += 1
            return []
        self._seen_keys[key] = now
        self.stats.occurrences += 1
        log.info("%s: %s (%s)", band.address, kind, key)
        return [Occurrence(band.address, kind, key, self.dedup_window_s, occurred_at, data)]

    def _readings(
        self,
        band: _Band,
        now: float,
        values: Mapping[str, tuple[int | None, str]],
        *,
        force: bool = False,
    ) -> list[Observation]:
        """Telemetry on change (at most every min gap) and refreshed periodically."""
        out: list[Observation] = []
        for metric, (value, unit) in values.items():
            if value is None:
                continue
            last = band.emitted.get(metric)
            if last is not None and not force:
                last_value, last_at = last
                age = now - last_at
                changed = last_value != value
                if not (changed and age >= self.reading_min_gap_s) and age < self.reading_refresh_s:
                    continue
            band.emitted[metric] = (float(value), now)
            out.append(Reading(band.address, metric, float(value), unit))
        return out

    def _battery(
        self, band: _Band, level: int | None, now: float, *, low: bool | None
    ) -> list[Observation]:
        """Battery level into the link status, battery-low flag into a condition.

        Called before ``_heard``: a wristband coming online gets its status
        from there, already carrying the new level.
        """
        out: list[Observation] = []
        changed = level is not None and level != band.battery
        if level is not None:
            band.battery = level
        refresh = changed or now - band.status_at >= self.reading_refresh_s
        if band.online is True and refresh:
            band.status_at = now
            out.append(LinkStatus(band.address, True, band.battery, band.rssi))
        if low is not None and low != band.low_battery:
            band.low_battery = low
            data: dict[str, Scalar] = {} if band.battery is None else {"battery_pct": band.battery}
            out.append(Condition(band.address, ConditionKind.LOW_BATTERY, low, data))
        return out

    def _heard(self, band: _Band, now: float) -> list[Observation]:
        band.last_heard = now
        if band.online is True:
            return []
        band.online = True
        band.status_at = now
        out: list[Observation] = [LinkStatus(band.address, True, band.battery, band.rssi)]
        if band.configured:
            out.append(Condition(band.address, ConditionKind.OFFLINE, False))
        return out

    def _handle_tick(self, tick: _Tick) -> list[Observation]:
        out: list[Observation] = []
        now = tick.at
        for key, at in list(self._seen_keys.items()):
            if now - at >= self.dedup_window_s:
                del self._seen_keys[key]
        for band in list(self._bands.values()):
            if band.client is not None and band.client.is_connected:
                band.last_heard = now  # a live link is supervised by the controller
                continue
            heard = band.last_heard if band.last_heard is not None else self._started_at
            silent = now - heard
            if silent < self.offline_after_s or band.online is False:
                continue
            if band.configured:
                band.online = False
                out.append(LinkStatus(band.address, False, band.battery, band.rssi))
                out.append(
                    Condition(
                        band.address, ConditionKind.OFFLINE, True, {"silent_s": round(silent, 1)}
                    )
                )
            elif silent >= max(self.offline_after_s, self.dedup_window_s) and band.task is None:
                del self._bands[band.address]  # a passer-by: forget it
        return out
