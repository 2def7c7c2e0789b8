"""Reading the ordered change log (``alert_changes``) for the live feed, resumable, gap-free.

The feed follows ``commit_seq``, a number each change is given at its transaction's
COMMIT (migration 0007): a transaction numbers its rows under a lock it holds until it
is visible, so numbers become visible in order and a reader that has seen number k
has seen every lower number that will ever commit. Resuming with ``commit_seq > k``
therefore misses nothing, and a change is readable the moment its transaction commits,
whatever else runs in the database. (Positions, given at insert, commit out of order;
the feed once had to wait for every older transaction in the cluster to end.) A
client's "position" is a ``commit_seq``.

What it costs: change-writing transactions end one at a time, from their numbering to
their release (an UPDATE of their own rows, and the commit record's flush that the
NOTIFY of migration 0006 already serialised). Measured in ``bench/README.md``, api.py.

Within one alert, ``seq`` (its audit seq) orders its states; a client keeps the highest
``seq`` per alert (a change's view is read when its message is built, so it may be
newer than the change).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from gateway.alerts.store import Finish

_FROM_START = """
SELECT commit_seq, alert_id, seq, time, action, alert FROM alert_changes
WHERE commit_seq IS NOT NULL ORDER BY commit_seq LIMIT %s
"""
# From the client's own change on: that it is still in the log proves nothing after it
# left the log either (retention and erasure delete from the start).
_FROM = """
SELECT commit_seq, alert_id, seq, time, action, alert FROM alert_changes
WHERE commit_seq >= %s ORDER BY commit_seq LIMIT %s
"""
LAST = "SELECT max(commit_seq) FROM alert_changes"


@dataclass(frozen=True, slots=True)
class Change:
    position: int  # its commit_seq: what a client resumes from
    alert_id: uuid.UUID
    seq: int
    time: datetime
    action: str
    alert: dict[str, Any]


async def changes_after(
    conn: psycopg.AsyncConnection[Any], position: int | None, limit: int = 500
) -> list[Change]:
    """Up to ``limit`` changes after ``position`` (None: from the start), in commit order.

    Raises LookupError when the change at ``position`` is not in the log (never was, or
    was deleted): the caller cannot tell what it missed and must start over."""
    if position is None:
        cur = await conn.execute(_FROM_START, (limit,))
        return [Change(*row) for row in await cur.fetchall()]
    return await (await request_changes_after(conn, position, limit))()


async def request_changes_after(
    conn: psycopg.AsyncConnection[Any], position: int, limit: int = 500
) -> Finish[list[Change]]:
    """``changes_after`` a known position, sent and read later (``store.Finish``): in a
    pipeline, what is sent next rides the same round trip."""
    cur = await conn.execute(_FROM, (position, limit + 1))

    async def finish() -> list[Change]:
        rows = await cur.fetchall()
        if not rows or rows[0][0] != position:
            raise LookupError(f"no change at position {position}: resume from the start")
        return [Change(*row) for row in rows[1:]]

    return finish


async def last_position(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """The newest change's position (None: the log is empty)."""
    row = await (await conn.execute(LAST)).fetchone()
    return None if row is None or row[0] is None else int(row[0])
