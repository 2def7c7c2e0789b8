"""The wristband driver against a simulated wristband through a real software BLE stack.

bleak's public API -> the project's bumble backend -> a bumble central controller
-> LocalLink -> the simulated wristband's controller and GATT server. Nothing is
mocked: adverts are link-layer PDUs, commands are ATT writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from bleak import BleakScanner
from bumble.link import LocalLink
from support import until as eventually

from device_drivers.ble.bumble_backend import BumbleCentral, BumbleClient, BumbleScanner
from device_drivers.model import (
    Command,
    CommandAction,
    CommandError,
    Condition,
    ConditionKind,
    LinkStatus,
    Observation,
    Occurrence,
    OccurrenceKind,
    Reading,
)
from device_drivers.wristband import WristbandDriver
from simulators.wristband import FALL, SOS, SimulatedWristband

pytestmark = pytest.mark.timeout(60)

ADDRESS = "C0:4E:57:00:12:34"
FAST_MS = 20.0
REPO_ROOT = (
    Path(__file__).resolve().parents[2]
)  # advertising interval in tests (a real band: 1 s, 100 ms in alarm)


class Collected:
    """A sink that keeps everything and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.items: list[Observation] = []
        self._changed = asyncio.Event()

    async def sink(self, observation: Observation) -> None:
        self.items.append(observation)
        self._changed.set()

    def of(self, kind: type[Observation]) -> list[Observation]:
        return [o for o in self.items if isinstance(o, kind)]

    async def wait_for(
        self, predicate: Callable[[Observation], bool], within: float = 5.0, since: int = 0
    ) -> Observation:
        async with asyncio.timeout(within):
            while True:
                for observation in self.items[since:]:
                    if predicate(observation):
                        return observation
                self._changed.clear()
                await self._changed.wait()


class Rig:
    def __init__(self, link: LocalLink, band: SimulatedWristband, central: BumbleCentral) -> None:
        self.link, self.band, self.central = link, band, central
        self.seen = Collected()

    def driver(self, addresses: tuple[str, ...] = (ADDRESS,), **kwargs: float) -> WristbandDriver:
        options: dict[str, float] = {
            "reading_min_gap_s": 0.0,
            "reconnect_delay_s": 0.05,
            "connect_timeout_s": 2.0,
            "command_timeout_s": 3.0,
        }
        options.update(kwargs)
        return WristbandDriver(
            addresses,
            scanner_backend=BumbleScanner,
            client_backend=BumbleClient,
            backend_kwargs=self.central.bleak_kwargs(),
            **options,  # type: ignore[arg-type]
        )

    @contextlib.asynccontextmanager
    async def running(self, driver: WristbandDriver) -> AsyncIterator[WristbandDriver]:
        task = asyncio.create_task(driver.run(self.seen.sink))
        try:
            yield driver
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_connected(self, driver: WristbandDriver, connects: int = 1) -> None:
        """Until the driver has connected and subscribed ``connects`` times."""
        async with asyncio.timeout(5):
            while driver.stats.connects < connects or not self.band.device.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # no event to wait on across two stacks


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """A fresh link, wristband and central per test: bumble objects are loop-bound."""
    link = LocalLink()  # type: ignore[no-untyped-call]
    band = SimulatedWristband(
        link,
        address=ADDRESS,
        advertising_interval_ms=FAST_MS,
        alarm_advertising_interval_ms=FAST_MS,
    )
    central = BumbleCentral.on_link(link)
    await band.start()
    yield Rig(link, band, central)
    await band.stop()
    await central.close()


def is_occurrence(kind: OccurrenceKind) -> Callable[[Observation], bool]:
    return lambda o: isinstance(o, Occurrence) and o.kind is kind


def occurrences(seen: Collected, kind: OccurrenceKind) -> list[Occurrence]:
    return [o for o in seen.items if isinstance(o, Occurrence) and o.kind is kind]


async def test_plain_bleak_scanner_sees_the_wristband(rig: Rig) -> None:
    async with BleakScanner(backend=BumbleScanner, **rig.central.bleak_kwargs()) as scanner:
        device, adv = await anext(
            (d, a) async for d, a in scanner.advertisement_data() if d.address == ADDRESS
        )
    assert adv.local_name == "ES-WB1-1234"
    assert adv.manufacturer_data == {0xFFFF: bytes.fromhex("01 04 00 48 62 55 0000 00")}
    assert device.name == "ES-WB1-1234"


