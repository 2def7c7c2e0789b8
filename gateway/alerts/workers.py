"""The engine's long-running workers inside ``server``: intake and timers.

Any number of server processes run them against one database with no leader:
inbox rows and due alerts are claimed with ``FOR UPDATE SKIP LOCKED``. Each
worker holds two connections: one that only ``LISTEN``s (woken at the commit of
an event by the inbox trigger, or of a new timer), one that works. A periodic
poll is the fallback when a notification is lost with a connection.

``eldersafe server`` runs intake and timers on its one event loop, beside ingest
and the API (issue 8). A thread of its own for the intake was tried and measured:
the intake's time goes to its own statements (claim, decide, lock, write, commit),
not to waiting for the loop, so it gained nothing (bench/README.md, alert_latency).

Time: the system clock, or with ``ELDERSAFE_ENGINE_CLOCK=database`` (tests
only) the row of table ``engine_clock``, read at each pass: a test moves it
(``UPDATE engine_clock …; NOTIFY engine_timers``) and every server process
runs the escalation in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg

from gateway import metrics
from gateway.alerts.unit_of_work import (
    Outcome,
    conditions_batch,
    inactivity_sweep,
    intake_batch,
    timers_tick,
)
from gateway.alerts.vitals import vitals_sweep
from gateway.db.stall_guard import guarded
from gateway.restarting import run_forever

log = logging.getLogger(__name__)

ClockSource = Literal["system", "database"]
SWEEP_DEFER_S = 0.5
TIMER_LOOPS = 2


async def engine_now(conn: psycopg.AsyncConnection[Any], source: ClockSource) -> datetime:
    if source == "system":
        return datetime.now(UTC)
    cur = await conn.execute("SELECT now FROM engine_clock")
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("ELDERSAFE_ENGINE_CLOCK=database but table engine_clock is empty")
    at: datetime = row[0]
    return at


async def _wait(listen: psycopg.AsyncConnection[Any], seconds: float) -> None:
    """Until a notification arrives on a channel ``listen`` listens to, or ``seconds`` pass."""
    async for _ in listen.notifies(timeout=max(seconds, 0.0), stop_after=1):
        pass


def count_outcome(out: Outcome) -> None:
    """The engine's counters for one unit of work (workers and ingest's inline intake)."""
    metrics.ENGINE_EVENTS.inc(out.events)
    metrics.ENGINE_DEAD.inc(out.dead)
    metrics.ENGINE_STEPS.inc(out.steps)


class EngineWorkers:
    def __init__(
        self,
        dsn: str,
        name: str,
        clock: ClockSource = "system",
        poll_s: float = 1.0,
        batch: int = 50,
        stalled_s: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.name = name
        self.clock = clock
        self.poll_s = poll_s
        self.batch = batch
        # A server that stops mid-transaction (SIGSTOP, a frozen VM, a partition) would
        # hold its alerts' row locks, and every other server would skip them forever:
        # the session is ended after this long (gateway/db/stall_guard.py), its work
        # rolls back, and the others carry on. Must exceed any unit of work's pause
        # between statements.
        self.work_dsn = guarded(dsn, name, stalled_s)

    async def run(self) -> None:
        """Intake and timers on the caller's loop (tests; the server splits them)."""
        await asyncio.gather(self.run_intake(), self.run_timers())

    async def run_intake(self) -> None:
        await self._forever(self._intake)

    async def run_timers(self) -> None:
        # Two timer loops (claims are SKIP LOCKED, as between servers): one claims and
        # computes while the other waits on PostgreSQL, so a deadline waits for half a
        # tick, not a whole one, behind the step before it.
        await asyncio.gather(*(self._forever(self._timers) for _ in range(TIMER_LOOPS)))

    async def _forever(self, loop: Any) -> None:
        # Never take ingest down with the engine: the inbox keeps the work, and the loop
        # comes back after a backoff (a crash is logged and counted).
        await run_forever(
            f"alert engine {loop.__name__}",
            loop,
            log=log,
            transient=(
                psycopg.OperationalError,
                psycopg.errors.SerializationFailure,
                psycopg.errors.DeadlockDetected,
                psycopg.errors.IdleInTransactionSessionTimeout,
                OSError,
            ),
            failures=(psycopg.Error,),
            crashes=metrics.ENGINE_CRASHES,
        )

    async def _intake(self) -> None:
        async with (
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as listen,
            await psycopg.AsyncConnection.connect(self.work_dsn, autocommit=True) as work,
        ):
            await listen.execute("LISTEN engine_inbox")
            while True:
                now = await engine_now(work, self.clock)
                out = await intake_batch(work, now, self.batch, self.name)
                readings = await conditions_batch(work, now, self.batch * 4, self.name)
                count_outcome(out)
                count_outcome(readings)
                if out.events < self.batch and readings.events < self.batch * 4:
                    busy = out.events or readings.events
                    await _wait(listen, 0 if busy else self.poll_s)

    async def _timers(self) -> None:
        async with (
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as listen,
            await psycopg.AsyncConnection.connect(self.work_dsn, autocommit=True) as work,
        ):
            await listen.execute("LISTEN engine_timers")
            swept = time.monotonic()
            while True:
                now = await engine_now(work, self.clock)
                # Claims grow when behind: a step's writes are set-based, so a larger
                # batch amortises the claim and the commit instead of adding statements.
                out = await timers_tick(work, now, self.batch * 4, self.name)
                count_outcome(out)
                # While steps are firing, the sweeps (welfare checks every few minutes,
                # vital signs every 30 s) wait up to SWEEP_DEFER_S so that the next
                # escalation deadline is not served late behind them.
                vitals = Outcome()
                if not out.steps or time.monotonic() - swept >= SWEEP_DEFER_S:
                    await inactivity_sweep(work, now, self.batch, self.name)
                    vitals = await vitals_sweep(work, now, self.batch * 4, self.name)
                    swept = time.monotonic()
                if len(out.alerts) >= self.batch * 4 or vitals.events >= self.batch * 4:
                    continue  # more due now: a district's wristbands outnumber one batch
                await _wait(listen, await self._until_next(work, now))

    async def _until_next(self, conn: psycopg.AsyncConnection[Any], now: datetime) -> float:
        if self.clock != "system":
            return self.poll_s  # a test's clock: woken by NOTIFY engine_timers or the poll
        cur = await conn.execute("SELECT min(next_step_at) FROM alerts WHERE status <> 'resolved'")
        row = await cur.fetchone()
        if row is None or row[0] is None:
            return self.poll_s
        due: datetime = row[0]
        ahead = (due - datetime.now(UTC)) / timedelta(seconds=1)
        # Until the deadline itself (the step lag starts there); 10 ms when it has passed
        # already: a due alert another server holds locked is not ours to spin on.
        return min(self.poll_s, ahead if ahead > 0 else 0.01)
