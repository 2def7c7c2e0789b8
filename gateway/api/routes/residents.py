"""Residents: list, one, create and update, with their family contacts and their own
vital-sign thresholds (the district file's rules: heart rate 20-250 bpm with min below
max, SpO2 50-100 %).

Above the responsible unit (street, bureau) names and phones are masked and health
details (conditions, thresholds) withheld, as in views.py. Export and erase (PIPL
art. 45 and 47) are in routes/privacy.py.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Annotated, Any
from zoneinfo import available_timezones

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query, status
from psycopg.rows import dict_row
from pydantic import BaseModel, Field, field_validator, model_validator

from gateway.api.deps import Conn, CurrentUser, Manager
from gateway.api.pagination import decode_cursor, encode_cursor
from gateway.api.principal import Principal, mask_name, mask_phone
from gateway.api.routes.organisations import Name, Phone, Text, units_under
from gateway.api.routes.sites import site_not_found

router = APIRouter(prefix="/api/residents", tags=["residents"])

ResidentId = Annotated[int, Path(ge=1, le=2**63 - 1)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such resident in your units"}}
_TIMEZONES = frozenset(available_timezones())

_SELECT = """
SELECT r.id, r.external_id, r.site_id, s.organisation_id, r.name, r.birth_year, r.phone,
       r.lives_alone, r.inactivity_window_min, r.timezone, r.night_start, r.night_end,
       r.heart_rate_min, r.heart_rate_max, r.spo2_min, r.notes, r.created_at,
       coalesce((SELECT json_agg(json_build_object('name', f.name, 'phone', f.phone,
                                                   'rank', f.rank) ORDER BY f.rank, f.name)
                 FROM family_contacts f WHERE f.resident_id = r.id), '[]') AS family
