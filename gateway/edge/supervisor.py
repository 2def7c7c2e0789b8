"""Keeps every driver running: a crash is logged, reported, and followed by a restart.

Each driver's ``run(sink)`` is one task. When it raises (a serial cable pulled,
a Modbus port gone, the BLE adapter reset) — or returns, which a driver must not
do — it is restarted after an exponential backoff (initial → cap, reset once a
run has stayed up for ``stable_after_s``). Its state is what the gateway status
reports, so a driver stuck in a crash loop is visible upstream, not only in a
log on a box in someone's flat.

If a driver stays down longer than its ``down_offline_after_s``, the devices it
carries are reported offline (``on_down_too_long``): the driver cannot report
its own silence when it is not running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from device_drivers.model import Driver, Observation, ObservationSink
from gateway.restarting import Backoff

log = logging.getLogger(__name__)


class DriverState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # crashed, waiting to restart
    STOPPED = "stopped"


@dataclass
class DriverSlot:
    name: str
    driver: Driver
    down_offline_after_s: float | None = None
    state: DriverState = DriverState.STARTING
    restarts: int = 0
    last_error: str = ""
    next_restart_in_s: float = 0.0
    down_since: float | None = None  # monotonic; None while it runs and talks
    reported_down: bool = False
    observations: int = 0
    last_observation: float | None = None  # monotonic
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def describe(self) -> str:
        """One short string for the gateway status (``drivers`` map)."""
        if self.state is DriverState.BACKOFF:
            text = f"backoff restarts={self.restarts} error={self.last_error}"
        elif self.restarts:
            text = f"{self.state.value} restarts={self.restarts}"
        else:
            text = self.state.value
        return text[:200]


DRIVER_BACKOFF = Backoff()


class Supervisor:
    def __init__(
        self,
        slots: list[DriverSlot],
        sink_for: Callable[[str], ObservationSink],
        *,
        backoff: Backoff = DRIVER_BACKOFF,
        on_change: Callable[[], None] | None = None,
        on_down_too_long: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.slots = {s.name: s for s in slots}
        self._sink_for = sink_for
        self.backoff = backoff
        self._on_change = on_change
        self._on_down_too_long = on_down_too_long
        self._clock = clock
        self._sleep = sleep

    def states(self) -> dict[str, str]:
        return {name: slot.describe() for name, slot in self.slots.items()}

    @property
    def drivers(self) -> Mapping[str, Driver]:
        return {name: slot.driver for name, slot in self.slots.items()}

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("supervisor: on_change hook failed")

    async def run(self) -> None:
        """Run every driver until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                for slot in self.slots.values():
                    slot.task = tg.create_task(self._keep_running(slot), name=f"driver-{slot.name}")
        finally:
            for slot in self.slots.values():
                slot.state = DriverState.STOPPED

    def _wrap_sink(self, slot: DriverSlot, sink: ObservationSink) -> ObservationSink:
        async def observed(observation: Observation) -> None:
            slot.observations += 1
            slot.last_observation = self._clock()
            slot.down_since = None  # it talks again: no longer "down"
            slot.reported_down = False
            await sink(observation)

        return observed

    async def _keep_running(self, slot: DriverSlot) -> None:
        delay = self.backoff.initial_s
        sink = self._wrap_sink(slot, self._sink_for(slot.name))
        watchdog = asyncio.create_task(self._watch_down(slot), name=f"watch-{slot.name}")
        try:
            while True:
                slot.state = DriverState.RUNNING
                self._changed()
                started = self._clock()
                try:
                    await slot.driver.run(sink)
                    error = "run() returned"
                    log.error("driver %s: run() returned; restarting", slot.name)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.error("driver %s crashed: %s", slot.name, error, exc_info=exc)
                now = self._clock()
                if now - started >= self.backoff.stable_after_s:
                    delay = self.backoff.initial_s
                if slot.down_since is None:
                    slot.down_since = now
                slot.restarts += 1
                slot.last_error = error
                slot.state = DriverState.BACKOFF
                slot.next_restart_in_s = delay
                self._changed()
                log.info("driver %s: restart %d in %.1f s", slot.name, slot.restarts, delay)
                await self._sleep(delay)
                delay = self.backoff.next(delay)
        finally:
            watchdog.cancel()

    async def _watch_down(self, slot: DriverSlot) -> None:
        """Report the driver's devices offline once it has been down (crashing, silent) too long.

        "Down" starts at a crash and ends when the driver hands over an
        observation again; a driver stuck in a crash loop stays down.
        """
        limit = slot.down_offline_after_s
        if limit is None or self._on_down_too_long is None:
            return
        tick = max(0.05, min(1.0, limit / 4))
        while True:
            await self._sleep(tick)
            since = slot.down_since
            if since is None or slot.reported_down or self._clock() - since < limit:
                continue
            slot.reported_down = True
            log.error("driver %s down for %.0f s: reporting its devices offline", slot.name, limit)
            try:
                await self._on_down_too_long(slot.name)
            except Exception:
                log.exception("driver %s: reporting devices offline failed", slot.name)
                slot.reported_down = False