async def test_scan_reports_readings_and_status(rig: Rig) -> None:
    await rig.band.set_telemetry(steps=4321, activity=17)
    async with rig.running(rig.driver()):
        seen = rig.seen
        for expected in [
            Reading(ADDRESS, "heart_rate_bpm", 72, "bpm"),
            Reading(ADDRESS, "spo2_pct", 98, "%"),
            Reading(ADDRESS, "steps", 4321, "steps"),
            Reading(ADDRESS, "activity", 17, "index"),
            Reading(ADDRESS, "battery_pct", 85, "%"),
        ]:
            await seen.wait_for(lambda o, r=expected: o == r)  # type: ignore[misc]
        await seen.wait_for(lambda o: o == Condition(ADDRESS, ConditionKind.OFFLINE, False))
        await seen.wait_for(lambda o: o == LinkStatus(ADDRESS, True, 85, -50))
        await seen.wait_for(
            lambda o: o == Condition(ADDRESS, ConditionKind.LOW_BATTERY, False, {"battery_pct": 85})
        )

        await rig.band.set_heart_rate(131)
        await rig.band.set_battery(12)  # below 20 %: flag bit 4
        await seen.wait_for(lambda o: o == Reading(ADDRESS, "heart_rate_bpm", 131, "bpm"))
        await seen.wait_for(
            lambda o: o == Condition(ADDRESS, ConditionKind.LOW_BATTERY, True, {"battery_pct": 12})
        )
        await seen.wait_for(lambda o: o == LinkStatus(ADDRESS, True, 12, -50))
    assert not rig.seen.of(Occurrence)


async def test_fall_is_one_occurrence_across_adverts_and_gatt(rig: Rig) -> None:
    async with rig.running(rig.driver()) as driver:
        await rig.wait_connected(driver)
        before = driver.stats.adverts
        seq = await rig.band.fall(confidence=87)
        # Many adverts carrying the flag, and the notification, all seen and suppressed.
        await eventually(
            lambda: driver.stats.adverts - before >= 10
            and driver.stats.alarm_notifications == 1
            and driver.stats.duplicates_suppressed >= 10
        )

        falls = occurrences(rig.seen, OccurrenceKind.FALL)
        assert len(falls) == 1
        (fall,) = falls
        assert fall.address == ADDRESS
        assert fall.dedup_key == f"es-wb1:{ADDRESS}:{seq}"
        assert fall.dedup_window_s == 900.0
        assert fall.data["event_seq"] == seq
        assert driver.stats.adverts - before >= 10
        assert driver.stats.alarm_notifications == 1
        assert driver.stats.duplicates_suppressed >= 10
        assert not occurrences(rig.seen, OccurrenceKind.SOS)

        # A second, new event is a new occurrence.
        seq2 = await rig.band.press_sos()
        sos = await rig.seen.wait_for(is_occurrence(OccurrenceKind.SOS))
        assert isinstance(sos, Occurrence) and sos.dedup_key == f"es-wb1:{ADDRESS}:{seq2}"
        repeats = driver.stats.duplicates_suppressed
        await eventually(lambda: driver.stats.duplicates_suppressed >= repeats + 5)
        assert len(occurrences(rig.seen, OccurrenceKind.SOS)) == 1
        assert len(occurrences(rig.seen, OccurrenceKind.FALL)) == 1


async def test_acknowledge_reaches_the_wristband_and_clears_the_flag(rig: Rig) -> None:
    async with rig.running(rig.driver()) as driver:
        await rig.wait_connected(driver)
        seq = await rig.band.press_sos()
        await rig.seen.wait_for(is_occurrence(OccurrenceKind.SOS))

        await driver.execute(Command(ADDRESS.lower(), CommandAction.ACKNOWLEDGE))
        assert [c.data for c in rig.band.commands] == [b"\x01"]
        assert not rig.band.flags & (SOS | FALL)

        # Every receiver now hears the flag cleared, same event_seq.
        async with BleakScanner(backend=BumbleScanner, **rig.central.bleak_kwargs()) as scanner:
            payload = await anext(
                a.manufacturer_data[0xFFFF]
                async for d, a in scanner.advertisement_data()
                if d.address == ADDRESS and not a.manufacturer_data[0xFFFF][1] & 0x03
            )
        assert payload[2] == seq

        await driver.execute(Command(ADDRESS, CommandAction.LOCATE))
        await driver.execute(
            Command(ADDRESS, CommandAction.SET_CLOCK, {"unix_seconds": 1_700_786_304})
        )
        assert [c.data for c in rig.band.commands] == [
            b"\x01",
            b"\x02",
            bytes.fromhex("0380f05f65"),
        ]
        assert rig.band.locating
        assert abs(rig.band.now() - 1_700_786_304) < 5
        with pytest.raises(CommandError) as excinfo:
            await driver.execute(Command(ADDRESS, CommandAction.HUSH))
        assert not excinfo.value.recoverable


