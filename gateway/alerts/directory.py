"""The directory: who a role of an escalation step is, now; the unit path and policy of a site.

Roles resolve at the moment the step fires (ARCHITECTURE §5): ``duty`` is the
responsible unit's duty staff whose shift covers that moment, ``supervisor``
the unit's supervisors, ``family`` the residents' family contacts, ``street``
the staff of the street centre above the unit, ``bureau`` the district
bureau's webhook, ``acknowledger`` whoever acknowledged. Times come from the
engine's clock, never from the database's ``now()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from alerting.downlink import Downlink
from alerting.model import Alert, AlertStatus, AlertType, Channel, Severity
from alerting.pipeline import Recipient
from alerting.policy import DEFAULTS, EscalationPolicy, Level, PolicyBook, PolicySet, Role
from device_drivers import profiles as device_profiles
from gateway.alerts.store import Finish, finished

# Set-based: one statement per kind of look-up for a whole unit of work's alerts.
_UNIT_PATHS = """
WITH RECURSIVE up (site_id, id, parent_id, kind, webhook_url, depth) AS (
    SELECT s.id, o.id, o.parent_id, o.kind, o.webhook_url, 0
    FROM sites s JOIN organisations o ON o.id = s.organisation_id WHERE s.id = ANY(%s)
    UNION ALL
    SELECT up.site_id, o.id, o.parent_id, o.kind, o.webhook_url, up.depth + 1
    FROM organisations o JOIN up ON o.id = up.parent_id
)
SELECT site_id, id, kind, webhook_url FROM up ORDER BY site_id, depth
"""
_STAFF = """
SELECT organisation_id, role, id, phone, apprise_url FROM staff
WHERE organisation_id = ANY(%s) AND role = ANY(%s) AND active ORDER BY id
"""
_ON_DUTY = """
SELECT DISTINCT s.organisation_id, s.id, s.phone, s.apprise_url
FROM staff s JOIN shifts sh ON sh.staff_id = s.id
WHERE s.organisation_id = ANY(%s) AND s.role = 'duty' AND s.active
  AND sh.starts_at <= %s AND %s < sh.ends_at
ORDER BY s.id
"""
# The first rung's people, asked for with the dedup-key lock before the sites' unit is
# known (a site's unit is its organisation): the on-duty staff of each site's unit at
# ``now``; a unit with nobody on duty comes back once with NULLs.
_ON_DUTY_AT_SITES = """
SELECT si.organisation_id, s.id, s.phone, s.apprise_url
FROM sites si LEFT JOIN LATERAL (
    SELECT DISTINCT st.id, st.phone, st.apprise_url
    FROM staff st JOIN shifts sh ON sh.staff_id = st.id
    WHERE st.organisation_id = si.organisation_id AND st.role = 'duty' AND st.active
      AND sh.starts_at <= %s AND %s < sh.ends_at
) s ON true
WHERE si.id = ANY(%s)
ORDER BY si.organisation_id, s.id
"""
_DEVICES = """
SELECT d.site_id, d.id, d.profile FROM devices d
JOIN unnest(%s::text[], %s::text[]) AS k (site_id, id) ON d.site_id = k.site_id AND d.id = k.id
"""
_ONE_STAFF = "SELECT id, phone, apprise_url FROM staff WHERE id = ANY(%s)"
_FAMILY = """
SELECT r.site_id, r.id AS resident_id, f.name, f.phone, f.apprise_url
FROM residents r JOIN family_contacts f ON f.resident_id = r.id
WHERE r.site_id = ANY(%s)
UNION ALL
SELECT r.site_id, r.id, r.family_contact_name, r.family_contact_phone, NULL FROM residents r
WHERE r.site_id = ANY(%s) AND r.family_contact_phone IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM family_contacts f WHERE f.resident_id = r.id)
ORDER BY 2, 3
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
    return await (await request_policy_book(conn))()


async def request_policy_book(conn: psycopg.AsyncConnection[Any]) -> Finish[PolicyBook]:
    """Send the read of the policy overrides (``store.Finish``): read at every unit of
    work, so a changed override applies from the next one."""
    cur = await conn.execute(
        "SELECT unit_id, alert_type, severity, policy FROM escalation_policies"
    )

    async def finish() -> PolicyBook:
        return _policy_book(await cur.fetchall())

    return finish


def _policy_book(rows: Sequence[tuple[Any, ...]]) -> PolicyBook:
    by_type: dict[str, dict[tuple[AlertType, Severity], EscalationPolicy]] = {}
    by_severity: dict[str, dict[Severity, EscalationPolicy]] = {}
    for unit, alert_type, severity, doc in rows:
        policy = policy_from_json(doc)
        if alert_type:
            by_type.setdefault(unit, {})[(AlertType(alert_type), Severity(severity))] = policy
        else:
            by_severity.setdefault(unit, {})[Severity(severity)] = policy
    units = set(by_type) | set(by_severity)
    overrides = {u: PolicySet(by_type.get(u, {}), by_severity.get(u, {})) for u in units}
    return PolicyBook(overrides, DEFAULTS)


