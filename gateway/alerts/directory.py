"""The directory: who a role of an escalation step is, now; the unit path and policy of a site.

Roles resolve at the moment the step fires (ARCHITECTURE §5): ``duty`` is the
responsible unit's duty staff whose shift covers that moment, ``supervisor``
the unit's supervisors, ``family`` the residents' family contacts, ``street``
the staff of the street centre above the unit, ``bureau`` the district
bureau's webhook, ``acknowledger`` whoever acknowledged. Times come from the
engine's clock, never from the database's ``now()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from alerting.model import Alert, AlertStatus, AlertType, Channel, Severity
from alerting.pipeline import Recipient
from alerting.policy import DEFAULTS, EscalationPolicy, Level, PolicyBook, PolicySet, Role

_UNIT_PATH = """
WITH RECURSIVE up (id, parent_id, kind, webhook_url, depth) AS (
    SELECT o.id, o.parent_id, o.kind, o.webhook_url, 0
    FROM sites s JOIN organisations o ON o.id = s.organisation_id WHERE s.id = %s
    UNION ALL
    SELECT o.id, o.parent_id, o.kind, o.webhook_url, up.depth + 1
    FROM organisations o JOIN up ON o.id = up.parent_id
)
SELECT id, kind, webhook_url FROM up ORDER BY depth
"""
_STAFF = """
SELECT id, phone, apprise_url FROM staff
WHERE organisation_id = %s AND role = %s AND active ORDER BY id
"""
_ON_DUTY = """
SELECT DISTINCT s.id, s.phone, s.apprise_url FROM staff s JOIN shifts sh ON sh.staff_id = s.id
WHERE s.organisation_id = %s AND s.role = 'duty' AND s.active
  AND sh.starts_at <= %s AND %s < sh.ends_at
ORDER BY s.id
"""
_ONE_STAFF = "SELECT id, phone, apprise_url FROM staff WHERE id = %s"
_FAMILY = """
SELECT r.id AS resident_id, f.name, f.phone, f.apprise_url
FROM residents r JOIN family_contacts f ON f.resident_id = r.id
WHERE r.site_id = %s
UNION ALL
SELECT r.id, r.family_contact_name, r.family_contact_phone, NULL FROM residents r
WHERE r.site_id = %s AND r.family_contact_phone IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM family_contacts f WHERE f.resident_id = r.id)
ORDER BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class Unit:
    id: str
    kind: str
    webhook_url: str | None


def _staff_recipient(row: Mapping[str, Any], role: Role) -> Recipient:
    targets: dict[Channel, str] = {Channel.CONSOLE: row["id"]}
    if row["apprise_url"]:
        targets[Channel.MESSAGING] = row["apprise_url"]
    if row["phone"]:
        targets[Channel.VOICE] = row["phone"]
        targets[Channel.SMS] = row["phone"]
    return Recipient(f"staff:{row['id']}", role, targets)


def policy_from_json(doc: Mapping[str, Any]) -> EscalationPolicy:
    """A policy override as stored (and as a district file writes it); seconds for times."""

    def seconds(key: str) -> timedelta | None:
        value = doc.get(key)
        return None if value is None else timedelta(seconds=float(value))

    levels = tuple(
        Level(
            timedelta(seconds=float(lv["after_s"])),
            tuple(Role(r) for r in lv["roles"]),
            tuple(Channel(c) for c in lv["channels"]),
        )
        for lv in doc["levels"]
    )
    return EscalationPolicy(
        name=str(doc.get("name", "override")),
        levels=levels,
        ladder_until=AlertStatus(doc.get("ladder_until", "acknowledged")),
        repeat_top_every=seconds("repeat_top_every_s"),
        remind_every=seconds("remind_every_s"),
        on_scene_within=seconds("on_scene_within_s"),
    )


