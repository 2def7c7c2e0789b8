"""A transaction in psycopg's pipeline mode that waits for PostgreSQL only where its
caller fetches a result, and once at its COMMIT.

psycopg's own ``transaction()`` in pipeline mode also waits as it starts and twice as
it ends (its nested pipelines' syncs), and a nested ``pipeline()`` waits as it is
entered: each wait a turn of the server's one event loop, behind whatever else it
serves (5,000 telemetry messages a second). BEGIN and COMMIT are sent as statements
instead. Used by the engine's units of work, ingest's alarm lane and the API.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg


@contextlib.asynccontextmanager
async def pipelined_transaction(
    conn: psycopg.AsyncConnection[Any], savepoint: str | None = None
) -> AsyncIterator[None]:
    """A transaction (or, inside the caller's, a savepoint). On any failure, the commit
    included, the work is rolled back before the error goes on. A COMMIT that PostgreSQL
    turned into a ROLLBACK (the transaction had failed and the failure was swallowed)
    raises: nothing may believe rolled-back rows durable."""
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN" if savepoint is None else f"SAVEPOINT {savepoint}")
            yield
            end = await conn.execute(
                "COMMIT" if savepoint is None else f"RELEASE SAVEPOINT {savepoint}"
            )
        if savepoint is None and end.statusmessage != "COMMIT":
            raise psycopg.errors.InFailedSqlTransaction(
                f"the transaction ended in {end.statusmessage}, not COMMIT"
            )
    except BaseException:
        if not conn.broken:
            with contextlib.suppress(psycopg.Error):
                if savepoint is None:
                    await conn.rollback()
                else:  # the release was skipped with everything after the error
                    await conn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                    await conn.execute(f"RELEASE SAVEPOINT {savepoint}")
        raise
