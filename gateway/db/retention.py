"""Retention of raw telemetry by calling drop_chunks (the Apache-2 edition has no job scheduler),
and the shorter retention of sensitive personal information (PIPL art. 19: no longer than
needed): raw health readings and positions, deleted row by row since they share chunks
with every other reading. And the other end of the chunks: those about to be written are
created ahead, off the alarm path."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg


async def drop_old_telemetry(conn: psycopg.AsyncConnection[tuple[int]], keep: timedelta) -> int:
    """Drop telemetry chunks entirely older than ``keep``; return how many were dropped."""
    cur = await conn.execute(
        "SELECT count(*) FROM drop_chunks('telemetry', older_than => now() - %s::interval)",
        (keep,),
    )
    row = await cur.fetchone()  # (chunks dropped,)
    await conn.commit()
    return int(row[0]) if row else 0


_SENSITIVE = """
DELETE FROM telemetry t WHERE t.time < now() - %(keep)s::interval
  AND (t.metric = ANY(%(metrics)s) OR EXISTS (
      SELECT 1 FROM devices d WHERE d.site_id = t.site_id AND d.id = t.device_id
        AND d.profile = ANY(%(profiles)s)))
"""


async def delete_old_sensitive_telemetry(
    conn: psycopg.AsyncConnection[tuple[int]],
    keep: timedelta,
    metrics: Collection[str],
    profiles: Collection[str],
) -> int:
    """Delete readings older than ``keep`` of the sensitive ``metrics`` and of every metric
    of devices with a sensitive profile (wristbands); return how many rows went."""
    cur = await conn.execute(
        _SENSITIVE, {"keep": keep, "metrics": sorted(metrics), "profiles": sorted(profiles)}
    )
    await conn.commit()
    return cur.rowcount


# A row that makes TimescaleDB create the chunk holding its time, per hypertable whose
# first row of a chunk would otherwise pay for the chunk's creation on the alarm path (an
# event, its audit) or on ingest's (telemetry). No row matches a rule, a reading's
# threshold trigger or a real device; the event's inbox row goes in the same transaction.
_CHUNK_MAKERS = {
    "device_events": (
        "INSERT INTO device_events (time, event_id, site_id, device_id, type, phase, profile)"
        " VALUES (%(at)s, %(id)s, '', '', '', '', '')",
        "DELETE FROM device_events WHERE event_id = %(id)s AND time = %(at)s",
        "DELETE FROM engine_inbox WHERE event_id = %(id)s",
    ),
    "alert_audit": (
        "INSERT INTO alert_audit (time, alert_id, seq, actor, action, hash)"
        " VALUES (%(at)s, %(id)s, 0, '', '', '')",
        "DELETE FROM alert_audit WHERE alert_id = %(id)s AND time = %(at)s",
    ),
    "telemetry": (
        "INSERT INTO telemetry (time, site_id, device_id, metric, value)"
        " VALUES (%(at)s, '', %(id)s::text, '', 0)",
        "DELETE FROM telemetry WHERE site_id = '' AND device_id = %(id)s::text AND time = %(at)s",
    ),
}

_INTERVALS = """
SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions
WHERE hypertable_name = ANY(%s) AND dimension_number = 1
"""
_COVERED = """
SELECT EXISTS (SELECT 1 FROM timescaledb_information.chunks
               WHERE hypertable_name = %s AND range_start <= %s AND range_end > %s)
"""


async def create_chunks_ahead(conn: psycopg.AsyncConnection[Any]) -> int:
    """Make sure the chunks holding now and one chunk interval from now exist; return how
    many were created.

    Why: the first row of a new chunk creates it inside the writer's transaction (tables,
    indexes, catalog rows: ≈ 10-20 ms each here), so without this the first alarm of a
    week (``device_events``) and of a month (``alert_audit``) would be late by that much.
    The Apache-2 edition has no ``create_chunk``, so a row is written and deleted in one
    transaction: the chunk stays, the row was never visible to anyone. ``conn`` must be
    in autocommit mode."""
    cur = await conn.execute(_INTERVALS, (sorted(_CHUNK_MAKERS),))
    intervals: dict[str, timedelta] = {name: every for name, every in await cur.fetchall()}
    now = datetime.now(UTC)
    created = 0
    for table, statements in _CHUNK_MAKERS.items():
        every = intervals.get(table)
        if every is None:
            continue
        for at in (now, now + every):
            cur = await conn.execute(_COVERED, (table, at, at))
            covered = await cur.fetchone()
            if covered is not None and covered[0]:
                continue
            row = {"at": at, "id": uuid.uuid4()}
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(statement, row)
            created += 1
    return created
