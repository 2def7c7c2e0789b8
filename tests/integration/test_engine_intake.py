"""The engine's intake in three round trips keeps its guarantees when the database refuses
the batch at its commit: the interleavings are forced (a rival holding a dedup key open,
a table lock that holds the intake between its reads and its writes)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from support import until
from test_alert_engine import DISTRICT, T0, connect, ingest, rows

from alerting.planner import StepKey, StepKind
from alerting.rules import EngineEvent, EventKind, Phase, decide
from gateway.alerts.district import District, import_district
from gateway.alerts.store import PgAlertTransaction
from gateway.alerts.unit_of_work import intake_batch


@pytest.fixture
def district(database: str) -> str:
    import_district(database, District.model_validate(DISTRICT))
    return database


async def waiting_on_a_lock(watch: psycopg.AsyncConnection[Any], pid: int) -> bool:
    cur = await watch.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
    row = await cur.fetchone()
    return row is not None and row[0] == "Lock"


async def rival_opens_the_key(rival: psycopg.AsyncConnection[Any]) -> None:
    """Another server opens wb-1's SOS key in ``rival``'s open transaction."""
    event = EngineEvent(
        uuid.uuid4(), "site-a", "wb-1", EventKind("sos"), Phase("pulse"), T0, "es-wb1", {}
    )
    await PgAlertTransaction(rival, "rival").save(decide(event, {}, now=T0).transitions)


async def test_a_batch_that_loses_the_race_to_open_a_key_is_applied_one_at_a_time(
    district: str,
) -> None:
    """Another server opens the same dedup key after the intake's lock found none: the
    intake's insert waits on the key, fails when the rival commits, and the event is then
    applied alone, as a repeat of the rival's alert; nothing is lost or dead-lettered."""
    dsn = district
    ingest(dsn, "site-a", "wb-1", "sos")
    async with await connect(dsn) as rival, await connect(dsn) as work, await connect(dsn) as watch:
        async with rival.transaction():
            await rival_opens_the_key(rival)
            intake = asyncio.create_task(intake_batch(work, T0, worker="a"))
            await until(lambda: waiting_on_a_lock(watch, work.info.backend_pid),
                        what="the intake waiting on the rival's key")  # fmt: skip
        out = await asyncio.wait_for(intake, 10)
    assert out.events == 1 and out.dead == 0
    assert rows(dsn, "SELECT count(*), max(count) FROM alerts") == [(1, 2)]
    assert rows(dsn, "SELECT count(*) FROM engine_inbox") == [(0,)]
    assert rows(dsn, "SELECT count(*) FROM engine_dead_letters") == [(0,)]


async def test_inside_a_callers_transaction_a_refused_batch_spoils_none_of_the_callers_work(
    district: str,
) -> None:
    """Run inside a caller's transaction in pipeline mode (as ingest may run it, with its
    events): the batch refused at its savepoint's release is rolled back to that savepoint
    alone, applied one at a time, and the caller's own write commits with it."""
    dsn = district
    ingest(dsn, "site-a", "wb-1", "sos")
    async with await connect(dsn) as rival, await connect(dsn) as work, await connect(dsn) as watch:
        async with rival.transaction():
            await rival_opens_the_key(rival)

            async def callers_transaction() -> int:
                async with work.pipeline(), work.transaction():
                    await work.execute("INSERT INTO engine_clock (now) VALUES (%s)", (T0,))
                    return (await intake_batch(work, T0, worker="a")).events

            intake = asyncio.create_task(callers_transaction())
            await until(lambda: waiting_on_a_lock(watch, work.info.backend_pid),
                        what="the intake waiting on the rival's key")  # fmt: skip
        assert await asyncio.wait_for(intake, 10) == 1
    assert rows(dsn, "SELECT count(*), max(count) FROM alerts") == [(1, 2)]
    assert rows(dsn, "SELECT count(*) FROM engine_inbox") == [(0,)]
    assert rows(dsn, "SELECT now FROM engine_clock") == [(T0,)]


async def test_a_recorded_step_the_read_misses_fails_the_batch_and_is_not_fired_twice(
    district: str,
) -> None:
    """The intake trusts its read of fired steps (made under the alerts' locks; a step's
    foreign key needs the alert row, so nobody records one meanwhile). Should the read
    miss a recorded step all the same (here its row's epoch disagrees with its key), the
    step's insert finds it at the commit, the whole batch rolls back, and the event
    applied alone fires no second level 1: no audit row, no notice, no change of level."""
    dsn = district
    ingest(dsn, "site-a", "wb-1", "sos")
    async with await connect(dsn) as work:
        assert (await intake_batch(work, T0)).steps == 1
    ((alert_id, epoch),) = rows(dsn, "SELECT id, epoch FROM alerts")
    level_1 = StepKey(alert_id, epoch, StepKind.LEVEL, 1)
    rows(dsn, "INSERT INTO alert_steps (step_id, alert_id, epoch, kind, level, n, due_at,"
              " fired_at, fired_by) VALUES (%s, %s, %s, 'level', 1, 0, %s, %s, 'elsewhere')"
              " RETURNING step_id",
         (level_1.id, alert_id, epoch + 1, T0 + timedelta(seconds=60), T0))  # fmt: skip
    notices_before = rows(dsn, "SELECT count(*) FROM notifications")
    ingest(dsn, "site-a", "wb-1", "sos", at=T0 + timedelta(seconds=70))  # a repeat past 60 s
    async with await connect(dsn) as work:
        out = await intake_batch(work, T0 + timedelta(seconds=70))
    assert out.events == 1 and out.steps == 0 and out.steps_already_fired == 1
    fired = "SELECT count(*) FROM alert_audit WHERE detail->>'step' = %s"
    assert rows(dsn, fired, (level_1.id,)) == [(0,)]
    assert rows(dsn, "SELECT count(*) FROM notifications") == notices_before
    assert rows(dsn, "SELECT level, count FROM alerts") == [(0, 2)]
