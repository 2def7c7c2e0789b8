"""The supervisor restarts a crashing driver with capped exponential backoff and reports it.

The drivers here are hand-written in-memory fakes (allowed for this unit test):
what is under test is the supervisor's loop, not a transport. Time is the
supervisor's injected clock and sleep: virtual, advanced one timer at a time,
so every run takes the same path and nothing waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import AsyncIterator, Callable

import pytest

from device_drivers.model import Command, LinkStatus, Observation, ObservationSink
from gateway.edge.supervisor import DriverSlot, DriverState, Supervisor
from gateway.restarting import Backoff

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
            raise ConnectionError(f"port closed (run {self.runs})")
        await sink(LinkStatus("receiver", online=True))
        self.running.set()
        await asyncio.Event().wait()

    async def execute(self, command: Command) -> None:
        pass


class ReturningDriver(CrashingDriver):
    async def run(self, sink: ObservationSink) -> None:
        self.runs += 1


class VirtualTime:
    """The supervisor's ``clock`` and ``sleep``: time moves only when every task is idle."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, delay), self._seq, future))
        self._seq += 1
        await future

    async def _settle(self) -> None:
        """Until every other task waits on something (a timer here): the loop has no
        callback ready once this one's turn comes back."""
        loop = asyncio.get_running_loop()
        while True:
            turn = loop.create_future()
            loop.call_soon(turn.set_result, None)
            await turn
            if not loop._ready:  # type: ignore[attr-defined]
                return

    async def run_until(self, done: Callable[[], bool], limit_s: float) -> None:
        """Fire timers in order until ``done()`` (or fail at virtual ``limit_s``)."""
        await self._settle()
        while not done():
            while self._timers and self._timers[0][2].cancelled():
                heapq.heappop(self._timers)
            assert self._timers, "nothing left to happen"
            when, _, future = heapq.heappop(self._timers)
            assert when <= limit_s, f"not done by t={limit_s} s (virtual)"
            self.now = when
            future.set_result(None)
            await self._settle()


@contextlib.asynccontextmanager
async def running(supervisor: Supervisor) -> AsyncIterator[None]:
    task = asyncio.create_task(supervisor.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _run(
    supervisor: Supervisor, time_: VirtualTime, done: Callable[[], bool], limit_s: float = 60
) -> None:
    async with running(supervisor):
        await time_.run_until(done, limit_s)


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

    time_ = VirtualTime()
    supervisor = Supervisor(
        [slot],
        sink_for,
        backoff=Backoff(1, 4, stable_after_s=10),
        on_change=on_change,
        clock=time_.clock,
        sleep=time_.sleep,
    )
    await _run(supervisor, time_, driver.running.is_set)

    assert driver.runs == 6
    assert delays == [1, 2, 4, 4, 4]  # doubling, capped
    assert time_.now == 15  # and really waited: the sum of the delays
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

    time_ = VirtualTime()
    supervisor = Supervisor(
        slots,
        sink_for,
        backoff=Backoff(1, 2, stable_after_s=10),
        clock=time_.clock,
        sleep=time_.sleep,
    )
    await _run(supervisor, time_, lambda: bad.runs >= 5 and good.running.is_set())
    assert time_.now == 1 + 2 + 2 + 2  # "returned" counts as a crash and is restarted
    assert "run() returned" in slots[0].last_error
    assert slots[1].state is DriverState.STOPPED and slots[1].restarts == 0
    assert good.runs == 1


def _supervised_with_down_log(
    slot: DriverSlot, time_: VirtualTime
) -> tuple[Supervisor, list[str]]:
    """A supervisor over one slot that records every "down too long" report."""
    down: list[str] = []

    async def on_down(name: str) -> None:
        down.append(name)

    def sink_for(name: str) -> ObservationSink:
        async def sink(o: Observation) -> None:
            pass

        return sink

    supervisor = Supervisor(
        [slot],
        sink_for,
        backoff=Backoff(1, 2, stable_after_s=100),
        on_down_too_long=on_down,
        clock=time_.clock,
        sleep=time_.sleep,
    )
    return supervisor, down


async def test_driver_down_too_long_reports_its_devices_once() -> None:
    driver = CrashingDriver(crashes=10**6)  # never comes back
    slot = DriverSlot("modbus", driver, down_offline_after_s=10)
    time_ = VirtualTime()
    supervisor, down = _supervised_with_down_log(slot, time_)
    async with running(supervisor):
        await time_.run_until(lambda: time_.now >= 9, 60)
        assert down == []  # not before the limit
        await time_.run_until(lambda: bool(down), 60)
        assert time_.now == 10  # down since the first crash at t=0; watchdog ticks every 2.5 s
        await time_.run_until(lambda: time_.now >= 60, 60)
    assert down == ["modbus"]  # a crash loop is "down"; reported once, not per restart
    assert slot.restarts > 20


async def test_driver_back_before_limit_is_not_reported() -> None:
    driver = CrashingDriver(crashes=2)
    slot = DriverSlot("cb", driver, down_offline_after_s=5)
    time_ = VirtualTime()
    supervisor, down = _supervised_with_down_log(slot, time_)
    async with running(supervisor):
        await time_.run_until(driver.running.is_set, 60)
        assert time_.now == 1 + 2  # back after two restarts, before the 5 s limit
        await time_.run_until(lambda: time_.now >= 60, 60)
    assert down == [] and slot.down_since is None
