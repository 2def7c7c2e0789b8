"""Devices: registration, status, last readings, and commands with their results.

Registration checks the profile against the registry the edge uses
(``device_drivers.profiles``; its kind's address rules from ``device_drivers.kinds``).
A command goes where the engine's go: a row in ``downlink_outbox`` that every
server's ``DownlinkWorkers`` publish, its result in ``command_results`` (written by
ingest). A command serves an alert of the device's site — that is what the outbox
rows are keyed to, and what makes the device's answer land in that alert's audit
chain (downlink.record_result) next to the note of who sent it. An action the
device's profile cannot carry out is refused here, as the engine never queues one.

Last readings of a wristband, and any vital or position reading, are sensitive
(PIPL art. 28): each read is recorded; above the responsible unit their values are
masked unless the alert given with ``?alert=`` has escalated to the caller.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field, ValidationError

import device_drivers  # noqa: F401  registers the shipped profiles and kinds
from alerting.lifecycle import Command, CommandKind, IllegalTransition
from alerting.model import Channel
from device_drivers import kinds as device_kinds
from device_drivers import profiles as device_profiles
from gateway.alerts.unit_of_work import command
from gateway.alerts.vitals import UNWATCH_WRISTBANDS, VITAL_PROFILES, WATCH_WRISTBANDS
from gateway.api.deps import Conn, CurrentUser, Manager, Now
from gateway.api.idempotency import IdempotencyKey, once
from gateway.api.pagination import decode_cursor, encode_cursor
from gateway.api.principal import Principal
from gateway.api.privacy import (
    is_sensitive,
    record_read,
    resident_of_device,
    served_alert,
    shown_in_full,
)
from gateway.api.routes.organisations import Text, units_under
from gateway.api.routes.sites import site_not_found
from gateway.contract.payloads import CommandAction, CommandPayload, DataKey, Scalar

router = APIRouter(prefix="/api/devices", tags=["devices"])

SiteId = Annotated[str, Path(max_length=64)]
DeviceId = Annotated[str, Path(max_length=64)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such device (or alert, command) in your units"}}

_SELECT = """
SELECT d.site_id, d.id, d.profile, d.address, d.resident_id, d.description, d.created_at,
       s.organisation_id, st.online, st.battery, st.rssi, st.detail AS status_detail,
       st.time AS status_time
FROM devices d JOIN sites s ON s.id = d.site_id
LEFT JOIN device_status st ON st.site_id = d.site_id AND st.device_id = d.id
WHERE s.organisation_id = ANY(%(units)s)
"""
_LAST_READINGS = """
SELECT DISTINCT ON (metric) metric, value, unit, time FROM telemetry
WHERE site_id = %s AND device_id = %s AND time > now() - interval '30 days'
ORDER BY metric, time DESC
"""
_COMMAND = """
SELECT o.command_id, o.alert_id, o.action, o.args, o.created_at, o.published_at, o.attempts,
       o.last_error, r.outcome, r.reason, r.via, r.time AS result_time
FROM downlink_outbox o LEFT JOIN command_results r USING (command_id)
WHERE o.site_id = %(site)s AND o.device_id = %(device)s
"""
_DOWNLINK = """
INSERT INTO downlink_outbox (command_id, alert_id, site_id, device_id, action, args, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""


class DeviceStatus(BaseModel):
    online: bool
    battery: int | None
    rssi: int | None
    detail: str | None
    time: datetime


class DeviceOut(BaseModel):
    site_id: str
    id: str
    organisation_id: str
    profile: str
    address: str
    resident_id: int | None
    description: str | None
    created_at: datetime
    status: DeviceStatus | None


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class DeviceCreate(BaseModel):
    site_id: Annotated[str, Field(max_length=64)]
    id: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,64}$")]
    profile: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")]
    address: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00]*$")]
    resident_id: int | None = Field(None, ge=1, le=2**63 - 1)
    description: Text | None = None


class DeviceUpdate(BaseModel):
    resident_id: int | None = Field(None, ge=1, le=2**63 - 1)
    description: Text | None = None


