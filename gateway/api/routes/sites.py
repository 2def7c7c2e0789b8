"""Sites (an elder's home, a room of an institution): list, one, create and update.

Above the responsible unit (street, bureau) a site's name and address are masked
(views.py's rule; outside an alert nothing has escalated to them) and its coordinates
are not shown. Coordinates are a location (PIPL art. 28): reading them is recorded.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query, status
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from gateway.api.deps import Conn, CurrentUser, Manager
from gateway.api.pagination import decode_cursor, encode_cursor
from gateway.api.principal import Principal, mask_address, mask_name
from gateway.api.privacy import record_read, served_alert, shown_in_full
from gateway.api.routes.organisations import Ident, Name, Text, org_not_found, units_under

router = APIRouter(prefix="/api/sites", tags=["sites"])

SiteId = Annotated[str, Path(max_length=64)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such site in your units"}}
Latitude = Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)]
Longitude = Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)]

_SELECT = """
SELECT s.id, s.organisation_id, s.kind, s.name, s.address, s.latitude, s.longitude,
       s.created_at,
       (SELECT count(*) FROM residents r WHERE r.site_id = s.id) AS residents,
       (SELECT count(*) FROM devices d WHERE d.site_id = s.id) AS devices
FROM sites s WHERE s.organisation_id = ANY(%(units)s)
"""


class SiteOut(BaseModel):
    id: str
    organisation_id: str
    kind: str
    name: str
    address: str | None
    latitude: float | None
    longitude: float | None
    residents: int
    devices: int
    created_at: datetime
    masked: bool


class SitePage(BaseModel):
    items: list[SiteOut]
    next_cursor: str | None


class SiteCreate(BaseModel):
    id: Ident
    organisation_id: Ident
    kind: Literal["home", "room"] = "home"
    name: Name
    address: Text | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None


class SiteUpdate(BaseModel):
    organisation_id: Ident | None = None
    kind: Literal["home", "room"] | None = None
    name: Name | None = None
    address: Text | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None


def site_not_found(site_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no site {site_id}")


def site_out(me: Principal, r: dict[str, Any], with_location: bool,
             masked: bool | None = None) -> SiteOut:
    masked = me.above_units() if masked is None else masked
    shown = with_location and not masked
    return SiteOut(
        id=r["id"], organisation_id=r["organisation_id"], kind=r["kind"],
        name=(mask_name(r["name"]) or "") if masked else r["name"],
        address=mask_address(r["address"]) if masked else r["address"],
        latitude=r["latitude"] if shown else None, longitude=r["longitude"] if shown else None,
        residents=r["residents"], devices=r["devices"], created_at=r["created_at"],
        masked=masked,
    )  # fmt: skip


async def site_row(
    conn: psycopg.AsyncConnection[Any], me: Principal, site_id: str
) -> dict[str, Any]:
    """The caller's site ``site_id``; 404 when it is not theirs or does not exist."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT + " AND s.id = %(id)s", {"units": me.unit_list, "id": site_id})
        row = await cur.fetchone()
    if row is None:
        raise site_not_found(site_id)
    return row


@router.get("", response_model=SitePage)
async def list_sites(
    conn: Conn,
    me: CurrentUser,
    unit: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> SitePage:
    """Newest first; ``unit`` narrows to one organisation of yours and below."""
    params: dict[str, Any] = {"units": await units_under(conn, me, unit), "limit": limit + 1}
    sql = _SELECT
    if cursor is not None:
        params["c_at"], params["c_id"] = decode_cursor(cursor)
        sql += " AND (s.created_at, s.id) < (%(c_at)s, %(c_id)s)"
    sql += " ORDER BY s.created_at DESC, s.id DESC LIMIT %(limit)s"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        rows = await cur.fetchall()
    nxt = encode_cursor(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) \
        if len(rows) > limit else None
    return SitePage(items=[site_out(me, r, False) for r in rows[:limit]], next_cursor=nxt)


@router.get("/{site_id}", response_model=SiteOut, responses=NOT_FOUND)
async def get_site(
    site_id: SiteId,
    conn: Conn,
    me: CurrentUser,
    alert: Annotated[uuid.UUID | None, Query(description="the alert this read serves")] = None,
) -> SiteOut:
    """One site; its coordinates (a location) are recorded as a sensitive read."""
    row = await site_row(conn, me, site_id)
    served = await served_alert(conn, me, alert, site_id) if alert is not None else None
    out = site_out(me, row, True, masked=not shown_in_full(me, served))
    if out.latitude is not None or out.longitude is not None:
        await record_read(conn, me, "site_location", site_id=site_id, alert_id=alert,
                          detail={"fields": ["latitude", "longitude"]})
    return out


@router.post("", response_model=SiteOut, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "no such organisation in your part of the tree"},
                        409: {"description": "a site with this id exists"}})
async def create_site(body: SiteCreate, conn: Conn, me: Manager) -> SiteOut:
    if body.organisation_id not in me.units:
        raise org_not_found(body.organisation_id)
    cur = await conn.execute(
        "INSERT INTO sites (id, organisation_id, kind, name, address, latitude, longitude)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
        (body.id, body.organisation_id, body.kind, body.name, body.address, body.latitude,
         body.longitude))
    if await cur.fetchone() is None:
        # another unit's site id answers the same as one of the caller's: no leak
        raise HTTPException(status.HTTP_409_CONFLICT, f"site id {body.id} is taken")
    return site_out(me, await site_row(conn, me, body.id), True)


@router.patch("/{site_id}", response_model=SiteOut, responses=NOT_FOUND)
async def update_site(site_id: SiteId, body: SiteUpdate, conn: Conn, me: Manager) -> SiteOut:
    await site_row(conn, me, site_id)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("organisation_id") is not None and changes["organisation_id"] not in me.units:
        raise org_not_found(changes["organisation_id"])
    for required in ("organisation_id", "kind", "name"):
        if required in changes and changes[required] is None:
            raise HTTPException(422, f"{required} cannot be emptied")
    if changes:
        sets = ", ".join(f"{k} = %({k})s" for k in changes)
        await conn.execute(f"UPDATE sites SET {sets} WHERE id = %(site_id)s",
                           changes | {"site_id": site_id})
    return site_out(me, await site_row(conn, me, site_id), True)
