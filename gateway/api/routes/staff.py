"""Staff and shifts within the caller's units; who is on duty now (the engine's clock,
the moment escalation resolves ``duty`` to people).

A manager gives no one more than they hold: a supervisor manages duty staff and
supervisors of their units; an admin anyone. A new password (argon2id, security.py)
or a disabled account raises ``token_version``, which ends every token issued before.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query, status
from psycopg.rows import dict_row
from pydantic import AwareDatetime, BaseModel, Field

from gateway.api.deps import Conn, CurrentUser, Manager, Now
from gateway.api.principal import Principal, StaffRole
from gateway.api.routes.organisations import Name, Phone, org_not_found, units_under
from gateway.api.security import hash_password

router = APIRouter(prefix="/api", tags=["staff"])

StaffId = Annotated[str, Path(max_length=64)]
RoleName = Literal["duty", "supervisor", "street", "bureau", "admin"]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such person (or shift) in your units"}}
_RANK = {StaffRole.DUTY: 0, StaffRole.SUPERVISOR: 1, StaffRole.STREET: 2, StaffRole.BUREAU: 3,
         StaffRole.ADMIN: 4}
_DAY, _WEEK = timedelta(days=1), timedelta(days=7)
Password = Annotated[str, Field(min_length=10, max_length=1024, pattern=r"^[^\x00]*$")]

_SELECT = """
SELECT s.id, s.organisation_id, s.name, s.role, s.phone, s.active, s.created_at,
       EXISTS (SELECT 1 FROM shifts sh WHERE sh.staff_id = s.id
               AND sh.starts_at <= %(now)s AND %(now)s < sh.ends_at) AS on_shift
FROM staff s WHERE s.organisation_id = ANY(%(units)s)
"""
_SHIFTS = """
SELECT sh.id, sh.staff_id, s.name AS staff_name, s.organisation_id, sh.starts_at, sh.ends_at
FROM shifts sh JOIN staff s ON s.id = sh.staff_id
WHERE s.organisation_id = ANY(%(units)s)
"""


class StaffOut(BaseModel):
    id: str
    organisation_id: str
    name: str
    role: str
    phone: str | None
    active: bool
    on_shift: bool
    created_at: datetime


class StaffCreate(BaseModel):
    id: Annotated[str, Field(pattern=r"^[a-z0-9._-]{1,64}$")]
    organisation_id: Annotated[str, Field(max_length=64)]
    name: Name
    role: RoleName
    phone: Phone | None = None
    password: Password | None = None


class StaffUpdate(BaseModel):
    organisation_id: Annotated[str, Field(max_length=64)] | None = None
    name: Name | None = None
    role: RoleName | None = None
    phone: Phone | None = None
    active: bool | None = None


class PasswordBody(BaseModel):
    password: Password


class ShiftOut(BaseModel):
    id: int
    staff_id: str
    staff_name: str
    organisation_id: str
    starts_at: datetime
    ends_at: datetime


class ShiftCreate(BaseModel):
    staff_id: Annotated[str, Field(max_length=64)]
    starts_at: AwareDatetime
    ends_at: AwareDatetime


def staff_not_found(staff_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no staff member {staff_id}")


async def _staff(conn: psycopg.AsyncConnection[Any], me: Principal, now: datetime,
                 staff_id: str) -> StaffOut:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT + " AND s.id = %(id)s",
                          {"units": me.unit_list, "now": now, "id": staff_id})
        row = await cur.fetchone()
    if row is None:
        raise staff_not_found(staff_id)
    return StaffOut(**row)


def _may_grant(me: Principal, role: str) -> None:
    if _RANK[StaffRole(role)] > _RANK[me.role]:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"a {me.role.value} cannot give the role {role}")


@router.get("/staff", response_model=list[StaffOut])
async def list_staff(
    conn: Conn, me: CurrentUser, now: Now,
    unit: Annotated[str | None, Query(max_length=64)] = None,
) -> list[StaffOut]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT + " ORDER BY s.organisation_id, s.id",
                          {"units": await units_under(conn, me, unit), "now": now})
        return [StaffOut(**r) for r in await cur.fetchall()]


@router.get("/staff/on-duty", response_model=list[StaffOut])
async def on_duty(conn: Conn, me: CurrentUser, now: Now) -> list[StaffOut]:
    """Active staff of your units whose shift covers this moment, as escalation finds them."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT * FROM ({_SELECT}) x WHERE on_shift AND active ORDER BY organisation_id, id",
            {"units": me.unit_list, "now": now})
        return [StaffOut(**r) for r in await cur.fetchall()]


@router.get("/staff/{staff_id}", response_model=StaffOut, responses=NOT_FOUND)
async def get_staff(staff_id: StaffId, conn: Conn, me: CurrentUser, now: Now) -> StaffOut:
    return await _staff(conn, me, now, staff_id)


@router.post("/staff", response_model=StaffOut, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "no such organisation in your part of the tree"},
                        409: {"description": "the id is taken"}})