class Reading(BaseModel):
    metric: str
    value: float | None
    unit: str
    time: datetime
    sensitive: bool
    masked: bool


class CommandIn(BaseModel):
    action: CommandAction
    alert_id: uuid.UUID = Field(description="the alert of this site the command serves")
    args: dict[DataKey, Scalar] = Field(default_factory=dict, max_length=16)


class CommandResult(BaseModel):
    outcome: str
    reason: str | None
    via: str | None
    time: datetime


class CommandOut(BaseModel):
    command_id: uuid.UUID
    alert_id: uuid.UUID | None
    action: str
    args: dict[str, Any]
    created_at: datetime
    published_at: datetime | None
    attempts: int
    last_error: str | None
    result: CommandResult | None


def device_not_found(site_id: str, device_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no device {site_id}/{device_id}")


def device_out(r: dict[str, Any]) -> DeviceOut:
    state = None if r["online"] is None else DeviceStatus(
        online=r["online"], battery=r["battery"], rssi=r["rssi"], detail=r["status_detail"],
        time=r["status_time"])
    return DeviceOut(site_id=r["site_id"], id=r["id"], organisation_id=r["organisation_id"],
                     profile=r["profile"], address=r["address"], resident_id=r["resident_id"],
                     description=r["description"], created_at=r["created_at"], status=state)


async def device_row(
    conn: psycopg.AsyncConnection[Any], me: Principal, site_id: str, device_id: str
) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT + " AND d.site_id = %(site)s AND d.id = %(id)s",
                          {"units": me.unit_list, "site": site_id, "id": device_id})
        row = await cur.fetchone()
    if row is None:
        raise device_not_found(site_id, device_id)
    return row


@router.get("", response_model=DevicePage)
async def list_devices(
    conn: Conn,
    me: CurrentUser,
    site: Annotated[str | None, Query(max_length=64)] = None,
    unit: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DevicePage:
    """Newest first, each with its latest status; ``site`` / ``unit`` narrow the list."""
    params: dict[str, Any] = {"units": await units_under(conn, me, unit), "limit": limit + 1}
    sql = _SELECT
    if site is not None:
        sql += " AND d.site_id = %(site)s"
        params["site"] = site
    if cursor is not None:
        at, key = decode_cursor(cursor)
        c_site, _, c_id = key.partition("/")
        params |= {"c_at": at, "c_site": c_site, "c_id": c_id}
        sql += " AND (d.created_at, d.site_id, d.id) < (%(c_at)s, %(c_site)s, %(c_id)s)"
    sql += " ORDER BY d.created_at DESC, d.site_id DESC, d.id DESC LIMIT %(limit)s"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        rows = await cur.fetchall()
    last = rows[limit - 1] if len(rows) > limit else None
    nxt = encode_cursor(last["created_at"], f"{last['site_id']}/{last['id']}") if last else None
    return DevicePage(items=[device_out(r) for r in rows[:limit]], next_cursor=nxt)


@router.get("/{site_id}/{device_id}", response_model=DeviceOut, responses=NOT_FOUND)
async def get_device(site_id: SiteId, device_id: DeviceId, conn: Conn,
                     me: CurrentUser) -> DeviceOut:
    return device_out(await device_row(conn, me, site_id, device_id))


def _check_profile(profile_name: str, address: str) -> str:
    """The address as the edge spells it; 422 naming what is wrong."""
    try:
        profile = device_profiles.get(profile_name)
    except KeyError as exc:
        raise HTTPException(422, str(exc.args[0])) from None
    for kind in device_kinds.all_kinds().values():
        if profile.transport == kind.TRANSPORT:
            address = kind.normalise_address(address)
            error = kind.address_error(address)
            if error is not None:
                raise HTTPException(422, f"address {address!r} for a {kind.KIND} device: {error}")
            break
    return address


async def _resident_at_site(
    conn: psycopg.AsyncConnection[Any], resident_id: int | None, site_id: str
) -> None:
    if resident_id is None:
        return
    cur = await conn.execute("SELECT 1 FROM residents WHERE id = %s AND site_id = %s",
                             (resident_id, site_id))
    if await cur.fetchone() is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no resident {resident_id} at site {site_id}")


async def _rewatch(conn: psycopg.AsyncConnection[Any]) -> None:
    """The vital-sign sweep watches wristbands worn by a resident (gateway.alerts.vitals)."""
    await conn.execute(WATCH_WRISTBANDS, {"profiles": list(VITAL_PROFILES)})
    await conn.execute(UNWATCH_WRISTBANDS, {"profiles": list(VITAL_PROFILES)})


@router.post("", response_model=DeviceOut, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "no such site or resident in your units"},
                        409: {"description": "the site has a device with this id"}})
