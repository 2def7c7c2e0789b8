"""What the API shows of an alert: one query for the alert, its site, unit, resident and
the device's "help is coming" confirmation, scoped to the caller and masked for levels
above the responsible unit until the alert escalates to them (ARCHITECTURE §7)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from pydantic import BaseModel

from alerting.model import Alert
from gateway.alerts.store import Finish
from gateway.api.principal import Principal, mask_address, mask_name, mask_phone

# The rung of the ladder that reaches each tier above the responsible unit (ARCHITECTURE
# §5 defaults): an alert at or past it, or one that notified the tier's role (smoke
# informs the bureau at once), is the tier's to see in full.
_TIER = {"street": (2, "street"), "bureau": (3, "bureau")}

_ALERT_FROM = """
SELECT a.id, a.site_id, a.device_id, a.type, a.severity, a.status, a.level, a.count,
       a.opened_at, a.last_seen_at, a.acknowledged_at, a.acknowledged_by, a.on_scene_at,
       a.on_scene_by, a.resolved_at, a.resolved_by, a.outcome, a.next_step_at, a.epoch,
       s.name AS site_name, s.address AS site_address, s.kind AS site_kind,
       s.organisation_id AS unit_id, o.name AS unit_name, o.parent_id AS unit_parent,
       r.id AS resident_id, r.name AS resident_name, r.birth_year, r.phone AS resident_phone,
       r.notes AS resident_notes, r.lives_alone,
       fc.name AS family_name, fc.phone AS family_phone,
       cr.outcome AS device_answer, cr.time AS device_answer_at,
       (SELECT array_agg(DISTINCT n.role) FROM notifications n WHERE n.alert_id = a.id)
           AS roles_notified
