"""Ends the PostgreSQL sessions of a server that stopped inside a transaction.

A server stopped mid-transaction (SIGSTOP, a frozen VM, a partition) keeps its row
locks: its claimed alerts, timers, notices and commands, which every other server
skips (``SKIP LOCKED``), so nobody escalates them. PostgreSQL's
``idle_in_transaction_session_timeout`` is the first guard, but PostgreSQL arms it
only when it answers a Sync with ReadyForQuery, and any later Flush message disarms
it (``postgres.c``). psycopg's pipeline mode sends exactly that: a transaction whose
pipeline block has been left, or a result fetched inside an open pipeline, waits for
its client with no timer at all. Every unit of work of the engine, the acknowledge
and ingest's inline intake run in pipeline mode.

So every server also runs ``guard_loop`` (no leader): each server session declares
its own stall limit in ``application_name`` (``guarded``), and any such session that
has waited for its client inside a transaction longer than that is terminated. Its
transaction rolls back, its locks go, and the other servers take its work; the
stopped server, once it runs again, finds its connection gone and reconnects.
Sessions without the declaration (an administrator's psql, reports) are never
touched, nor are sessions that are working or waiting on a lock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from gateway import metrics
from gateway.restarting import run_forever

log = logging.getLogger(__name__)

PREFIX = "eldersafe stall="
NAME_LIMIT = 63  # PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes

# Waiting for its client inside a transaction: "idle in transaction" after a Sync, or
# "active" with wait event ClientRead in the middle of a pipeline (no Sync yet).
# ``state_change`` is the session's last statement or its last Sync.
_ENDED = """
WITH stalled AS MATERIALIZED (
    SELECT pid, application_name, state,
           substring(application_name FROM '^eldersafe stall=([0-9]{1,9}) ')::bigint AS limit_ms,
           clock_timestamp() - state_change AS waited
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND application_name LIKE 'eldersafe stall=%%'
      AND (state IN ('idle in transaction', 'idle in transaction (aborted)')
           OR (state = 'active' AND wait_event = 'ClientRead'))
)
SELECT pid, application_name, state, waited, pg_terminate_backend(pid)
FROM stalled
WHERE limit_ms IS NOT NULL AND waited > limit_ms * interval '1 millisecond'
"""


def guarded(dsn: str, name: str, limit_s: float) -> str:
    """``dsn`` for a server session that may stall at most ``limit_s`` inside a
    transaction: PostgreSQL's own timer plus the declaration the sweep reads."""
    ms = max(int(limit_s * 1000), 1)
    return make_conninfo(
        dsn,
        application_name=f"{PREFIX}{ms} {name}".encode("ascii", "replace")[:NAME_LIMIT].decode(),
        options=f"-c idle_in_transaction_session_timeout={ms}",
    )


async def end_stalled(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """One sweep: terminate every declared session stalled past its limit; their pids."""
    cur = await conn.execute(_ENDED)
    ended = []
    for pid, name, state, waited, done in await cur.fetchall():
        if done:
            ended.append(pid)
            log.warning("ended stalled database session %d (%s): %s for %s",
                        pid, name, state, waited)  # fmt: skip
    metrics.DB_STALLED_ENDED.inc(len(ended))
    return ended


async def guard_loop(dsn: str, every_s: float) -> None:
    """``end_stalled`` every ``every_s`` on a connection of its own, for ever."""

    async def sweep() -> None:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="eldersafe stall-guard"
        ) as conn:
            while True:
                await end_stalled(conn)
                await asyncio.sleep(every_s)

    await run_forever("stall guard", sweep, log=log, transient=(psycopg.Error, OSError))