async def create_staff(body: StaffCreate, conn: Conn, me: Manager, now: Now) -> StaffOut:
    if body.organisation_id not in me.units:
        raise org_not_found(body.organisation_id)
    _may_grant(me, body.role)
    hashed = hash_password(body.password) if body.password else None
    cur = await conn.execute(
        "INSERT INTO staff (id, organisation_id, name, role, phone, password_hash)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
        (body.id, body.organisation_id, body.name, body.role, body.phone, hashed))
    if await cur.fetchone() is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"staff id {body.id} is taken")
    return await _staff(conn, me, now, body.id)


@router.patch("/staff/{staff_id}", response_model=StaffOut, responses=NOT_FOUND)
async def update_staff(staff_id: StaffId, body: StaffUpdate, conn: Conn, me: Manager,
                       now: Now) -> StaffOut:
    """Disabling an account (``active: false``) or changing its role ends its tokens."""
    current = await _staff(conn, me, now, staff_id)
    _may_grant(me, current.role)
    changes = body.model_dump(exclude_unset=True)
    for required in ("organisation_id", "name", "role", "active"):
        if required in changes and changes[required] is None:
            raise HTTPException(422, f"{required} cannot be emptied")
    if changes.get("role") is not None:
        _may_grant(me, changes["role"])
    if changes.get("organisation_id") is not None and changes["organisation_id"] not in me.units:
        raise org_not_found(changes["organisation_id"])
    if changes:
        ends_tokens = "role" in changes or changes.get("active") is False
        sets = ", ".join(f"{k} = %({k})s" for k in changes)
        bump = ", token_version = token_version + 1" if ends_tokens else ""
        await conn.execute(f"UPDATE staff SET {sets}{bump} WHERE id = %(sid)s",
                           changes | {"sid": staff_id})
    return await _staff(conn, me, now, staff_id)


@router.post("/staff/{staff_id}/password", status_code=status.HTTP_204_NO_CONTENT,
             responses=NOT_FOUND)
async def set_password(staff_id: StaffId, body: PasswordBody, conn: Conn, me: CurrentUser,
                       now: Now) -> None:
    """Your own password, or (a manager) that of someone in your units. Every token issued
    before ends: whoever held the old password is logged out."""
    if not (me.id == staff_id and not me.via_api_key):
        if not me.manages():
            raise staff_not_found(staff_id)  # for them, other people are not theirs to see
        current = await _staff(conn, me, now, staff_id)
        _may_grant(me, current.role)
    await conn.execute(
        "UPDATE staff SET password_hash = %s, token_version = token_version + 1 WHERE id = %s",
        (hash_password(body.password), staff_id))


@router.get("/shifts", response_model=list[ShiftOut])
async def list_shifts(
    conn: Conn, me: CurrentUser, now: Now,
    unit: Annotated[str | None, Query(max_length=64)] = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
) -> list[ShiftOut]:
    """Shifts overlapping [since, until) (default: the coming week from now), up to 1000."""
    since = since or now
    until = until or since + _WEEK
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            _SHIFTS + " AND sh.ends_at > %(since)s AND sh.starts_at < %(until)s"
            " ORDER BY sh.starts_at, sh.id LIMIT 1000",
            {"units": await units_under(conn, me, unit), "since": since, "until": until})
        return [ShiftOut(**r) for r in await cur.fetchall()]


@router.post("/shifts", response_model=ShiftOut, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "no such person in your units"},
                        409: {"description": "the person has a shift starting then"}})
async def create_shift(body: ShiftCreate, conn: Conn, me: Manager, now: Now) -> ShiftOut:
    if body.ends_at <= body.starts_at:
        raise HTTPException(422, "a shift ends after it starts")
    if body.ends_at - body.starts_at > _DAY * 2:
        raise HTTPException(422, "a shift lasts at most 48 hours")
    await _staff(conn, me, now, body.staff_id)
    cur = await conn.execute(
        "INSERT INTO shifts (staff_id, starts_at, ends_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (staff_id, starts_at) DO NOTHING RETURNING id",
        (body.staff_id, body.starts_at, body.ends_at))
    row = await cur.fetchone()
    if row is None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"{body.staff_id} has a shift starting at {body.starts_at}")
    return await _shift(conn, me, row[0])


async def _shift(conn: psycopg.AsyncConnection[Any], me: Principal, shift_id: int) -> ShiftOut:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SHIFTS + " AND sh.id = %(id)s", {"units": me.unit_list, "id": shift_id})
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no shift {shift_id}")
    return ShiftOut(**row)


@router.delete("/shifts/{shift_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses=NOT_FOUND)
async def delete_shift(shift_id: Annotated[int, Path(ge=1, le=2**63 - 1)], conn: Conn,
                       me: Manager) -> None:
    await _shift(conn, me, shift_id)
    await conn.execute("DELETE FROM shifts WHERE id = %s", (shift_id,))
