"""A resident's rights under PIPL: a copy of everything held about them (art. 45) and
erasure (art. 47); who read their sensitive data and when (art. 51's access log).

Erase pseudonymises the resident in place (the id stays, so alerts, steps and the
access log still join), deletes their family contacts and the raw telemetry of the
devices they wore, unlinks those devices (the vital-sign watch stops) and, for a home
no one else lives in, clears its address and coordinates. It never touches
``alert_audit``: the chain is append-only and hash-linked (alerting/audit.py), and its
rows hold ids, roles and delivery facts — the record of an emergency response, kept
as the law requiring it (PIPL art. 13(3)/47: retention required by other laws) —
so ``eldersafe audit verify`` still passes after an erase.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Path, Query
from psycopg.rows import dict_row
from pydantic import BaseModel

from gateway.alerts.vitals import UNWATCH_WRISTBANDS, VITAL_PROFILES
from gateway.api.deps import Conn, Manager, Now
from gateway.api.principal import Principal
from gateway.api.privacy import record_read
from gateway.api.routes.residents import resident_row

router = APIRouter(prefix="/api/residents", tags=["privacy"])

ResidentId = Annotated[int, Path(ge=1, le=2**63 - 1)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such resident in your units"}}
EXPORT_TELEMETRY_ROWS = 100_000

_DEVICES = "SELECT site_id, id, profile, address, description, created_at FROM devices" \
           " WHERE resident_id = %s ORDER BY site_id, id"
_TELEMETRY = """
SELECT t.time, t.device_id, t.metric, t.value, t.unit FROM telemetry t
JOIN devices d ON d.site_id = t.site_id AND d.id = t.device_id
WHERE d.resident_id = %s ORDER BY t.time, t.device_id, t.metric LIMIT %s
"""
_ALERTS = """
SELECT a.id, a.type, a.severity, a.status, a.opened_at, a.acknowledged_at, a.on_scene_at,
       a.resolved_at, a.outcome, a.device_id