FROM alerts a
JOIN sites s ON s.id = a.site_id
JOIN organisations o ON o.id = s.organisation_id
LEFT JOIN devices d ON d.site_id = a.site_id AND d.id = a.device_id
LEFT JOIN LATERAL (
    SELECT * FROM residents rr
    WHERE rr.id = d.resident_id OR (d.resident_id IS NULL AND rr.site_id = a.site_id)
    ORDER BY rr.id = d.resident_id DESC NULLS LAST, rr.id LIMIT 1
) r ON true
LEFT JOIN LATERAL (
    SELECT f.name, f.phone FROM family_contacts f WHERE f.resident_id = r.id
    ORDER BY f.rank, f.name LIMIT 1
) fc ON true
LEFT JOIN LATERAL (
    SELECT c.outcome, c.time FROM downlink_outbox x JOIN command_results c USING (command_id)
    WHERE x.alert_id = a.id AND x.action = 'acknowledge' ORDER BY c.time DESC LIMIT 1
) cr ON true
"""
ALERT_SELECT = _ALERT_FROM + "WHERE s.organisation_id = ANY(%(units)s)\n"


class SiteView(BaseModel):
    id: str
    name: str
    kind: str
    address: str | None


class UnitView(BaseModel):
    id: str
    name: str


class ResidentView(BaseModel):
    id: int
    name: str | None
    initials: str | None
    age: int | None
    phone: str | None
    conditions: str | None
    lives_alone: bool
    family_contact: str | None
    family_phone: str | None


class AlertView(BaseModel):
    id: uuid.UUID
    type: str
    severity: str
    status: str
    level: int
    count: int
    opened_at: datetime
    last_seen_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    on_scene_at: datetime | None
    on_scene_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    outcome: str | None
    next_escalation_at: datetime | None
    device_id: str | None
    site: SiteView
    unit: UnitView
    resident: ResidentView | None
    # the resident's device said "help is coming" was shown (executed) or not
    device_confirmation: str | None
    device_confirmed_at: datetime | None
    masked: bool


def escalated_to(me: Principal, level: int, roles: Sequence[str] | None) -> bool:
    tier = _TIER.get(me.organisation_kind)
    if tier is None:
        return True
    rung, role = tier
    return level >= rung or role in (roles or ())


def view_from_row(me: Principal, r: dict[str, Any], now: datetime | None = None) -> AlertView:
    masked = me.above_units() and not escalated_to(me, r["level"], r["roles_notified"])
    now = now or datetime.now(UTC)
    resident = None
    if r["resident_id"] is not None:
        name = r["resident_name"]
        resident = ResidentView(
            id=r["resident_id"],
            name=mask_name(name) if masked else name,
            initials=name[:1] if name else None,
            age=now.year - r["birth_year"] if r["birth_year"] else None,
            phone=mask_phone(r["resident_phone"]) if masked else r["resident_phone"],
            conditions=None if masked else r["resident_notes"],
            lives_alone=r["lives_alone"],
            family_contact=mask_name(r["family_name"]) if masked else r["family_name"],
            family_phone=mask_phone(r["family_phone"]) if masked else r["family_phone"],
        )
    return AlertView(
        id=r["id"], type=r["type"], severity=r["severity"], status=r["status"],
        level=r["level"], count=r["count"], opened_at=r["opened_at"],
        last_seen_at=r["last_seen_at"], acknowledged_at=r["acknowledged_at"],
        acknowledged_by=r["acknowledged_by"], on_scene_at=r["on_scene_at"],
        on_scene_by=r["on_scene_by"], resolved_at=r["resolved_at"],
        resolved_by=r["resolved_by"], outcome=r["outcome"],
        next_escalation_at=r["next_step_at"] if r["status"] != "resolved" else None,
        device_id=r["device_id"],
        site=SiteView(id=r["site_id"], name=r["site_name"], kind=r["site_kind"],
                      address=mask_address(r["site_address"]) if masked else r["site_address"]),
        unit=UnitView(id=r["unit_id"], name=r["unit_name"]),
        resident=resident,
        device_confirmation=r["device_answer"],
        device_confirmed_at=r["device_answer_at"],
        masked=masked,
    )  # fmt: skip


async def alert_views(
    conn: psycopg.AsyncConnection[Any], me: Principal, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, AlertView]:
    """The views of those of ``ids`` the caller may see (others are simply absent)."""
    if not ids:
        return {}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(ALERT_SELECT + " AND a.id = ANY(%(ids)s)",
                          {"units": me.unit_list, "ids": list(ids)})
        rows = await cur.fetchall()
    return {r["id"]: view_from_row(me, r) for r in rows}


async def request_alert_row(
    conn: psycopg.AsyncConnection[Any], alert_id: uuid.UUID
) -> Finish[dict[str, Any] | None]:
    """Send the read of one alert's view row (``store.Finish``), not scoped: sent before
    the caller's units are known, the caller checks ``row["unit_id"] in me.units`` and
    answers the same 404 for another unit's alert as for one that does not exist."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_ALERT_FROM + "WHERE a.id = %(id)s", {"id": alert_id})

    async def finish() -> dict[str, Any] | None:
        row = await cur.fetchone()
        await cur.close()
        return row

    return finish


def row_after(r: dict[str, Any], alert: Alert, next_step_at: datetime | None) -> dict[str, Any]:
    """A view row read before a command, with the alert's state after it (what the
    command wrote), so the answer needs no second read of the view."""
    return r | {
        "severity": alert.severity.value, "status": alert.status.value, "level": alert.level,
        "count": alert.count, "last_seen_at": alert.last_seen_at,
        "acknowledged_at": alert.acknowledged_at, "acknowledged_by": alert.acknowledged_by,
        "on_scene_at": alert.on_scene_at, "on_scene_by": alert.on_scene_by,
        "resolved_at": alert.resolved_at, "resolved_by": alert.resolved_by,
        "outcome": alert.outcome.value if alert.outcome else None,
        "next_step_at": next_step_at, "epoch": alert.epoch,
    }  # fmt: skip