async def test_unconfigured_wristband_in_alarm_is_joined_and_can_be_acknowledged(
    rig: Rig,
) -> None:
    async with rig.running(rig.driver(addresses=())) as driver:
        await rig.seen.wait_for(lambda o: isinstance(o, Reading))
        assert driver.stats.connects == 0  # not configured, no alarm: only listened to
        await rig.band.press_sos()
        await rig.seen.wait_for(is_occurrence(OccurrenceKind.SOS))
        await driver.execute(Command(ADDRESS, CommandAction.ACKNOWLEDGE))
        assert rig.band.commands[-1].data == b"\x01"
        offline = [
            o for o in rig.seen.items if isinstance(o, Condition) and o.kind == "device_offline"
        ]
        assert not offline  # silence is only watched for configured wristbands


async def test_cancel_removed_and_geofence_from_gatt(rig: Rig) -> None:
    async with rig.running(rig.driver()) as driver:
        await rig.wait_connected(driver)
        seq = await rig.band.press_sos()
        await rig.band.cancel()
        cancel = await rig.seen.wait_for(is_occurrence(OccurrenceKind.CANCEL))
        assert isinstance(cancel, Occurrence)
        assert cancel.data["event_seq"] == seq
        assert cancel.dedup_key.startswith(f"es-wb1:{ADDRESS}:{seq}:cancel:")
        assert cancel.occurred_at is not None and abs(cancel.occurred_at - time.time()) < 5
        await rig.band.remove_from_wrist()
        await rig.band.leave_geofence()
        for kind in (OccurrenceKind.REMOVED, OccurrenceKind.GEOFENCE_EXIT):
            await rig.seen.wait_for(is_occurrence(kind))
        assert len(occurrences(rig.seen, OccurrenceKind.SOS)) == 1


async def test_silent_wristband_goes_offline_and_comes_back(rig: Rig) -> None:
    never_heard = "C0:4E:57:00:99:99"
    async with rig.running(rig.driver((ADDRESS, never_heard), offline_after_s=0.3)) as driver:
        await rig.wait_connected(driver)
        await rig.seen.wait_for(lambda o: o == Condition(ADDRESS, ConditionKind.OFFLINE, False))
        await rig.seen.wait_for(
            lambda o: isinstance(o, Condition) and o.address == never_heard and o.active
        )

        await rig.band.go_silent()  # out of range: adverts stop, the link drops
        t0 = time.monotonic()
        offline = await rig.seen.wait_for(
            lambda o: isinstance(o, Condition) and o.address == ADDRESS and o.active
        )
        assert offline == Condition(ADDRESS, ConditionKind.OFFLINE, True, offline.data)  # type: ignore[union-attr]
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert LinkStatus(ADDRESS, False, 85, -50) in rig.seen.items

        n = len(rig.seen.items)
        await rig.band.resume()
        await rig.seen.wait_for(
            lambda o: o == Condition(ADDRESS, ConditionKind.OFFLINE, False), since=n
        )
        await rig.wait_connected(driver, connects=2)  # and it reconnects


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_across_processes_over_a_tcp_hci_transport() -> None:
    """The demo layout: wristbands in one process, the driver in another."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "simulators.wristband"),
        *("--expose", f"tcp-server:127.0.0.1:{port}", "--interval-ms", "20", "--sos-after", "1"),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    central = await BumbleCentral.open(f"tcp-client:127.0.0.1:{port}")
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        seen = Collected()
        address = "C0:4E:57:00:00:01"
        driver = WristbandDriver(
            [address],
            scanner_backend=BumbleScanner,
            client_backend=BumbleClient,
            backend_kwargs=central.bleak_kwargs(),
        )
        task = asyncio.create_task(driver.run(seen.sink))
        try:
            await seen.wait_for(lambda o: o == Reading(address, "heart_rate_bpm", 72, "bpm"))
            await seen.wait_for(is_occurrence(OccurrenceKind.SOS), within=8)
            await driver.execute(Command(address, CommandAction.ACKNOWLEDGE))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await central.close()
    finally:
        proc.terminate()
        await proc.wait()
