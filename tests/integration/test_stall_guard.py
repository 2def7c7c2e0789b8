"""The stall guard ends a server's session that waits for its client inside a transaction
past its declared limit, in the shapes psycopg's pipeline mode leaves (where
PostgreSQL's own ``idle_in_transaction_session_timeout`` never fires), and leaves
alone sessions that work, wait on a lock, sit idle outside a transaction or do not
declare a limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from support import until

from gateway.db.stall_guard import end_stalled, guarded

KEY = 4_242
LIMIT_S = 0.3


async def _pipeline_left(
    conn: psycopg.AsyncConnection[Any], stack: contextlib.AsyncExitStack
) -> None:
    """A unit of work's shape once its pipeline block is left with its transaction open
    (``pipelined_transaction`` between its statements and its COMMIT's answer)."""
    async with conn.pipeline():
        await conn.execute("BEGIN")
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY,))


async def _fetched_in_pipeline(
    conn: psycopg.AsyncConnection[Any], stack: contextlib.AsyncExitStack
) -> None:
    """A result fetched in the middle of an open pipeline (a Flush, no Sync), as every
    unit of work does between its round trips."""
    await stack.enter_async_context(_open_pipeline(conn))
    await conn.execute("BEGIN")
    cur = await conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY,))
    await cur.fetchone()


@contextlib.asynccontextmanager
async def _open_pipeline(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    with contextlib.suppress(psycopg.OperationalError):  # its session ended, as expected
        async with conn.pipeline():
            yield


async def _waited(watch: psycopg.AsyncConnection[Any], pid: int) -> tuple[str, float] | None:
    """The session's state and how long it has been in it (None: gone)."""
    cur = await watch.execute(
        "SELECT state, extract(epoch FROM clock_timestamp() - state_change)::float8"
        " FROM pg_stat_activity WHERE pid = %s",
        (pid,),
    )
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


async def _lock_free(watch: psycopg.AsyncConnection[Any]) -> bool:
    cur = await watch.execute("SELECT pg_try_advisory_lock(%s)", (KEY,))
    row = await cur.fetchone()
    assert row is not None
    if row[0]:
        await watch.execute("SELECT pg_advisory_unlock(%s)", (KEY,))
    return bool(row[0])


@contextlib.asynccontextmanager
async def _sessions(dsn: str) -> AsyncIterator[tuple[Any, Any, contextlib.AsyncExitStack]]:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watch,
        contextlib.AsyncExitStack() as stack,
    ):
        stalled = await psycopg.AsyncConnection.connect(
            guarded(dsn, "server-test", LIMIT_S), autocommit=True
        )
        stack.push_async_callback(stalled.close)
        yield watch, stalled, stack


Shape = Callable[[psycopg.AsyncConnection[Any], contextlib.AsyncExitStack], Awaitable[None]]


@pytest.mark.parametrize("shape", [_pipeline_left, _fetched_in_pipeline], ids=lambda s: s.__name__)
async def test_a_session_stalled_in_a_pipelined_transaction_is_ended_and_its_locks_go(
    database: str, shape: Shape
) -> None:
    async with _sessions(database) as (watch, stalled, stack):
        await shape(stalled, stack)
        pid = stalled.info.backend_pid
        assert not await _lock_free(watch)
        # Past twice its limit PostgreSQL's own timer has not ended it (the reason the
        # guard exists), and it still holds the lock every other server would skip.
        waited = await until(
            lambda: _past(watch, pid, 2 * LIMIT_S), what="the session stalled past its limit"
        )
        assert waited[0] in ("idle in transaction", "active"), waited
        assert not await _lock_free(watch)

        assert await end_stalled(watch) == [pid]

        await until(lambda: _lock_free(watch), what="the lock released")
        assert await _waited(watch, pid) is None
        with pytest.raises(psycopg.OperationalError):  # the stopped server, resumed
            await (await stalled.execute("SELECT 1")).fetchone()


async def _past(watch: psycopg.AsyncConnection[Any], pid: int, seconds: float) -> Any:
    waited = await _waited(watch, pid)
    assert waited is not None, "the session was ended before the guard ran"
    return waited if waited[1] > seconds else None


async def test_working_waiting_idle_and_undeclared_sessions_are_left_alone(
    database: str,
) -> None:
    async with (
        await psycopg.AsyncConnection.connect(database, autocommit=True) as watch,
        # an administrator's session, no declared limit, idle inside its transaction
        await psycopg.AsyncConnection.connect(database, application_name="psql") as admin,
        # server sessions: one waits on the administrator's lock, one is idle outside any
        # transaction
        await psycopg.AsyncConnection.connect(guarded(database, "w", LIMIT_S)) as waiting,
        await psycopg.AsyncConnection.connect(
            guarded(database, "i", LIMIT_S), autocommit=True
        ) as idle,
    ):
        await admin.execute("SELECT pg_advisory_xact_lock(%s)", (KEY,))
        task = asyncio.create_task(waiting.execute("SELECT pg_advisory_xact_lock(%s)", (KEY,)))
        pids = [admin.info.backend_pid, waiting.info.backend_pid, idle.info.backend_pid]
        for pid in pids:
            await until(lambda pid=pid: _past(watch, pid, 2 * LIMIT_S),
                        what=f"session {pid} past the limit")  # fmt: skip
        cur = await watch.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pids[1],)
        )
        assert await cur.fetchone() == ("Lock",)

        assert await end_stalled(watch) == []

        await admin.commit()
        await asyncio.wait_for(task, 5)
        await waiting.commit()
        for conn in (admin, waiting, idle):
            await conn.execute("SELECT 1")


def test_the_declaration_survives_any_server_name() -> None:
    """PostgreSQL keeps 63 bytes of an application_name and replaces non-ASCII bytes: the
    limit comes first and the name is ASCII, so the sweep always reads the limit."""
    dsn = guarded("postgresql://u@h/db", "服务器-" + "x" * 80, 1.5)
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    name = str(params["application_name"])
    assert name.startswith("eldersafe stall=1500 ???-x") and len(name) == 63
    assert params["options"] == "-c idle_in_transaction_session_timeout=1500"
    assert params["host"] == "h" and params["dbname"] == "db"
