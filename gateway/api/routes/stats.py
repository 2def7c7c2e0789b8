"""The district view's figures: per unit of the caller's tree, the open alerts and how fast
alerts were acknowledged and reached (issue 8: against 60 s and 15 min).

Computed in SQL over every alert of the window, not from the console's first page of
the list, so a street centre's numbers are whole. Counts of units outside the caller's
tree are never computed, so nothing about another street leaks through them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from psycopg.rows import dict_row
from pydantic import BaseModel

from gateway.api.deps import Conn, CurrentUser, Now

router = APIRouter(prefix="/api/stats", tags=["stats"])

ACK_TARGET_S = 60  # the first rung of the ladder (ARCHITECTURE §5): acknowledged within it
SCENE_TARGET_S = 15 * 60  # someone with the resident within 15 minutes

_UNITS = """
WITH window_alerts AS (
    SELECT s.organisation_id AS unit_id, a.status, a.opened_at,
           extract(epoch FROM a.acknowledged_at - a.opened_at)::float8 AS ack_s,
           extract(epoch FROM a.on_scene_at - a.opened_at)::float8 AS scene_s
    FROM alerts a JOIN sites s ON s.id = a.site_id
    WHERE s.organisation_id = ANY(%(units)s)
      AND (a.status <> 'resolved' OR a.opened_at >= %(since)s)
)
SELECT o.id, o.name, o.kind, o.parent_id,
       count(w.unit_id) FILTER (WHERE w.status <> 'resolved') AS open,
       count(w.unit_id) FILTER (WHERE w.status = 'open') AS unacknowledged,
       count(w.unit_id) FILTER (WHERE w.opened_at >= %(since)s) AS raised,
       count(w.ack_s) FILTER (WHERE w.opened_at >= %(since)s) AS acknowledged,
       count(w.ack_s) FILTER (WHERE w.opened_at >= %(since)s AND w.ack_s <= %(ack)s)
           AS acknowledged_in_target,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY w.ack_s)
           FILTER (WHERE w.opened_at >= %(since)s) AS ack_p50_s,
       max(w.ack_s) FILTER (WHERE w.opened_at >= %(since)s) AS ack_max_s,
       count(w.scene_s) FILTER (WHERE w.opened_at >= %(since)s) AS on_scene,
       count(w.scene_s) FILTER (WHERE w.opened_at >= %(since)s AND w.scene_s <= %(scene)s)
           AS on_scene_in_target,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY w.scene_s)
           FILTER (WHERE w.opened_at >= %(since)s) AS scene_p50_s,
       max(w.scene_s) FILTER (WHERE w.opened_at >= %(since)s) AS scene_max_s,
       min(w.opened_at) FILTER (WHERE w.status = 'open') AS oldest_unacknowledged_at
FROM organisations o
LEFT JOIN window_alerts w ON w.unit_id = o.id
WHERE o.id = ANY(%(units)s)
GROUP BY o.id
ORDER BY o.kind IN ('bureau', 'street'), o.id
"""


class UnitStats(BaseModel):
    id: str
    name: str
    kind: str
    parent_id: str | None
    open: int
    unacknowledged: int
    raised: int
    acknowledged: int
    acknowledged_in_target: int
    ack_p50_s: float | None
    ack_max_s: float | None
    on_scene: int
    on_scene_in_target: int
    scene_p50_s: float | None
    scene_max_s: float | None
    oldest_unacknowledged_at: datetime | None


class UnitStatsPage(BaseModel):
    hours: int
    ack_target_s: int
    scene_target_s: int
    units: list[UnitStats]


@router.get("/units", response_model=UnitStatsPage)
async def unit_stats(
    conn: Conn, me: CurrentUser, now: Now,
    hours: Annotated[int, Query(ge=1, le=24 * 31, description="the window, back from now")] = 24,
) -> UnitStatsPage:
    """Every unit of yours: open alerts now, and for alerts raised in the window the
    times to acknowledge and to reach the scene against their targets."""
    params = {"units": me.unit_list, "since": now - timedelta(hours=hours),
              "ack": ACK_TARGET_S, "scene": SCENE_TARGET_S}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_UNITS, params)
        rows = await cur.fetchall()
    return UnitStatsPage(hours=hours, ack_target_s=ACK_TARGET_S, scene_target_s=SCENE_TARGET_S,
                         units=[UnitStats(**r) for r in rows])
