"""es-cb1 end to end: simulator on a real pty -> pyserial-asyncio-fast -> driver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import ObservationCollector
from support import until as eventually

from device_drivers.callbutton.driver import CallButtonReceiverDriver
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
)
from simulators.callbutton_receiver import AckRecord, CallButtonReceiverSimulator

BUTTON = 0x0001E240
ADDR = "0001e240"
OTHER = 0x00ABCDEF

pytestmark = pytest.mark.timeout(20)


class Collector(ObservationCollector):
    def of(self, cls: type[Any], **attrs: Any) -> list[Any]:
        return [
            o
            for o in self.items
            if isinstance(o, cls) and all(getattr(o, k) == v for k, v in attrs.items())
        ]


@contextlib.asynccontextmanager
async def running(
    sim: CallButtonReceiverSimulator, **kw: Any
) -> AsyncIterator[tuple[CallButtonReceiverDriver, Collector, asyncio.Task[None]]]:
    driver = CallButtonReceiverDriver(sim.slave_path, **kw)
    sink = Collector()
    task = asyncio.create_task(driver.run(sink))
    await asyncio.wait_for(driver.connected.wait(), 3)
    try:
        yield driver, sink, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task


@pytest.fixture
async def sim() -> AsyncIterator[CallButtonReceiverSimulator]:
    simulator = CallButtonReceiverSimulator(status_interval_s=5.0, seed=1)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def is_occ(kind: OccurrenceKind, address: str) -> Callable[[Observation], bool]:
    return lambda o: isinstance(o, Occurrence) and o.kind == kind and o.address == address


async def test_three_repeats_are_one_sos(sim: CallButtonReceiverSimulator) -> None:
    sim.add_button(BUTTON, battery=87, rssi=-61)
    async with running(sim) as (driver, sink, _):
        seq = await sim.press(BUTTON)
        # A later event from another button proves the repeats were all read.
        await sim.supervision(OTHER, repeats=1)
        await sink.wait_for(is_occ(OccurrenceKind.SUPERVISION, "00abcdef"))
        assert sink.of(Occurrence, address=ADDR) == [
            Occurrence(
                address=ADDR,
                kind=OccurrenceKind.SOS,
                dedup_key=f"{ADDR}:{seq}",
                dedup_window_s=60.0,
                data={"seq": seq, "event": "press", "rssi": -61, "battery": 87},
            )
        ]
        assert sink.of(LinkStatus, address=ADDR) == [LinkStatus(ADDR, True, 87, -61)]
        assert driver.counters.duplicates == 2
        assert driver.counters.frames == 4
        # The receiver spoke: it is reported online.
        assert sink.of(Condition, address="receiver") == [
            Condition("receiver", ConditionKind.OFFLINE, active=False)
        ]


async def test_a_new_press_is_a_new_sos(sim: CallButtonReceiverSimulator) -> None:
    async with running(sim) as (_, sink, _task):
        first = await sim.press(BUTTON)
        second = await sim.press(BUTTON)
        await sink.wait_for(lambda o: isinstance(o, Occurrence) and o.data["seq"] == second)
        keys = [o.dedup_key for o in sink.of(Occurrence, kind=OccurrenceKind.SOS)]
        assert keys == [f"{ADDR}:{first}", f"{ADDR}:{second}"]


async def test_other_button_events(sim: CallButtonReceiverSimulator) -> None:
    sim.add_button(BUTTON, battery=15, rssi=-80)
    async with running(sim) as (_, sink, _task):
        await sim.low_battery(BUTTON)
        await sim.tamper(BUTTON)
        cancel_seq = await sim.cancel(BUTTON)
        await sink.wait_for(is_occ(OccurrenceKind.CANCEL, ADDR))
        assert [(c.kind, c.active) for c in sink.of(Condition, address=ADDR)] == [
            (ConditionKind.LOW_BATTERY, True),
            (ConditionKind.TAMPER, True),
        ]
        cancel = sink.of(Occurrence, address=ADDR)[0]
        assert cancel.dedup_key == f"{ADDR}:{cancel_seq}"


async def test_noise_and_corrupt_frames_are_counted_and_skipped(
    sim: CallButtonReceiverSimulator,
) -> None:
    async with running(sim) as (driver, sink, _):
        await sim.inject_noise(b"\x00\xff\x13\x37\x55\xaa\x00\x42")
        for kind in ("cut", "bad_crc", "unknown_type", "bad_length"):
            await sim.inject_corrupt_frame(kind)
        await sim.inject_noise(length=64)
        await sim.send_event(OTHER, 0x09, repeats=1)  # CRC fine, event code unknown
        seq = await sim.press(BUTTON, repeats=1)
        occurrence = await sink.wait_for(is_occ(OccurrenceKind.SOS, ADDR))
        assert isinstance(occurrence, Occurrence)
        assert occurrence.data["seq"] == seq
        c = driver.counters
        assert c.cut_frames >= 1
        assert c.bad_crc >= 1
        assert c.unknown_type >= 1
        assert c.bad_length >= 1
        assert c.noise_bytes >= 8
        assert c.decode_errors == 1
        # None of the broken frames (button 0xdead) got through.
        assert not [o for o in sink.items if getattr(o, "address", "") == "0000dead"]


async def test_partial_frame_dropped_after_silence(sim: CallButtonReceiverSimulator) -> None:
    async with running(sim, partial_frame_timeout_s=0.1) as (driver, sink, _):
        await sim.inject_corrupt_frame("cut")
        await eventually(lambda: driver.counters.stale_partials == 1)
        await sim.press(BUTTON)
        await sink.wait_for(is_occ(OccurrenceKind.SOS, ADDR))


async def test_acknowledge_reaches_the_receiver(sim: CallButtonReceiverSimulator) -> None:
    async with running(sim) as (driver, _, _task):
        await driver.execute(Command(ADDR, CommandAction.ACKNOWLEDGE))
        ack = await sim.wait_for_ack()
        assert (ack.button_id, ack.pattern) == (BUTTON, 2)
        assert ack.raw == bytes.fromhex("aa 55 06 81 00 01 e2 40 02 72 da")
        await driver.execute(Command(ADDR, CommandAction.ALARM_RECEIVED))
        second: AckRecord = await sim.wait_for_ack(count=2)
        assert (second.button_id, second.pattern) == (BUTTON, 1)
        assert sim.garbage_received == 0


async def test_bad_commands(sim: CallButtonReceiverSimulator) -> None:
    driver = CallButtonReceiverDriver(sim.slave_path)
    with pytest.raises(CommandError) as not_open:
        await driver.execute(Command(ADDR, CommandAction.ACKNOWLEDGE))
    assert not_open.value.recoverable
    async with running(sim) as (driver, _, _task):
        for command in (
            Command(ADDR, CommandAction.HUSH),
            Command("receiver", CommandAction.ACKNOWLEDGE),
            Command("xyz", CommandAction.ACKNOWLEDGE),
        ):
            with pytest.raises(CommandError) as err:
                await driver.execute(command)
            assert not err.value.recoverable


async def test_receiver_offline_then_online() -> None:
    sim = CallButtonReceiverSimulator(status_interval_s=0.05)
    await sim.start()
    try:
        async with running(sim, receiver_offline_after_s=0.3) as (_, sink, _task):

            def offline(active: bool) -> Callable[[Observation], bool]:
                return lambda o: (
                    isinstance(o, Condition)
                    and o.address == "receiver"
                    and o.kind == ConditionKind.OFFLINE
                    and o.active is active
                )

            await sink.wait_for(offline(False))
            sim.go_silent()
            await sink.wait_for(offline(True), within_s=2)
            mark = len(sink.items)
            sim.resume()
            await sink.wait_for(offline(False), start=mark)
            levels = [c.active for c in sink.of(Condition, address="receiver")]
            assert levels == [False, True, False]
            assert LinkStatus("receiver", online=False) in sink.items
    finally:
        await sim.stop()


async def test_button_supervision_timeout(sim: CallButtonReceiverSimulator) -> None:
    async with running(sim, buttons=[ADDR], button_supervision_s=0.2) as (_, sink, _task):
        await sink.wait_for(
            lambda o: isinstance(o, Condition) and o.address == ADDR and o.active, within_s=2
        )
        await sim.supervision(BUTTON)
        await sink.wait_for(is_occ(OccurrenceKind.SUPERVISION, ADDR))
        levels = [(c.kind, c.active) for c in sink.of(Condition, address=ADDR)]
        assert levels == [(ConditionKind.OFFLINE, True), (ConditionKind.OFFLINE, False)]


async def test_run_raises_when_the_port_goes_away(sim: CallButtonReceiverSimulator) -> None:
    driver = CallButtonReceiverDriver(sim.slave_path)
    task = asyncio.create_task(driver.run(Collector()))
    await asyncio.wait_for(driver.connected.wait(), 3)
    await sim.stop()
    with pytest.raises(OSError):
        await asyncio.wait_for(task, 3)
    assert not driver.connected.is_set()


async def test_run_raises_when_the_port_cannot_open() -> None:
    driver = CallButtonReceiverDriver("/dev/does-not-exist-eldersafe")
    with pytest.raises(OSError):
        await driver.run(Collector())
