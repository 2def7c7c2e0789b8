"""Telemetry queries bucketed with TimescaleDB's ``time_bucket``: avg / min / max / count
per bucket, over a bounded range and a bounded number of rows (a query can never ask
the database for a year of per-second buckets).

Health and position series are sensitive (gateway.api.privacy): each read of their
values is recorded with the alert it served (``?alert=``); above the responsible unit
their values are masked (counts only) unless that alert has escalated to the caller.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from psycopg.rows import dict_row
from pydantic import AwareDatetime, BaseModel

from gateway.api.deps import Conn, CurrentUser, Now
from gateway.api.privacy import (
    is_sensitive,
    record_read,
    resident_of_device,
    served_alert,
    shown_in_full,
)
from gateway.api.routes.devices import device_row

router = APIRouter(prefix="/api/telemetry", tags=["telemetry"])

MAX_RANGE = timedelta(days=92)
MAX_POINTS = 5000  # buckets per answer, all metrics together

_QUERY = """
SELECT metric, min(unit) AS unit, time_bucket(make_interval(secs => %(bucket)s), time) AS bucket,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count
FROM telemetry
WHERE site_id = %(site)s AND device_id = %(device)s AND time >= %(since)s AND time < %(until)s
  AND (%(metric)s::text IS NULL OR metric = %(metric)s)
GROUP BY metric, bucket ORDER BY metric, bucket LIMIT %(limit)s
"""


class Point(BaseModel):
    time: datetime
    avg: float | None
    min: float | None
    max: float | None
    count: int


class Series(BaseModel):
    metric: str
    unit: str
    sensitive: bool
    masked: bool
    points: list[Point]


class TelemetryAnswer(BaseModel):
    site: str
    device: str
    since: datetime
    until: datetime
    bucket_s: int
    series: list[Series]
    # more buckets than one answer holds (several metrics): ask per metric for the rest
    truncated: bool


@router.get("", response_model=TelemetryAnswer,
            responses={404: {"description": "no such device (or alert) in your units"}})
async def query_telemetry(
    conn: Conn,
    me: CurrentUser,
    now: Now,
    site: Annotated[str, Query(max_length=64)],
    device: Annotated[str, Query(max_length=64)],
    metric: Annotated[str | None, Query(max_length=64)] = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    bucket: Annotated[int, Query(ge=1, le=7 * 86400, description="seconds")] = 300,
    alert: Annotated[uuid.UUID | None, Query(description="the alert this read serves")] = None,
) -> TelemetryAnswer:
    """Default range: the last 24 hours before now (the engine's clock)."""
    until = until or now
    try:
        since = since or until - timedelta(days=1)
    except OverflowError:
        raise HTTPException(422, "until is too early to look a day back from") from None
    if until <= since:
        raise HTTPException(422, "until must come after since")
    if until - since > MAX_RANGE:
        raise HTTPException(422, f"at most {MAX_RANGE.days} days per query")
    if (until - since) / timedelta(seconds=bucket) > MAX_POINTS:
        raise HTTPException(422, f"more than {MAX_POINTS} buckets: widen the bucket or "
                                 "narrow the range")
    row = await device_row(conn, me, site, device)
    served = await served_alert(conn, me, alert, site) if alert is not None else None
    open_to_me = shown_in_full(me, served)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_QUERY, {"bucket": bucket, "site": site, "device": device,
                                   "since": since, "until": until, "metric": metric,
                                   "limit": MAX_POINTS})
        rows = await cur.fetchall()
    series: dict[str, Series] = {}
    for r in rows:
        sensitive = is_sensitive(r["metric"], row["profile"])
        masked = sensitive and not open_to_me
        s = series.setdefault(r["metric"], Series(metric=r["metric"], unit=r["unit"],
                                                  sensitive=sensitive, masked=masked, points=[]))
        s.points.append(Point(time=r["bucket"], count=r["count"],
                              avg=None if masked else r["avg"], min=None if masked else r["min"],
                              max=None if masked else r["max"]))
    shown = [s.metric for s in series.values() if s.sensitive and not s.masked]
    if shown:
        await record_read(conn, me, "telemetry",
                          resident_id=await resident_of_device(conn, site, device),
                          site_id=site, alert_id=alert,
                          detail={"device": device, "metrics": shown, "since": since.isoformat(),
                                  "until": until.isoformat(), "bucket_s": bucket})
    return TelemetryAnswer(site=site, device=device, since=since, until=until, bucket_s=bucket,
                           series=list(series.values()), truncated=len(rows) >= MAX_POINTS)
