"""Alerts: list and filter, one alert with its timeline, and what staff do to it
(acknowledge, on scene, resolve with an outcome, comment, reopen)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from alerting.lifecycle import Command, CommandKind, IllegalTransition, acknowledge, on_scene
from alerting.lifecycle import reopen as reopen_command
from alerting.lifecycle import resolve as resolve_command
from alerting.model import Alert, Channel, Outcome
from alerting.planner import escalate_by_hand
from gateway.alerts.directory import Directory, load_policy_book
from gateway.alerts.store import Finish, finished
from gateway.alerts.unit_of_work import Commanded, CommandReads, command, request_command
from gateway.api.deps import (
    Caller,
    Conn,
    CurrentUser,
    Now,
    caller_actor,
    request_principal,
)
from gateway.api.idempotency import Answer, IdempotencyKey, once, once_sent
from gateway.api.pagination import decode_cursor, encode_cursor
from gateway.api.principal import Principal
from gateway.api.security import TokenClaims
from gateway.api.views import (
    ALERT_SELECT,
    AlertView,
    alert_views,
    request_alert_row,
    row_after,
    view_from_row,
)

router = APIRouter(prefix="/api/alerts", tags=["alerts"])
_Route = TypeVar("_Route", bound=Callable[..., Any])

AlertStatusName = Literal["open", "acknowledged", "on_scene", "resolved"]
AlertTypeName = Literal["sos", "fall", "smoke", "electrical", "vital_signs", "inactivity",
                        "wandering", "device_offline", "low_battery", "tamper", "device_fault"]
SeverityName = Literal["critical", "major", "minor"]
OutcomeName = Literal["handled", "false_alarm", "sent_to_hospital", "cancelled_by_resident",
                      "transferred", "cleared", "deceased"]
_BAD_TEXT = r"^[^\x00]*$"


class AlertPage(BaseModel):
    items: list[AlertView]
    next_cursor: str | None


class TimelineEntry(BaseModel):
    seq: int
    time: datetime
    actor: str
    actor_name: str | None
    action: str
    channel: str | None
    detail: dict[str, Any]


class AlertDetail(AlertView):
    timeline: list[TimelineEntry]


class ResolveBody(BaseModel):
    outcome: OutcomeName
    note: str = Field("", max_length=2000, pattern=_BAD_TEXT)


class NoteBody(BaseModel):
    text: str = Field(min_length=1, max_length=2000, pattern=_BAD_TEXT)


class EscalateBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, pattern=_BAD_TEXT)


class ReopenBody(BaseModel):
    note: str = Field("", max_length=2000, pattern=_BAD_TEXT)


def not_found(alert_id: uuid.UUID) -> HTTPException:
    # The same words whether the alert does not exist or is another unit's.
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")


@router.get("", response_model=AlertPage)
async def list_alerts(
    conn: Conn,
    me: CurrentUser,
    state: Annotated[list[AlertStatusName] | None, Query(alias="status")] = None,
    type: Annotated[list[AlertTypeName] | None, Query()] = None,
    severity: Annotated[list[SeverityName] | None, Query()] = None,
    unit: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> AlertPage:
    """Newest first. ``unit`` narrows to one organisation of yours (and below it)."""
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise HTTPException(422,
                                "since/until need a time zone (e.g. 2026-11-23T08:00:00+08:00)")
    units = me.units
    if unit is not None:
        # someone else's unit is simply an empty list, like a unit that does not exist
        cur = await conn.execute(
            "WITH RECURSIVE sub AS (SELECT id FROM organisations WHERE id = %s UNION ALL "
            "SELECT o.id FROM organisations o JOIN sub ON o.parent_id = sub.id) "
            "SELECT id FROM sub", (unit,))
        units = units & {r[0] for r in await cur.fetchall()}
    sql = [ALERT_SELECT]
    params: dict[str, Any] = {"units": sorted(units)}
    if state:
        sql.append("AND a.status = ANY(%(status)s)")
        params["status"] = list(state)
    if type:
        sql.append("AND a.type = ANY(%(type)s)")
        params["type"] = list(type)
    if severity:
        sql.append("AND a.severity = ANY(%(severity)s)")
        params["severity"] = list(severity)
    if since is not None:
        sql.append("AND a.opened_at >= %(since)s")
        params["since"] = since
    if until is not None:
        sql.append("AND a.opened_at < %(until)s")
        params["until"] = until
    if cursor is not None:
        at, key = decode_cursor(cursor)
        try:
            params["c_id"] = uuid.UUID(key)
        except ValueError:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                "cursor is not one this API gave out") from None
        params["c_at"] = at
        sql.append("AND (a.opened_at, a.id) < (%(c_at)s, %(c_id)s)")
    sql.append("ORDER BY a.opened_at DESC, a.id DESC LIMIT %(limit)s")
    params["limit"] = limit + 1
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("\n".join(sql), params)
        rows = await cur.fetchall()
    items = [view_from_row(me, r) for r in rows[:limit]]
    nxt = encode_cursor(rows[limit - 1]["opened_at"], rows[limit - 1]["id"]) \
        if len(rows) > limit else None
    return AlertPage(items=items, next_cursor=nxt)


async def _timeline(conn: Conn, alert_id: uuid.UUID, masked: bool) -> list[TimelineEntry]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT a.seq, a.time, a.actor, a.action, a.channel, a.detail, s.name AS staff_name"
            " FROM alert_audit a LEFT JOIN staff s ON a.actor = 'staff:' || s.id"
            " WHERE a.alert_id = %s ORDER BY a.seq", (alert_id,))
        rows = await cur.fetchall()
    return [TimelineEntry(seq=r["seq"], time=r["time"], actor=r["actor"],
                          actor_name=r["staff_name"], action=r["action"], channel=r["channel"],
                          detail={} if masked else dict(r["detail"] or {})) for r in rows]


async def _one(conn: Conn, me: Principal, alert_id: uuid.UUID) -> AlertView:
    views = await alert_views(conn, me, [alert_id])
    if alert_id not in views:
        raise not_found(alert_id)
    return views[alert_id]


@router.get("/{alert_id}", response_model=AlertDetail)
async def get_alert(alert_id: uuid.UUID, conn: Conn, me: CurrentUser) -> AlertDetail:
    view = await _one(conn, me, alert_id)
    timeline = await _timeline(conn, alert_id, view.masked)
    return AlertDetail(**view.model_dump(), timeline=timeline)


async def _commanded(
    conn: Conn, me: Principal, alert_id: uuid.UUID, now: datetime,
    make: Callable[[Alert], Command], sent: Finish[CommandReads] | None = None,
) -> Commanded:
    try:
        return await command(conn, alert_id, make, now, worker=f"api:{me.actor}", sent=sent)
    except IllegalTransition as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except LookupError:
        raise not_found(alert_id) from None


async def _act(
    conn: Conn, caller: Principal | TokenClaims, key: str | None, path: str,
    alert_id: uuid.UUID, now: datetime, make: Callable[[Alert], Command],
) -> JSONResponse:
    """Who, scope, command, answer in one transaction and, under load, as few turns of
    the shared event loop as can be: every round trip waits behind the feed and the
    engine (bench/README.md, api.py). One round trip for every read: the token's person
    (row, token_version, units), the Idempotency-Key's lock and lookup, the command's
    reads (the alert's lock, policy overrides, unit path, device, fired steps, chain head)
    and the alert's view; a second for the writes and the COMMIT. Checked in this order:
    the token (401, before any stored answer is replayed), the key (replay, 422), the
    scope (404, the same for another unit's alert as for a missing one, never a 409 that
    says it exists), the command (409). The answer is the view read with the command, in
    the state the command wrote."""
    actor = caller_actor(caller)

    async def send() -> Answer:
        who = (finished(caller) if isinstance(caller, Principal)
               else await request_principal(conn, caller))
        reads = await request_command(conn, alert_id, worker=f"api:{actor}")
        view = await request_alert_row(conn, alert_id)  # after the lock: current
        me = await who()  # the round trip of every statement sent so far

        async def answer() -> AlertView:
            row = await view()
            if row is None or row["unit_id"] not in me.units:
                raise not_found(alert_id)
            done = await _commanded(conn, me, alert_id, now, make, sent=reads)
            if done.alert is None or done.steps:
                # a step fired with it: its notices may unmask the alert for its reader
                return await _one(conn, me, alert_id)
            return view_from_row(me, row_after(row, done.alert, done.next_step_at))

        return answer

    return await once_sent(conn, actor, key, "POST", path, send)


def _route_action(path: str, summary: str) -> Callable[[_Route], _Route]:
    return router.post(path, response_model=AlertView, summary=summary,
                       responses={404: {"description": "no such alert in your units"},
                                  409: {"description": "the alert's status does not allow it"}})


@_route_action("/{alert_id}/acknowledge", "I take charge: stops the escalation at this level")
async def acknowledge_alert(alert_id: uuid.UUID, conn: Conn, caller: Caller, now: Now,
                            request: Request, key: IdempotencyKey = None) -> Any:
    return await _act(conn, caller, key, request.url.path, alert_id, now,
                      lambda a: acknowledge(caller_actor(caller), Channel.CONSOLE))


@_route_action("/{alert_id}/on-scene", "Someone is with the resident")
async def on_scene_alert(alert_id: uuid.UUID, conn: Conn, caller: Caller, now: Now,
                         request: Request, key: IdempotencyKey = None) -> Any:
    return await _act(conn, caller, key, request.url.path, alert_id, now,
                      lambda a: on_scene(caller_actor(caller), Channel.CONSOLE))


@_route_action("/{alert_id}/resolve", "Close the alert with its outcome")
async def resolve_alert(alert_id: uuid.UUID, body: ResolveBody, conn: Conn, caller: Caller,
                        now: Now, request: Request, key: IdempotencyKey = None) -> Any:
    return await _act(conn, caller, key, request.url.path, alert_id, now, lambda a: resolve_command(
        caller_actor(caller), Channel.CONSOLE, Outcome(body.outcome), body.note))


@_route_action("/{alert_id}/reopen", "Reopen a resolved alert (a cancel that was not one)")
async def reopen_alert(alert_id: uuid.UUID, body: ReopenBody, conn: Conn, caller: Caller,
                       now: Now, request: Request, key: IdempotencyKey = None) -> Any:
    return await _act(conn, caller, key, request.url.path, alert_id, now,
                      lambda a: reopen_command(caller_actor(caller), Channel.CONSOLE, body.note))


@_route_action("/{alert_id}/comments", "Add a comment to the alert's record")
async def comment_alert(alert_id: uuid.UUID, body: NoteBody, conn: Conn, caller: Caller,
                        now: Now, request: Request, key: IdempotencyKey = None) -> Any:
    return await _act(conn, caller, key, request.url.path, alert_id, now,
                      lambda a: Command(CommandKind.NOTE, caller_actor(caller), Channel.CONSOLE,
                                        note=body.text))


@_route_action("/{alert_id}/escalate", "Call the next rung of the ladder now, with a reason")
async def escalate_alert(alert_id: uuid.UUID, body: EscalateBody, conn: Conn, me: CurrentUser,
                         now: Now, request: Request, key: IdempotencyKey = None) -> Any:
    """For an open alert: the rung above its level fires at once (the supervisor, the
    street...), the audit names who escalated and why; 409 at the top rung."""

    async def run() -> AlertView:
        view = await _one(conn, me, alert_id)  # 404 before any 409
        directory = Directory(conn, await load_policy_book(conn))
        await directory.preload([view.site.id])
        await _commanded(conn, me, alert_id, now, lambda a: escalate_by_hand(
            a, directory.policy_for(a), me.actor, Channel.CONSOLE, body.reason))
        return await _one(conn, me, alert_id)

    return await once(conn, me, key, "POST", request.url.path, run)