async def register_device(body: DeviceCreate, conn: Conn, me: Manager) -> DeviceOut:
    cur = await conn.execute("SELECT 1 FROM sites WHERE id = %s AND organisation_id = ANY(%s)",
                             (body.site_id, me.unit_list))
    if await cur.fetchone() is None:
        raise site_not_found(body.site_id)
    address = _check_profile(body.profile, body.address)
    await _resident_at_site(conn, body.resident_id, body.site_id)
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO devices (site_id, id, profile, address, resident_id, description)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (site_id, id) DO NOTHING RETURNING id",
            (body.site_id, body.id, body.profile, address, body.resident_id, body.description))
        if await cur.fetchone() is None:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"site {body.site_id} has a device {body.id} already")
        await _rewatch(conn)
    return device_out(await device_row(conn, me, body.site_id, body.id))


@router.patch("/{site_id}/{device_id}", response_model=DeviceOut, responses=NOT_FOUND)
async def update_device(site_id: SiteId, device_id: DeviceId, body: DeviceUpdate, conn: Conn,
                        me: Manager) -> DeviceOut:
    """Who wears it (``resident_id``, null: nobody) and its description."""
    await device_row(conn, me, site_id, device_id)
    changes = body.model_dump(exclude_unset=True)
    if changes:
        await _resident_at_site(conn, changes.get("resident_id"), site_id)
        async with conn.transaction():
            sets = ", ".join(f"{k} = %({k})s" for k in changes)
            await conn.execute(
                f"UPDATE devices SET {sets} WHERE site_id = %(site)s AND id = %(id)s",
                changes | {"site": site_id, "id": device_id})
            await _rewatch(conn)
    return device_out(await device_row(conn, me, site_id, device_id))


@router.get("/{site_id}/{device_id}/readings", response_model=list[Reading],
            responses=NOT_FOUND)
async def last_readings(
    site_id: SiteId,
    device_id: DeviceId,
    conn: Conn,
    me: CurrentUser,
    alert: Annotated[uuid.UUID | None, Query(description="the alert this read serves")] = None,
) -> list[Reading]:
    """The newest reading of each metric (last 30 days). Health and position readings
    are recorded as sensitive reads, with the alert they serve."""
    device = await device_row(conn, me, site_id, device_id)
    served = await served_alert(conn, me, alert, site_id) if alert is not None else None
    open_to_me = shown_in_full(me, served)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_LAST_READINGS, (site_id, device_id))
        rows = await cur.fetchall()
    out: list[Reading] = []
    shown: list[str] = []
    for r in rows:
        sensitive = is_sensitive(r["metric"], device["profile"])
        masked = sensitive and not open_to_me
        if sensitive and not masked:
            shown.append(r["metric"])
        out.append(Reading(metric=r["metric"], value=None if masked else r["value"],
                           unit=r["unit"], time=r["time"], sensitive=sensitive, masked=masked))
    if shown:
        await record_read(conn, me, "last_readings",
                          resident_id=await resident_of_device(conn, site_id, device_id),
                          site_id=site_id, alert_id=alert,
                          detail={"device": device_id, "metrics": shown})
    return out


