"""The supervisor restarts a crashing driver with capped exponential backoff and reports it.

The drivers here are hand-written in-memory fakes (allowed for this unit test):
what is under test is the supervisor's loop, not a transport.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from device_drivers.model import Command, LinkStatus, Observation, ObservationSink
from gateway.edge.supervisor import Backoff, DriverSlot, DriverState, Supervisor

pytestmark = pytest.mark.timeout(20)


class CrashingDriver:
    """Fails ``crashes`` times (as a pulled serial cable would), then runs and talks."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0
        self.running = asyncio.Event()

    async def run(self, sink: ObservationSink) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            await asyncio.sleep(0)
            raise ConnectionError(f"port closed (run {self.runs})")
        await sink(LinkStatus("receiver", online=True))
        self.running.set()
        await asyncio.Event().wait()

    async def execute(self, command: Command) -> None:
        pass


class ReturningDriver(CrashingDriver):
    async def run(self, sink: ObservationSink) -> None:
        self.runs += 1


async def _run(supervisor: Supervisor, until: asyncio.Event | None, limit_s: float = 5) -> None:
    task = asyncio.create_task(supervisor.run())
    try:
        if until is not None:
            await asyncio.wait_for(until.wait(), limit_s)
        else:
            await asyncio.sleep(limit_s)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_crashing_driver_restarts_with_capped_backoff_and_is_reported() -> None:
    driver = CrashingDriver(crashes=5)
    slot = DriverSlot("cb", driver)
    seen: list[Observation] = []
    reports: list[dict[str, str]] = []
    delays: list[float] = []

    def sink_for(name: str) -> ObservationSink:
        async def sink(o: Observation) -> None:
            seen.append(o)

        return sink

    def on_change() -> None:
        reports.append(supervisor.states())
        if slot.state is DriverState.BACKOFF:
            delays.append(slot.next_restart_in_s)

    supervisor = Supervisor(
        [slot], sink_for, backoff=Backoff(0.01, 0.04, stable_after_s=10), on_change=on_change
    )
    await _run(supervisor, driver.running)

    assert driver.runs == 6
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]  # doubling, capped
    assert slot.restarts == 5 and "ConnectionError: port closed (run 5)" in slot.last_error
    backoff_reports = [r["cb"] for r in reports if r["cb"].startswith("backoff")]
    assert len(backoff_reports) == 5
    assert "restarts=1" in backoff_reports[0] and "port closed" in backoff_reports[0]
    assert reports[-1]["cb"] == "running restarts=5"
    assert supervisor.states()["cb"] == "stopped restarts=5"  # after cancellation
    assert seen == [LinkStatus("receiver", online=True)]  # the sink is the edge's, unwrapped
    assert slot.observations == 1


async def test_one_crashing_driver_does_not_stop_the_others() -> None:
    bad, good = ReturningDriver(crashes=0), CrashingDriver(crashes=0)
    slots = [DriverSlot("bad", bad), DriverSlot("good", good)]

    def sink_for(name: str) -> ObservationSink:
        async def sink(o: Observation) -> None:
            pass

        return sink

    supervisor = Supervisor(slots, sink_for, backoff=Backoff(0.01, 0.02, stable_after_s=10))
    await _run(supervisor, None, limit_s=0.3)
    assert bad.runs >= 5  # "returned" counts as a crash and is restarted
    assert "run() returned" in slots[0].last_error
    assert slots[1].state is DriverState.STOPPED and slots[1].restarts == 0
    assert good.runs == 1


def _supervised_with_down_log(slot: DriverSlot) -> tuple[Supervisor, list[str]]:
    """A supervisor over one slot that records every "down too long" report."""
    down: list[str] = []

    async def on_down(name: str) -> None:
        down.append(name)

    def sink_for(name: str) -> ObservationSink:
        async def sink(o: Observation) -> None:
            pass

        return sink

    supervisor = Supervisor(
        [slot], sink_for, backoff=Backoff(0.01, 0.02, stable_after_s=10), on_down_too_long=on_down
    )
    return supervisor, down


async def test_driver_down_too_long_reports_its_devices_once() -> None:
    driver = CrashingDriver(crashes=10**6)  # never comes back
    slot = DriverSlot("modbus", driver, down_offline_after_s=0.1)
    supervisor, down = _supervised_with_down_log(slot)
    await _run(supervisor, None, limit_s=0.5)
    assert down == ["modbus"]  # a crash loop is "down"; reported once, not per restart
    assert slot.restarts > 5


async def test_driver_back_before_limit_is_not_reported() -> None:
    driver = CrashingDriver(crashes=2)
    slot = DriverSlot("cb", driver, down_offline_after_s=0.5)
    supervisor, down = _supervised_with_down_log(slot)
    await _run(supervisor, None, limit_s=0.8)
    assert driver.running.is_set() and down == [] and slot.down_since is None
