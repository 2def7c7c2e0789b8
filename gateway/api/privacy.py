"""Sensitive personal information (PIPL art. 28): health readings and locations.

Every read of them through the API leaves a row in ``sensitive_reads`` — who, what,
when, about whom and the alert it served (PIPL art. 51: access control and logs for
sensitive data) — written in the same transaction as the read's answer is built, so
an answer given is an answer recorded. What counts as sensitive is data, here:
telemetry of wristbands (every metric: heart rate, SpO2, wear state say how a body is),
the vital metrics of any device, and position readings; a site's coordinates.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import psycopg
from fastapi import HTTPException, status
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from gateway.alerts.vitals import VITAL_METRICS, VITAL_PROFILES
from gateway.api.principal import Principal
from gateway.api.views import escalated_to

LOCATION_METRICS: frozenset[str] = frozenset({"latitude", "longitude", "altitude_m",
                                              "location_accuracy_m", "floor"})
HEALTH_METRICS: frozenset[str] = frozenset(VITAL_METRICS)
HEALTH_PROFILES: frozenset[str] = frozenset(VITAL_PROFILES)

_RECORD = """
INSERT INTO sensitive_reads (actor, resident_id, site_id, what, alert_id, detail)
VALUES (%s, %s, %s, %s, %s, %s)
"""


def is_sensitive(metric: str, profile: str | None) -> bool:
    """Whether a telemetry series is health or location data."""
    return profile in HEALTH_PROFILES or metric in HEALTH_METRICS or metric in LOCATION_METRICS


async def record_read(
    conn: psycopg.AsyncConnection[Any],
    me: Principal,
    what: str,
    *,
    resident_id: int | None = None,
    site_id: str | None = None,
    alert_id: uuid.UUID | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    await conn.execute(_RECORD, (me.actor, resident_id, site_id, what, alert_id,
                                 Jsonb(dict(detail or {}))))


# The residents a device's readings are about: the device's own, else the site's.
RESIDENTS_OF_DEVICE = """
SELECT coalesce(d.resident_id, (SELECT min(r.id) FROM residents r WHERE r.site_id = d.site_id))
FROM devices d WHERE d.site_id = %s AND d.id = %s
"""


async def resident_of_device(
    conn: psycopg.AsyncConnection[Any], site_id: str, device_id: str
) -> int | None:
    row = await (await conn.execute(RESIDENTS_OF_DEVICE, (site_id, device_id))).fetchone()
    return int(row[0]) if row and row[0] is not None else None


_SERVED = """
SELECT a.id, a.site_id, a.level, a.status,
       (SELECT array_agg(DISTINCT n.role) FROM notifications n WHERE n.alert_id = a.id) AS roles
FROM alerts a JOIN sites s ON s.id = a.site_id
WHERE a.id = %s AND s.organisation_id = ANY(%s)
"""


async def served_alert(
    conn: psycopg.AsyncConnection[Any], me: Principal, alert_id: uuid.UUID,
    site_id: str | None = None,
) -> dict[str, Any]:
    """The alert a read (or a command) says it serves: one of the caller's units, of
    ``site_id`` when given; 404 otherwise, like any other alert of someone else's."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SERVED, (alert_id, me.unit_list))
        row = await cur.fetchone()
    if row is None or (site_id is not None and row["site_id"] != site_id):
        where = f" at site {site_id}" if site_id is not None else ""
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}{where}")
    return row


def shown_in_full(me: Principal, served: dict[str, Any] | None) -> bool:
    """Sensitive values are shown to the responsible unit, and above it only for an alert
    that has escalated to the caller (views.py's rule)."""
    return not me.above_units() or (
        served is not None and escalated_to(me, served["level"], served["roles"]))