def _command_out(r: dict[str, Any]) -> CommandOut:
    result = None if r["outcome"] is None else CommandResult(
        outcome=r["outcome"], reason=r["reason"], via=r["via"], time=r["result_time"])
    return CommandOut(command_id=r["command_id"], alert_id=r["alert_id"], action=r["action"],
                      args=r["args"] if isinstance(r["args"], dict) else {},
                      created_at=r["created_at"], published_at=r["published_at"],
                      attempts=r["attempts"], last_error=r["last_error"], result=result)


async def _command_row(conn: psycopg.AsyncConnection[Any], site_id: str, device_id: str,
                       command_id: uuid.UUID) -> CommandOut:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_COMMAND + " AND o.command_id = %(cid)s",
                          {"site": site_id, "device": device_id, "cid": command_id})
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id}")
    return _command_out(row)


@router.post("/{site_id}/{device_id}/commands", response_model=CommandOut,
             status_code=status.HTTP_202_ACCEPTED,
             responses={**NOT_FOUND, 409: {"description": "the alert is resolved"},
                        422: {"description": "the device's profile cannot carry it out"}})
async def send_command(
    site_id: SiteId, device_id: DeviceId, body: CommandIn, conn: Conn, me: CurrentUser,
    now: Now, request: Request, key: IdempotencyKey = None,
) -> Any:
    """Queue a command for the device; its result shows in GET …/commands/{id} and in the
    alert's timeline once the edge answers."""
    device = await device_row(conn, me, site_id, device_id)
    served = await served_alert(conn, me, body.alert_id, site_id)
    if served["status"] == "resolved":
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"alert {body.alert_id} is resolved; commands serve open alerts")
    try:
        profile = device_profiles.get(device["profile"])
    except KeyError:
        profile = None  # not known here: sent, and the edge's answer says (as the engine does)
    if profile is not None and body.action.value not in profile.commands:
        raise HTTPException(422, f"a {profile.name} device cannot {body.action.value}; it can "
                                 f"{sorted(profile.commands)}")
    command_id = uuid.uuid4()
    try:
        CommandPayload(v=1, command_id=command_id, action=body.action, time=now,
                       args=dict(body.args), alert_id=body.alert_id)
    except ValidationError as exc:
        raise HTTPException(422, f"not a valid command: {exc.errors()[0]['msg']}") from None
    note = f"command {body.action.value} {command_id} sent to device {device_id}"

    async def run() -> CommandOut:
        async with conn.transaction():
            try:
                await command(conn, body.alert_id, lambda a: Command(
                    CommandKind.NOTE, me.actor, Channel.CONSOLE, note=note), now,
                    worker=f"api:{me.actor}")
            except IllegalTransition as exc:
                raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
            await conn.execute(_DOWNLINK, (command_id, body.alert_id, site_id, device_id,
                                           body.action.value, Jsonb(dict(body.args)), now))
        return await _command_row(conn, site_id, device_id, command_id)

    return await once(conn, me, key, "POST", request.url.path, run,
                      status.HTTP_202_ACCEPTED)


@router.get("/{site_id}/{device_id}/commands", response_model=list[CommandOut],
            responses=NOT_FOUND)
async def list_commands(
    site_id: SiteId, device_id: DeviceId, conn: Conn, me: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[CommandOut]:
    """The device's commands, newest first (the engine's and people's), with results."""
    await device_row(conn, me, site_id, device_id)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_COMMAND + " ORDER BY o.created_at DESC, o.command_id LIMIT %(n)s",
                          {"site": site_id, "device": device_id, "n": limit})
        rows = await cur.fetchall()
    return [_command_out(r) for r in rows]


@router.get("/{site_id}/{device_id}/commands/{command_id}", response_model=CommandOut,
            responses=NOT_FOUND)
async def get_command(site_id: SiteId, device_id: DeviceId, command_id: uuid.UUID, conn: Conn,
                      me: CurrentUser) -> CommandOut:
    await device_row(conn, me, site_id, device_id)
    return await _command_row(conn, site_id, device_id, command_id)