FROM residents r JOIN sites s ON s.id = r.site_id
WHERE s.organisation_id = ANY(%(units)s)
"""


class FamilyContactOut(BaseModel):
    name: str | None
    phone: str | None
    rank: int


class FamilyContactIn(BaseModel):
    name: Name
    phone: Phone | None = None
    rank: int = Field(0, ge=0, le=100)


class ResidentOut(BaseModel):
    id: int
    external_id: str | None
    site_id: str
    organisation_id: str
    name: str | None
    initials: str | None
    birth_year: int | None
    phone: str | None
    lives_alone: bool
    inactivity_window_min: int
    timezone: str
    # local wall-clock times in ``timezone`` (JSON Schema's "time" would want an offset)
    night_start: str = Field(pattern=r"^\d{2}:\d{2}$")
    night_end: str = Field(pattern=r"^\d{2}:\d{2}$")
    heart_rate_min: int | None
    heart_rate_max: int | None
    spo2_min: int | None
    conditions: str | None
    family: list[FamilyContactOut]
    created_at: datetime
    masked: bool


class ResidentPage(BaseModel):
    items: list[ResidentOut]
    next_cursor: str | None


class _Thresholds(BaseModel):
    heart_rate_min: int | None = Field(None, ge=20, le=250)
    heart_rate_max: int | None = Field(None, ge=20, le=250)
    spo2_min: int | None = Field(None, ge=50, le=100)

    @model_validator(mode="after")
    def _range(self) -> _Thresholds:
        low, high = self.heart_rate_min, self.heart_rate_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"heart_rate_min {low} must lie below heart_rate_max {high}")
        return self


def _zone(value: str | None) -> str | None:
    if value is not None and value not in _TIMEZONES:
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. Asia/Shanghai)")
    return value


class ResidentCreate(_Thresholds):
    site_id: Annotated[str, Field(max_length=64)]
    name: Name
    external_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00]*$")] \
        | None = None
    birth_year: int | None = Field(None, ge=1890, le=2100)
    phone: Phone | None = None
    lives_alone: bool = False
    inactivity_window_min: int = Field(720, gt=0, le=7 * 24 * 60)
    timezone: str = "Asia/Shanghai"
    night_start: time = time(22, 0)
    night_end: time = time(6, 30)
    conditions: Text | None = None
    family: list[FamilyContactIn] = Field(default_factory=list, max_length=10)

    _tz = field_validator("timezone")(_zone)


class ResidentUpdate(_Thresholds):
    site_id: Annotated[str, Field(max_length=64)] | None = None
    name: Name | None = None
    birth_year: int | None = Field(None, ge=1890, le=2100)
    phone: Phone | None = None
    lives_alone: bool | None = None
    inactivity_window_min: int | None = Field(None, gt=0, le=7 * 24 * 60)
    timezone: str | None = None
    night_start: time | None = None
    night_end: time | None = None
    conditions: Text | None = None
    family: list[FamilyContactIn] | None = Field(None, max_length=10)

    _tz = field_validator("timezone")(_zone)


def resident_not_found(resident_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no resident {resident_id}")


def resident_out(me: Principal, r: dict[str, Any]) -> ResidentOut:
    masked = me.above_units()
    name = r["name"]
    family = [FamilyContactOut(name=mask_name(f["name"]) if masked else f["name"],
                               phone=mask_phone(f["phone"]) if masked else f["phone"],
                               rank=f["rank"]) for f in r["family"]]
    return ResidentOut(
        id=r["id"], external_id=r["external_id"], site_id=r["site_id"],
        organisation_id=r["organisation_id"],
        name=mask_name(name) if masked else name, initials=name[:1] if name else None,
        birth_year=r["birth_year"], phone=mask_phone(r["phone"]) if masked else r["phone"],
        lives_alone=r["lives_alone"], inactivity_window_min=r["inactivity_window_min"],
        timezone=r["timezone"], night_start=f"{r['night_start']:%H:%M}",
        night_end=f"{r['night_end']:%H:%M}",
        heart_rate_min=None if masked else r["heart_rate_min"],
        heart_rate_max=None if masked else r["heart_rate_max"],
        spo2_min=None if masked else r["spo2_min"],
        conditions=None if masked else r["notes"], family=family,
        created_at=r["created_at"], masked=masked,
    )  # fmt: skip


async def resident_row(
    conn: psycopg.AsyncConnection[Any], me: Principal, resident_id: int
) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT + " AND r.id = %(id)s", {"units": me.unit_list,
                                                          "id": resident_id})
        row = await cur.fetchone()
    if row is None:
        raise resident_not_found(resident_id)
    return row


async def _require_site(conn: psycopg.AsyncConnection[Any], me: Principal, site_id: str) -> None:
    cur = await conn.execute("SELECT 1 FROM sites WHERE id = %s AND organisation_id = ANY(%s)",
                             (site_id, me.unit_list))
    if await cur.fetchone() is None:
        raise site_not_found(site_id)


@router.get("", response_model=ResidentPage)
async def list_residents(
    conn: Conn,
    me: CurrentUser,
    site: Annotated[str | None, Query(max_length=64)] = None,
    unit: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ResidentPage:
    """Newest first; ``site`` / ``unit`` narrow the list within your units."""
    params: dict[str, Any] = {"units": await units_under(conn, me, unit), "limit": limit + 1}
    sql = _SELECT
    if site is not None:
        sql += " AND r.site_id = %(site)s"
        params["site"] = site
    if cursor is not None:
        at, key = decode_cursor(cursor)
        if not key.isdigit() or len(key) > 19:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "cursor is not one this API gave out")
        params["c_at"], params["c_id"] = at, int(key)
        sql += " AND (r.created_at, r.id) < (%(c_at)s, %(c_id)s)"
    sql += " ORDER BY r.created_at DESC, r.id DESC LIMIT %(limit)s"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        rows = await cur.fetchall()
    nxt = encode_cursor(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) \
        if len(rows) > limit else None
    return ResidentPage(items=[resident_out(me, r) for r in rows[:limit]], next_cursor=nxt)


@router.get("/{resident_id}", response_model=ResidentOut, responses=NOT_FOUND)
async def get_resident(resident_id: ResidentId, conn: Conn, me: CurrentUser) -> ResidentOut:
    return resident_out(me, await resident_row(conn, me, resident_id))


async def _replace_family(
    conn: psycopg.AsyncConnection[Any], resident_id: int, family: list[FamilyContactIn]
) -> None:
    names = [f.name for f in family]
    if len(set(names)) != len(names):
        raise HTTPException(422, "family contacts need distinct names")
    await conn.execute("DELETE FROM family_contacts WHERE resident_id = %s", (resident_id,))
    for f in family:
        await conn.execute(
            "INSERT INTO family_contacts (resident_id, name, phone, rank) VALUES (%s, %s, %s, %s)",
            (resident_id, f.name, f.phone, f.rank))


@router.post("", response_model=ResidentOut, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "no such site in your units"},
                        409: {"description": "the external id is taken"}})
async def create_resident(body: ResidentCreate, conn: Conn, me: Manager) -> ResidentOut:
    await _require_site(conn, me, body.site_id)
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO residents (site_id, name, external_id, birth_year, phone, lives_alone,"
            " inactivity_window_min, timezone, night_start, night_end, heart_rate_min,"
            " heart_rate_max, spo2_min, notes)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (external_id) DO NOTHING RETURNING id",
            (body.site_id, body.name, body.external_id, body.birth_year, body.phone,
             body.lives_alone, body.inactivity_window_min, body.timezone, body.night_start,
             body.night_end, body.heart_rate_min, body.heart_rate_max, body.spo2_min,
             body.conditions))
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"external id {body.external_id} is taken")
        await _replace_family(conn, row[0], body.family)
    return resident_out(me, await resident_row(conn, me, row[0]))


_COLUMNS = {"site_id": "site_id", "name": "name", "birth_year": "birth_year", "phone": "phone",
            "lives_alone": "lives_alone", "inactivity_window_min": "inactivity_window_min",
            "timezone": "timezone", "night_start": "night_start", "night_end": "night_end",
            "heart_rate_min": "heart_rate_min", "heart_rate_max": "heart_rate_max",
            "spo2_min": "spo2_min", "conditions": "notes"}  # fmt: skip
_REQUIRED = ("site_id", "name", "lives_alone", "inactivity_window_min", "timezone",
             "night_start", "night_end")


@router.patch("/{resident_id}", response_model=ResidentOut, responses=NOT_FOUND)
async def update_resident(
    resident_id: ResidentId, body: ResidentUpdate, conn: Conn, me: Manager
) -> ResidentOut:
    """Fields given are changed; ``family`` given replaces the contacts."""
    current = await resident_row(conn, me, resident_id)
    changes = body.model_dump(exclude_unset=True)
    family = changes.pop("family", None)
    for required in _REQUIRED:
        if required in changes and changes[required] is None:
            raise HTTPException(422, f"{required} cannot be emptied")
    if changes.get("site_id") is not None:
        await _require_site(conn, me, changes["site_id"])
    low = changes.get("heart_rate_min", current["heart_rate_min"])
    high = changes.get("heart_rate_max", current["heart_rate_max"])
    if low is not None and high is not None and low >= high:
        raise HTTPException(422, f"heart_rate_min {low} must lie below heart_rate_max {high}")
    async with conn.transaction():
        if changes:
            sets = ", ".join(f"{_COLUMNS[k]} = %({k})s" for k in changes)
            await conn.execute(f"UPDATE residents SET {sets} WHERE id = %(rid)s",
                               changes | {"rid": resident_id})
        if family is not None:
            await _replace_family(conn, resident_id, body.family or [])
    return resident_out(me, await resident_row(conn, me, resident_id))
