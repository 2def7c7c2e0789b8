"""Retention of raw telemetry by calling drop_chunks (the Apache-2 edition has no job scheduler)."""

from __future__ import annotations

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
