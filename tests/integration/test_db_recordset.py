"""``store.recordset``: the engine's set-based writes carry their rows in one jsonb
parameter; every value must come back out of ``jsonb_to_recordset`` exactly as it went
in (the audit chain's hashes are checked against the stored rows)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

from gateway.alerts.store import recordset

COLUMNS = (
    "id uuid, at timestamptz, n bigint, small smallint, name text, doc jsonb, hash bytea,"
    " missing text"
)
NAMES = tuple(c.split()[0] for c in COLUMNS.split(","))


async def test_values_come_back_exactly_as_they_went_in(database: str) -> None:
    rows = [
        (uuid.uuid4(), datetime(2026, 11, 24, 3, 4, 5, 123456, tzinfo=UTC), 2**62, -3,
         '王 "quoted" \\ back\\slash\n', {"nested": [1, 2.5, "三"], "ok": True},
         bytes(range(256)), None),
        (uuid.uuid4(), datetime(2026, 1, 1, 23, 59, 59, 999999,
                                tzinfo=timezone(timedelta(hours=8))),
         0, 0, "", Jsonb(["a", "b"]), b"", None),
        (uuid.uuid4(), datetime(2026, 6, 1, tzinfo=UTC), -1, 32767, "x", [], b"\x00", None),
    ]  # fmt: skip
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        cur = await conn.execute(
            f"SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r ({COLUMNS})",
            (recordset(NAMES, rows),),
        )
        back = await cur.fetchall()
    expected = [
        tuple(v.obj if isinstance(v, Jsonb) else v for v in row) for row in rows
    ]
    assert back == expected
    assert back[1][1].utcoffset() == timedelta(0)  # the same instant, in the session's zone
    assert back[1][1] == rows[1][1]


def test_a_value_without_a_json_form_is_refused_not_guessed() -> None:
    with pytest.raises(TypeError, match="set"):
        recordset(("a",), [({1, 2},)])