FROM alerts a JOIN devices d ON d.site_id = a.site_id AND d.id = a.device_id
WHERE d.resident_id = %s ORDER BY a.opened_at
"""
_AUDIT = """
SELECT alert_id, seq, time, actor, action, channel, detail FROM alert_audit
WHERE alert_id = ANY(%s) ORDER BY alert_id, seq
"""
_READS = """
SELECT time, actor, what, alert_id, detail FROM sensitive_reads WHERE resident_id = %s
ORDER BY time, id
"""


class ResidentExport(BaseModel):
    exported_at: datetime
    resident: dict[str, Any]
    family_contacts: list[dict[str, Any]]
    site: dict[str, Any]
    devices: list[dict[str, Any]]
    telemetry: list[dict[str, Any]]
    telemetry_truncated: bool
    alerts: list[dict[str, Any]]
    alert_audit: list[dict[str, Any]]
    sensitive_reads: list[dict[str, Any]]


class ErasureReport(BaseModel):
    resident_id: int
    erased_at: datetime
    family_contacts_deleted: int
    telemetry_rows_deleted: int
    devices_unlinked: int
    home_cleared: bool


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str,
                params: Any) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return list(await cur.fetchall())


@router.get("/{resident_id}/export", response_model=ResidentExport, responses=NOT_FOUND)
async def export_resident(resident_id: ResidentId, conn: Conn, me: Manager,
                          now: Now) -> ResidentExport:
    """Everything held about one resident, unmasked, as JSON; the export itself is
    recorded as a read of their sensitive data."""
    await resident_row(conn, me, resident_id)
    (resident,) = await _rows(conn, "SELECT * FROM residents WHERE id = %s", (resident_id,))
    family = await _rows(conn, "SELECT name, phone, apprise_url, rank FROM family_contacts"
                               " WHERE resident_id = %s ORDER BY rank, name", (resident_id,))
    (site,) = await _rows(conn, "SELECT id, organisation_id, kind, name, address, latitude,"
                                " longitude FROM sites WHERE id = %s", (resident["site_id"],))
    telemetry = await _rows(conn, _TELEMETRY, (resident_id, EXPORT_TELEMETRY_ROWS + 1))
    alerts = await _rows(conn, _ALERTS, (resident_id,))
    audit = await _rows(conn, _AUDIT, ([a["id"] for a in alerts],))
    reads = await _rows(conn, _READS, (resident_id,))
    await record_read(conn, me, "export", resident_id=resident_id, site_id=site["id"],
                      detail={"telemetry_rows": min(len(telemetry), EXPORT_TELEMETRY_ROWS)})
    return ResidentExport(
        exported_at=now, resident=resident, family_contacts=family, site=site,
        devices=await _rows(conn, _DEVICES, (resident_id,)),
        telemetry=telemetry[:EXPORT_TELEMETRY_ROWS],
        telemetry_truncated=len(telemetry) > EXPORT_TELEMETRY_ROWS,
        alerts=alerts, alert_audit=audit, sensitive_reads=reads,
    )  # fmt: skip


async def erase(conn: psycopg.AsyncConnection[Any], me: Principal, resident_id: int,
                now: datetime) -> ErasureReport:
    """The erasure in one transaction: all of it or none."""
    async with conn.transaction():
        cur = await conn.execute("SELECT site_id FROM residents WHERE id = %s FOR UPDATE",
                                 (resident_id,))
        (site_id,) = await cur.fetchone() or (None,)
        family = (await conn.execute(
            "DELETE FROM family_contacts WHERE resident_id = %s", (resident_id,))).rowcount
        # Delivered notices to their family keep the audit's facts; the outbox copy of
        # the number is cleared (a pending one still goes out: an alert is never cut short).
        await conn.execute(
            "UPDATE notifications SET target = '', text = '' WHERE person_id LIKE %s"
            " AND status <> 'pending'", (f"family:{resident_id}:%",))
        telemetry = (await conn.execute(
            "DELETE FROM telemetry t USING devices d WHERE d.site_id = t.site_id"
            " AND d.id = t.device_id AND d.resident_id = %s", (resident_id,))).rowcount
        devices = (await conn.execute(
            "UPDATE devices SET resident_id = NULL WHERE resident_id = %s",
            (resident_id,))).rowcount
        await conn.execute(UNWATCH_WRISTBANDS, {"profiles": list(VITAL_PROFILES)})
        await conn.execute("DELETE FROM inactivity_watch WHERE resident_id = %s", (resident_id,))
        await conn.execute(
            "UPDATE residents SET name = %s, external_id = NULL, birth_year = NULL,"
            " phone = NULL, family_contact_name = NULL, family_contact_phone = NULL,"
            " notes = NULL, lives_alone = false, heart_rate_min = NULL, heart_rate_max = NULL,"
            " spo2_min = NULL WHERE id = %s", (f"erased-{resident_id}", resident_id))
        cleared = (await conn.execute(
            "UPDATE sites s SET name = 'erased-' || s.id, address = NULL, latitude = NULL,"
            " longitude = NULL WHERE s.id = %s AND s.kind = 'home' AND NOT EXISTS ("
            " SELECT 1 FROM residents r WHERE r.site_id = s.id AND r.id <> %s"
            " AND r.name NOT LIKE 'erased-%%')", (site_id, resident_id))).rowcount
        await record_read(conn, me, "erase", resident_id=resident_id, site_id=site_id,
                          detail={"telemetry_rows": telemetry, "family_contacts": family})
    return ErasureReport(resident_id=resident_id, erased_at=now,
                         family_contacts_deleted=family, telemetry_rows_deleted=telemetry,
                         devices_unlinked=devices, home_cleared=cleared > 0)


@router.post("/{resident_id}/erase", response_model=ErasureReport, responses=NOT_FOUND)
async def erase_resident(resident_id: ResidentId, conn: Conn, me: Manager,
                         now: Now) -> ErasureReport:
    """Erase one resident's personal data (a supervisor of their unit or an admin)."""
    await resident_row(conn, me, resident_id)
    return await erase(conn, me, resident_id, now)


class SensitiveRead(BaseModel):
    time: datetime
    actor: str
    what: str
    alert_id: uuid.UUID | None
    detail: dict[str, Any]


@router.get("/{resident_id}/reads", response_model=list[SensitiveRead], responses=NOT_FOUND)
async def sensitive_reads_of(
    resident_id: ResidentId, conn: Conn, me: Manager,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[SensitiveRead]:
    """Who read this resident's health readings and locations, newest first."""
    await resident_row(conn, me, resident_id)
    rows = await _rows(conn, "SELECT time, actor, what, alert_id, detail FROM sensitive_reads"
                             " WHERE resident_id = %s ORDER BY time DESC, id DESC LIMIT %s",
                       (resident_id, limit))
    return [SensitiveRead(**r) for r in rows]
