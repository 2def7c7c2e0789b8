"""``pipelined_transaction``: one wait at its COMMIT, and never a silent rollback."""

from __future__ import annotations

import contextlib

import psycopg
import pytest
from support import scalar

from gateway.db.pipelined import pipelined_transaction


async def test_a_failure_swallowed_inside_raises_at_the_commit_and_nothing_is_kept(
    database: str,
) -> None:
    """PostgreSQL answers COMMIT in a failed transaction with ROLLBACK, and no error: a
    caller that swallowed the failure (a fallback, a bug) must not go on to acknowledge
    rows that were rolled back."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE kept (n int)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction, match="ROLLBACK"):
            async with pipelined_transaction(conn):
                await conn.execute("INSERT INTO kept VALUES (1)")
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    async with conn.pipeline():  # nested: its exit syncs and raises
                        await conn.execute("SELECT 1 / 0")
        assert not conn.broken
        await conn.execute("SELECT 1")  # usable again, outside any transaction
    assert scalar(database, "SELECT count(*) FROM kept") == 0


async def test_statements_commit_together(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE kept (n int)")
        async with pipelined_transaction(conn):
            for n in range(3):
                await conn.execute("INSERT INTO kept VALUES (%s)", (n,))
    assert scalar(database, "SELECT count(*) FROM kept") == 3
