"""The first alarm after a start takes the path of the next ones: the chunks it writes
into exist already (gateway/db/retention.py ``create_chunks_ahead``) and the alarm lane
has rehearsed its transaction (``AlarmStore.rehearse``). Neither may leave a trace: no
row, no notice, no count, nothing the engine or the audit would ever see.

The time saved is measured in bench/alert_latency.py (the first press), not here."""

from __future__ import annotations

import asyncio
import functools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from prometheus_client import REGISTRY
from support import scalar, until
from test_alert_engine import DISTRICT
from test_ingest_inline_alerts import OPENED_WITH_EVENT, TOPIC, _sos

from gateway.alerts.district import District, import_district
from gateway.alerts.inline import intake_in_transaction
from gateway.db.retention import create_chunks_ahead
from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import AlarmStore, IngestStore
from gateway.mqtt.codec import Publish

# Every table an alarm writes to, and the engine's and the notifiers' queues.
TRACES = (
    "device_events", "event_ledger", "engine_inbox", "engine_dead_letters", "alerts",
    "alert_audit", "alert_audit_heads", "alert_changes", "alert_steps", "notifications",
    "telemetry", "dead_letters",
)  # fmt: skip
COUNTERS = ("eldersafe_engine_events_total", "eldersafe_engine_steps_total",
            "eldersafe_engine_dead_letters_total")  # fmt: skip


def traces(dsn: str) -> dict[str, int]:
    return {table: scalar(dsn, f"SELECT count(*) FROM {table}") for table in TRACES}


def counters() -> dict[str, float]:
    return {name: REGISTRY.get_sample_value(name) or 0.0 for name in COUNTERS}


def covered(dsn: str, table: str, at: datetime) -> bool:
    return bool(scalar(
        dsn, "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s"
        " AND range_start <= %s AND range_end > %s", (table, at, at)))  # fmt: skip


async def test_chunks_are_created_ahead_with_no_row_left_and_only_once(database: str) -> None:
    now = datetime.now(UTC)
    ahead = {"device_events": timedelta(days=7), "alert_audit": timedelta(days=30),
             "telemetry": timedelta(days=1)}  # fmt: skip
    assert not any(covered(database, t, now) for t in ahead)
    before = traces(database)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        assert await create_chunks_ahead(conn) == 6
        assert await create_chunks_ahead(conn) == 0
    for table, every in ahead.items():
        assert covered(database, table, now), table
        assert covered(database, table, now + every), table
    assert traces(database) == before


async def test_a_rehearsal_leaves_no_trace_and_the_first_alarm_opens_once(database: str) -> None:
    import_district(database, District.model_validate(DISTRICT))
    before, counted = traces(database), counters()
    seen: list[tuple[bool, list[tuple[str, str]]]] = []

    async def intake_and_look(conn: psycopg.AsyncConnection[Any], *, counted: bool = True) -> None:
        """The real intake; then what the transaction holds before it ends."""
        await intake_in_transaction(conn, clock="system", worker="test", counted=counted)
        cur = await conn.execute("SELECT type, status FROM alerts")
        seen.append((counted, [tuple(r) for r in await cur.fetchall()]))

    alarm = AlarmStore(database, after_events=intake_and_look)
    bulk = IngestStore(database)
    try:
        assert await alarm.rehearse() is True
        # Twice the whole path of a real SOS, an alert opened in it, and none kept.
        assert seen == [(False, [("sos", "open")])] * 2
        assert traces(database) == before
        assert counters() == counted

        pipe = IngestPipeline(bulk, alarm_store=alarm)
        writer = asyncio.create_task(pipe.run())
        event_id = uuid.uuid4()
        pipe.on_publish(1, Publish(TOPIC, _sos(event_id), 1, 1))
        await until(lambda: pipe.acked == 1, 20, "the event acknowledged", interval=0.01)
        writer.cancel()
        assert scalar(database, OPENED_WITH_EVENT, (event_id,)) is True
        assert seen[-1] == (True, [("sos", "open")])
        assert scalar(database, "SELECT count(*) FROM alerts") == 1
        assert counters()["eldersafe_engine_events_total"] == counted[
            "eldersafe_engine_events_total"] + 1  # fmt: skip
    finally:
        await bulk.close()
        await alarm.close()


async def test_with_no_site_registered_there_is_nothing_to_rehearse(database: str) -> None:
    intake = functools.partial(intake_in_transaction, clock="system", worker="test")
    alarm = AlarmStore(database, after_events=intake)
    try:
        assert await alarm.rehearse() is False
    finally:
        await alarm.close()
    assert traces(database) == dict.fromkeys(TRACES, 0)


async def test_with_a_backlog_in_the_inbox_the_rehearsal_stands_aside(database: str) -> None:
    """The intake also takes other free inbox rows: a rehearsal would apply a backlog
    (left by a crash) for nothing, holding its rows from the workers meanwhile."""
    import_district(database, District.model_validate(DISTRICT))
    with psycopg.connect(database) as conn:
        conn.execute(
            "INSERT INTO device_events (time, event_id, site_id, device_id, type, phase, profile)"
            " VALUES (now(), gen_random_uuid(), 'site-a', 'wb-1', 'sos', 'pulse', 'es-wb1')"
        )
    before = traces(database)
    calls: list[bool] = []

    async def intake(conn: psycopg.AsyncConnection[Any], *, counted: bool = True) -> None:
        calls.append(counted)

    alarm = AlarmStore(database, after_events=intake)
    try:
        assert await alarm.rehearse() is False
    finally:
        await alarm.close()
    assert calls == []
    assert traces(database) == before
