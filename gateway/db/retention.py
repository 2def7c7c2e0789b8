"""Retention of raw telemetry by calling drop_chunks (the Apache-2 edition has no job scheduler),
and the shorter retention of sensitive personal information (PIPL art. 19: no longer than
needed): raw health readings and positions, deleted row by row since they share chunks
with every other reading."""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

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