async def load_policy_book(conn: psycopg.AsyncConnection[Any]) -> PolicyBook:
    cur = await conn.execute(
        "SELECT unit_id, alert_type, severity, policy FROM escalation_policies"
    )
    by_type: dict[str, dict[tuple[AlertType, Severity], EscalationPolicy]] = {}
    by_severity: dict[str, dict[Severity, EscalationPolicy]] = {}
    for unit, alert_type, severity, doc in await cur.fetchall():
        policy = policy_from_json(doc)
        if alert_type:
            by_type.setdefault(unit, {})[(AlertType(alert_type), Severity(severity))] = policy
        else:
            by_severity.setdefault(unit, {})[Severity(severity)] = policy
    units = set(by_type) | set(by_severity)
    overrides = {u: PolicySet(by_type.get(u, {}), by_severity.get(u, {})) for u in units}
    return PolicyBook(overrides, DEFAULTS)


class Directory:
    """Reads the organisation tree and people within the caller's transaction."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], book: PolicyBook) -> None:
        self.conn = conn
        self.book = book
        self._paths: dict[str, tuple[Unit, ...]] = {}

    async def unit_path(self, site_id: str) -> tuple[Unit, ...]:
        """From the site's unit up to the bureau; empty for a site not in the tree."""
        if site_id not in self._paths:
            cur = await self.conn.execute(_UNIT_PATH, (site_id,))
            self._paths[site_id] = tuple(Unit(*row) for row in await cur.fetchall())
        return self._paths[site_id]

    async def preload(self, site_ids: Sequence[str]) -> None:
        for site_id in set(site_ids):
            await self.unit_path(site_id)

    def policy_for(self, alert: Alert) -> EscalationPolicy:
        """Needs ``preload`` of the alert's site (``settle`` takes a plain callable)."""
        path = [u.id for u in self._paths.get(alert.site_id, ())]
        return self.book.resolve(path, alert.type, alert.severity)

    async def _rows(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def recipients(
        self, alert: Alert, roles: Sequence[Role], now: datetime
    ) -> dict[Role, tuple[Recipient, ...]]:
        path = await self.unit_path(alert.site_id)
        out: dict[Role, tuple[Recipient, ...]] = {}
        for role in roles:
            out[role] = tuple(await self._role(alert, role, path, now))
        return out

    async def _role(
        self, alert: Alert, role: Role, path: tuple[Unit, ...], now: datetime
    ) -> list[Recipient]:
        unit = path[0] if path else None
        if role is Role.DUTY and unit:
            rows = await self._rows(_ON_DUTY, (unit.id, now, now))
            return [_staff_recipient(r, role) for r in rows]
        if role is Role.SUPERVISOR and unit:
            rows = await self._rows(_STAFF, (unit.id, "supervisor"))
            return [_staff_recipient(r, role) for r in rows]
        if role is Role.STREET:
            street = next((u for u in path if u.kind == "street"), None)
            if street is None:
                return []
            rows = await self._rows(_STAFF, (street.id, "street"))
            return [_staff_recipient(r, role) for r in rows]
        if role is Role.BUREAU:
            bureau = next((u for u in path if u.kind == "bureau"), None)
            if bureau is None or not bureau.webhook_url:
                return []
            return [Recipient(f"bureau:{bureau.id}", role, {Channel.WEBHOOK: bureau.webhook_url})]
        if role is Role.FAMILY:
            out = []
            for r in await self._rows(_FAMILY, (alert.site_id, alert.site_id)):
                targets: dict[Channel, str] = {}
                if r["apprise_url"]:
                    targets[Channel.MESSAGING] = r["apprise_url"]
                if r["phone"]:
                    targets[Channel.VOICE] = r["phone"]
                    targets[Channel.SMS] = r["phone"]
                out.append(Recipient(f"family:{r['resident_id']}:{r['name']}", role, targets))
            return out
        if role is Role.ACKNOWLEDGER and alert.acknowledged_by:
            staff_id = alert.acknowledged_by.removeprefix("staff:")
            return [_staff_recipient(r, role) for r in await self._rows(_ONE_STAFF, (staff_id,))]
        return []
