"""Reading the ordered change log (``alert_changes``) for the live feed, resumable, gap-free.

Positions come from an identity column at insert time, so they commit out of
order: a reader that simply took ``position > last`` could pass a position an
unfinished transaction still fills, and miss that change forever. The feed
therefore runs in ``(xid, position)`` order over the transactions that are
older than every one still running (``xid < pg_snapshot_xmin``): that set only
grows at its end, so resuming after the last row seen misses nothing. Within
one alert, ``seq`` (its audit seq) orders its states; a client keeps the
highest ``seq`` per alert (two transactions on one alert are serialised by the
alert's row lock, but their xids need not follow that order).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

_FROM_START = """
SELECT position, alert_id, seq, time, action, alert FROM alert_changes
WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY xid, position LIMIT %s
"""
_AFTER = """
SELECT c.position, c.alert_id, c.seq, c.time, c.action, c.alert
FROM alert_changes c, (SELECT xid, position FROM alert_changes WHERE position = %s) last
WHERE (c.xid, c.position) > (last.xid, last.position)
  AND c.xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY c.xid, c.position LIMIT %s
"""


@dataclass(frozen=True, slots=True)
class Change:
    position: int  # what a client resumes from
    alert_id: uuid.UUID
    seq: int
    time: datetime
    action: str
    alert: dict[str, Any]


async def changes_after(
    conn: psycopg.AsyncConnection[Any], position: int | None, limit: int = 500
) -> list[Change]:
    """Changes after the one at ``position`` (None: from the start), in feed order."""
    if position is None:
        cur = await conn.execute(_FROM_START, (limit,))
    else:
        cur = await conn.execute(_AFTER, (position, limit))
    rows = await cur.fetchall()
    if position is not None and not rows:
        known = await conn.execute("SELECT 1 FROM alert_changes WHERE position = %s", (position,))
        if await known.fetchone() is None:
            raise LookupError(f"no change at position {position}: resume from the start")
    return [Change(*row) for row in rows]