def _family_recipient(r: Mapping[str, Any]) -> Recipient:
    targets: dict[Channel, str] = {}
    if r["apprise_url"]:
        targets[Channel.MESSAGING] = r["apprise_url"]
    if r["phone"]:
        targets[Channel.VOICE] = r["phone"]
        targets[Channel.SMS] = r["phone"]
    return Recipient(f"family:{r['resident_id']}:{r['name']}", Role.FAMILY, targets)


# What a role's people depend on: (kind, key) — one look-up serves every alert with the key.
_Need = tuple[str, str]


class Directory:
    """Reads the organisation tree and people within the caller's transaction.

    Answers are kept for the transaction (one ``Directory`` per unit of work, so on-duty
    staff are read at each unit of work, never cached across transactions), and the
    look-ups of a whole batch of steps are made set-based: one statement per kind.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], book: PolicyBook) -> None:
        self.conn = conn
        self.book = book
        self._paths: dict[str, tuple[Unit, ...]] = {}
        self._people: dict[tuple[_Need, datetime | None], list[Mapping[str, Any]]] = {}
        # (site, device) → the commands its profile carries out; None: profile unknown here.
        self._commands: dict[tuple[str, str], frozenset[str] | None] = {}
        self._devices_read: set[tuple[str, str]] = set()

    async def unit_path(self, site_id: str) -> tuple[Unit, ...]:
        """From the site's unit up to the bureau; empty for a site not in the tree."""
        await self.preload([site_id])
        return self._paths[site_id]

    async def preload(self, site_ids: Sequence[str]) -> None:
        await (await self.request_paths(site_ids))()

    async def request_paths(self, site_ids: Sequence[str]) -> Finish[None]:
        """Send the read of the sites' unit paths not known yet (``store.Finish``)."""
        missing = sorted({s for s in site_ids if s not in self._paths})
        if not missing:
            return finished(None)
        cur = await self.conn.execute(_UNIT_PATHS, (missing,))

        async def finish() -> None:
            if all(s in self._paths for s in missing):
                return  # read already: a second await changes nothing
            paths: dict[str, list[Unit]] = {s: [] for s in missing}
            for site_id, *unit in await cur.fetchall():
                paths[site_id].append(Unit(*unit))
            self._paths.update((s, tuple(units)) for s, units in paths.items())

        return finish

    def policy_for(self, alert: Alert) -> EscalationPolicy:
        """Needs ``preload`` of the alert's site (``settle`` takes a plain callable)."""
        path = [u.id for u in self._paths.get(alert.site_id, ())]
        return self.book.resolve(path, alert.type, alert.severity)

    async def _send(self, sql: str, params: Sequence[Any]) -> psycopg.AsyncCursor[dict[str, Any]]:
        cur = self.conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        return cur

    async def recipients(
        self, alert: Alert, roles: Sequence[Role], now: datetime
    ) -> dict[Role, tuple[Recipient, ...]]:
        return (await self.recipients_of([(alert, roles)], now))[0]

    async def recipients_of(
        self, wanted: Sequence[tuple[Alert, Sequence[Role]]], now: datetime
    ) -> list[dict[Role, tuple[Recipient, ...]]]:
        """The people of each (alert, roles) at ``now``, looked up for all of them at once."""
        await self.preload([alert.site_id for alert, _ in wanted])
        return await (await self.request_recipients(wanted, now))()

    async def request_recipients(
        self, wanted: Sequence[tuple[Alert, Sequence[Role]]], now: datetime
    ) -> Finish[list[dict[Role, tuple[Recipient, ...]]]]:
        """``recipients_of`` as a request (``store.Finish``); the sites must be preloaded."""
        needs = [[(role, self._need(alert, role)) for role in roles] for alert, roles in wanted]
        fetched = await self._request({n for per_alert in needs for _, n in per_alert if n}, now)

        async def finish() -> list[dict[Role, tuple[Recipient, ...]]]:
            await fetched()
            out = []
            for per_alert in needs:
                found: dict[Role, tuple[Recipient, ...]] = {}
                for role, need in per_alert:
                    found[role] = self._recipients(role, need, now) if need else ()
                out.append(found)
            return out

        return finish

    def _need(self, alert: Alert, role: Role) -> _Need | None:
        path = self._paths[alert.site_id]
        unit = path[0] if path else None
        if role is Role.DUTY and unit:
            return ("duty", unit.id)
        if role is Role.SUPERVISOR and unit:
            return ("supervisor", unit.id)
        if role is Role.STREET:
            street = next((u for u in path if u.kind == "street"), None)
            return ("street", street.id) if street else None
        if role is Role.BUREAU:
            bureau = next((u for u in path if u.kind == "bureau"), None)
            if bureau is None or not bureau.webhook_url:
                return None
            return ("bureau", bureau.id)
        if role is Role.FAMILY:
            return ("family", alert.site_id)
        if role is Role.ACKNOWLEDGER and alert.acknowledged_by:
            return ("staff", alert.acknowledged_by.removeprefix("staff:"))
        return None

    async def _request(self, needs: set[_Need], now: datetime) -> Finish[None]:
        """Send what ``needs`` asks for and is not known yet, one statement per kind."""
        todo: dict[str, list[str]] = {}
        for kind, key in needs:
            if kind != "bureau" and (self._key((kind, key), now)) not in self._people:
                todo.setdefault(kind, []).append(key)
        sent: list[tuple[str, str, psycopg.AsyncCursor[dict[str, Any]]]] = []
        for kind, keys in todo.items():
            for key in keys:
                self._people[self._key((kind, key), now)] = []
            if kind == "duty":
                cur = await self._send(_ON_DUTY, (keys, now, now))
                sent.append(("duty", "organisation_id", cur))
            elif kind in ("supervisor", "street"):
                sent.append((kind, "organisation_id", await self._send(_STAFF, (keys, [kind]))))
            elif kind == "family":
                sent.append(("family", "site_id", await self._send(_FAMILY, (keys, keys))))
            elif kind == "staff":
                sent.append(("staff", "id", await self._send(_ONE_STAFF, (keys,))))

        async def finish() -> None:
            for kind, column, cur in sent:
                for r in await cur.fetchall():
                    self._people[self._key((kind, r[column]), now)].append(r)
                await cur.close()

        return finish

    async def request_duty_at_sites(self, site_ids: Sequence[str], now: datetime) -> Finish[None]:
        """Send the read of who is on duty at ``now`` in each site's unit (``store.Finish``),
        before the units are known: the people of a first rung, read with the lock."""
        sites = sorted(set(site_ids))
        if not sites:
            return finished(None)
        cur = await self._send(_ON_DUTY_AT_SITES, (now, now, sites))

        async def finish() -> None:
            by_unit: dict[str, dict[str, Mapping[str, Any]]] = {}
            for r in await cur.fetchall():
                staff = by_unit.setdefault(r["organisation_id"], {})
                if r["id"] is not None:
                    staff[r["id"]] = r
            await cur.close()
            for unit, staff in by_unit.items():
                self._people.setdefault(self._key(("duty", unit), now), list(staff.values()))

        return finish

    async def request_device_commands(self, devices: Iterable[tuple[str, str]]) -> Finish[None]:
        """Send the read of what each (site, device) can carry out (``Profile.commands``)."""
        missing = sorted({d for d in devices if d not in self._devices_read})
        if not missing:
            return finished(None)
        self._devices_read.update(missing)
        cur = await self.conn.execute(_DEVICES, ([s for s, _ in missing], [i for _, i in missing]))

        async def finish() -> None:
            for site, device, profile in await cur.fetchall():
                self._know_commands(site, device, str(profile))

        return finish

    def _know_commands(self, site_id: str, device_id: str, profile: str) -> None:
        try:
            commands: frozenset[str] | None = frozenset(device_profiles.get(profile).commands)
        except KeyError:
            commands = None  # a profile not known here: sent, and the edge answers
        self._commands[(site_id, device_id)] = commands

    def know_path(self, site_id: str, units: Sequence[Unit]) -> None:
        """A unit path read elsewhere (a command reads it with its alert's lock)."""
        self._paths[site_id] = tuple(units)

    def know_device(self, site_id: str, device_id: str, profile: str | None) -> None:
        """A device read elsewhere, as ``request_device_commands`` would have read it (None:
        not in the registry, so not known)."""
        self._devices_read.add((site_id, device_id))
        if profile is not None:
            self._know_commands(site_id, device_id, profile)

    def accepts(self, downlink: Downlink) -> bool:
        """Whether to queue ``downlink`` (its device read by ``request_device_commands``).

        The engine's downlinks are per alert type ("alarm received" blinks a button's
        LED; a wristband has no such command): a command the profile lacks is not
        queued at all. A device the registry does not know, or whose profile is not
        known here, is sent the command, and the edge's answer says what became of it."""
        key = (downlink.site_id, downlink.device_id)
        if key not in self._commands:
            return True
        commands = self._commands[key]
        return commands is None or downlink.action in commands

    @staticmethod
    def _key(need: _Need, now: datetime) -> tuple[_Need, datetime | None]:
        return (need, now if need[0] == "duty" else None)  # who is on duty depends on when

    def _recipients(self, role: Role, need: _Need, now: datetime) -> tuple[Recipient, ...]:
        kind, key = need
        if kind == "bureau":
            bureau = next(u for p in self._paths.values() for u in p if u.id == key)
            assert bureau.webhook_url is not None
            return (Recipient(f"bureau:{bureau.id}", role, {Channel.WEBHOOK: bureau.webhook_url}),)
        rows = self._people[self._key(need, now)]
        if kind == "family":
            return tuple(_family_recipient(r) for r in rows)
        return tuple(_staff_recipient(r, role) for r in rows)
