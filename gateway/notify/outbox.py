"""The notifications outbox: claiming due rows, and what a pipeline run makes of them.

A row is one notice (``Notice.key`` of its first channel) for its whole life:
its channel, target and fallback move on as the retry stage says. ``settle`` is
pure: from the claimed rows and the stages' ``Batch`` it gives each row's new
state and the audit entries (every attempt, every drop with its reason).
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from alerting.model import (
    AlertStatus,
    AlertType,
    AuditAction,
    AuditEntry,
    Channel,
    DetailValue,
    Severity,
)
from alerting.pipeline import Batch, Delivery, DeliveryLedger, Dropped, Notice
from alerting.policy import Role
from gateway import metrics
from gateway.alerts.store import PgAlertTransaction

# Due rows, oldest first, locked so no other runner attempts them meanwhile (SKIP
# LOCKED: it takes the next ones instead of waiting). A webhook row is due only
# when no earlier message of its alert to that endpoint is still pending — also
# when that one is locked by another runner right now: then it still reads as
# pending, so message n+1 never leaves before n got its 2xx.
CLAIM = """
SELECT n.id, n.key, n.alert_id, n.step_id, n.level, n.person_id, n.role, n.channel, n.target,
       n.text, n.until_status, n.fallback, n.not_before, n.channel_since, n.channel_attempts,
       n.lane_seq, n.ack_code, n.delivered_channels, n.delivered_at, n.confirmed_at,
       a.type, a.severity, a.site_id, a.status AS alert_status
FROM notifications n JOIN alerts a ON a.id = n.alert_id
WHERE n.status = 'pending' AND n.not_before <= %(now)s
  AND NOT EXISTS (
      SELECT 1 FROM notifications e
      WHERE n.lane_seq IS NOT NULL AND e.lane_seq IS NOT NULL AND e.status = 'pending'
        AND e.alert_id = n.alert_id AND e.target = n.target AND e.lane_seq < n.lane_seq)
ORDER BY n.not_before, n.id
LIMIT %(limit)s
FOR UPDATE OF n SKIP LOCKED
"""
UPDATE = """
UPDATE notifications SET
    status = %(status)s, channel = %(channel)s, target = %(target)s, fallback = %(fallback)s,
    not_before = %(not_before)s, channel_since = %(channel_since)s,
    channel_attempts = %(channel_attempts)s, attempts = attempts + %(attempts)s,
    last_error = coalesce(%(error)s, last_error),
    delivered_channels = delivered_channels || %(delivered_channels)s::text[],
    delivered_at = coalesce(delivered_at, %(delivered_at)s),
    confirmed_at = coalesce(confirmed_at, %(confirmed_at)s),
    reference = coalesce(%(reference)s, reference),
    closed_reason = %(closed_reason)s, updated_at = %(updated_at)s
WHERE id = %(id)s
"""
UNREADABLE = """
UPDATE notifications SET status = 'failed', closed_reason = %s, updated_at = %s WHERE id = %s
"""
PLACES = """
SELECT s.id, s.name, s.address,
       array(SELECT r.name FROM residents r WHERE r.site_id = s.id ORDER BY r.id) AS residents
FROM sites s WHERE s.id = ANY(%s)
"""
# The alert's newest position in the live feed (its commit_seq; gateway.alerts.feed).
POSITIONS = """
SELECT alert_id, max(commit_seq) FROM alert_changes
WHERE alert_id = ANY(%s) AND commit_seq IS NOT NULL GROUP BY alert_id
"""
# A row whose notice no stage accounted for (a bug): looked at again after this.
LOST_TRACK_DELAY = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    key: str
    notice: Notice
    lane_seq: int | None
    ack_code: str
    delivered_channels: frozenset[str]
    delivered: bool
    confirmed: bool
    alert_status: AlertStatus

    @property
    def identity(self) -> tuple[str, str]:
        return (self.notice.step_id, self.notice.person_id)


def row_from_db(r: Mapping[str, Any]) -> OutboxRow:
    fallback = tuple((Channel(c), str(t)) for c, t in r["fallback"])
    notice = Notice(
        alert_id=r["alert_id"],
        alert_type=AlertType(r["type"]),
        severity=Severity(r["severity"]),
        site_id=r["site_id"],
        step_id=r["step_id"],
        level=r["level"],
        person_id=r["person_id"],
        role=Role(r["role"]),
        channel=Channel(r["channel"]),
        target=r["target"],
        text=r["text"],
        until=AlertStatus(r["until_status"]),
        not_before=r["not_before"],
        channel_since=r["channel_since"],
        fallback=fallback,
        attempt=r["channel_attempts"],
    )
    return OutboxRow(
        id=r["id"],
        key=r["key"],
        notice=notice,
        lane_seq=r["lane_seq"],
        ack_code=r["ack_code"],
        delivered_channels=frozenset(r["delivered_channels"]),
        delivered=r["delivered_at"] is not None,
        confirmed=r["confirmed_at"] is not None,
        alert_status=AlertStatus(r["alert_status"]),
    )


def ledger_of(rows: Sequence[OutboxRow]) -> DeliveryLedger:
    """What the store knows, read with the claim (pipeline.Dedup acts on it)."""
    return DeliveryLedger(
        delivered=frozenset(
            f"{r.notice.step_id}/{r.notice.person_id}/{c}"
            for r in rows
            for c in r.delivered_channels
        ),
        confirmed=frozenset(r.identity for r in rows if r.confirmed),
        status={r.notice.alert_id: r.alert_status for r in rows},
    )


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """A row's state after one run: the ``UPDATE`` parameters."""

    id: int
    status: str
    notice: Notice  # channel, target, fallback, not_before, channel_since, attempt
    attempts: int = 0
    error: str | None = None
    delivered_channel: str | None = None
    delivered_at: datetime | None = None
    confirmed_at: datetime | None = None
    reference: str | None = None
    closed_reason: str | None = None

    def params(self, now: datetime) -> dict[str, Any]:
        n = self.notice
        return {
            "id": self.id, "status": self.status, "channel": n.channel.value,
            "target": n.target, "fallback": Jsonb([[c.value, t] for c, t in n.fallback]),
            "not_before": n.not_before, "channel_since": n.channel_since,
            "channel_attempts": n.attempt, "attempts": self.attempts, "error": self.error,
            "delivered_channels": [self.delivered_channel] if self.delivered_channel else [],
            "delivered_at": self.delivered_at, "confirmed_at": self.confirmed_at,
            "reference": self.reference, "closed_reason": self.closed_reason, "updated_at": now,
        }  # fmt: skip


def _dropped_entry(d: Dropped, row: OutboxRow, at: datetime) -> AuditEntry:
    n = d.notice
    detail: dict[str, DetailValue] = {
        "step": row.notice.step_id,
        "person": row.notice.person_id,
        "role": row.notice.role.value,
        "target": n.target,
        "dropped_by": d.stage,
        "reason": d.reason,
    }
    return AuditEntry(at, row.notice.alert_id, "system:notifier", AuditAction.NOTED, n.channel,
                      detail)


class _Index:
    """Finds the claimed rows a notice of the run stands for (a group summary: several)."""

    def __init__(self, rows: Sequence[OutboxRow]) -> None:
        self.by_identity = {r.identity: r for r in rows}
        self.by_key = {r.notice.key: r for r in rows}

    def rows(self, n: Notice) -> list[OutboxRow]:
        if n.members:
            return [self.by_key[k] for k in n.members if k in self.by_key]
        found = self.by_identity.get((n.step_id, n.person_id))
        return [found] if found else []


def settle(
    rows: Sequence[OutboxRow], batch: Batch
) -> tuple[list[RowUpdate], list[AuditEntry], list[OutboxRow]]:
    """Each claimed row's new state, the audit entries, and rows nothing accounted for."""
    index = _Index(rows)
    now = batch.now
    delivery: dict[int, Delivery] = {}
    audit: list[AuditEntry] = []
    for attempt in batch.deliveries:
        for row in index.rows(attempt.notice):
            delivery[row.id] = attempt
            n = attempt.notice
            as_sent = dataclasses.replace(row.notice, text=n.text, members=n.members)
            audit.append(dataclasses.replace(attempt, notice=as_sent).audit())
    follow: dict[int, Notice] = {}
    for n in batch.deferred:
        for row in index.rows(n):
            follow[row.id] = dataclasses.replace(n, alert_id=row.notice.alert_id,
                                                 step_id=row.notice.step_id, members=())
    dropped: dict[int, Dropped] = {}
    for dr in batch.dropped:
        for row in index.rows(dr.notice):
            dropped[row.id] = dr
            audit.append(_dropped_entry(dr, row, now))

    updates: list[RowUpdate] = []
    lost: list[OutboxRow] = []
    for row in rows:
        d = delivery.get(row.id)
        delivered = d is not None and d.delivered
        confirmed = row.confirmed or (d is not None and d.confirmed)
        if row.id in follow:
            updates.append(_update(row.id, "pending", follow[row.id], d, now))
        elif row.id in dropped:
            dr = dropped[row.id]
            if confirmed:
                status = "confirmed"
            elif delivered or row.delivered:
                status = "sent"  # reached the person; nothing more follows
            else:
                status = "failed" if dr.stage == "retry" else "dropped"
            last = d.notice if d else row.notice
            updates.append(_update(row.id, status, last, d, now, dr.reason))
        elif d is not None:
            status = "confirmed" if confirmed else "sent" if delivered else "failed"
            updates.append(_update(row.id, status, d.notice, d, now))
        else:
            lost.append(row)
            later = dataclasses.replace(row.notice, not_before=now + LOST_TRACK_DELAY)
            updates.append(RowUpdate(row.id, "pending", later, error="no stage accounted for it"))
    return updates, audit, lost


def _update(
    row_id: int,
    status: str,
    notice: Notice,
    d: Delivery | None,
    now: datetime,
    closed_reason: str | None = None,
) -> RowUpdate:
    if d is None:
        return RowUpdate(row_id, status, notice, closed_reason=closed_reason)
    return RowUpdate(
        row_id,
        status,
        notice,
        attempts=1,
        error=d.error,
        delivered_channel=d.notice.channel.value if d.delivered else None,
        delivered_at=now if d.delivered else None,
        confirmed_at=now if d.confirmed else None,
        reference=d.reference,
        closed_reason=closed_reason,
    )


_CONFIRM_ROW = """
SELECT id, alert_id, step_id, person_id, channel, ack_code, status, confirmed_at
FROM notifications WHERE key = %s FOR UPDATE
"""


async def confirm_by_code(
    conn: psycopg.AsyncConnection[Any],
    key: str,
    digits: str,
    at: datetime,
    worker: str = "notifier",
) -> bool:
    """A callee keyed in the code of notice ``key`` (the provider's callback): the notice is
    confirmed — no further channel is tried for it — and the audit chain says so.

    The HTTP endpoint that takes the provider's callback comes with the console API
    (issue 8); the alert itself is acknowledged through ``unit_of_work.command``.
    """
    async with conn.transaction():
        cur = await conn.execute(_CONFIRM_ROW, (key,))
        row = await cur.fetchone()
        if row is None:
            metrics.NOTIFY_CONFIRMATIONS.labels("unknown").inc()
            return False
        row_id, alert_id, step_id, person_id, channel, code, _status, confirmed_at = row
        ok = hmac.compare_digest(code.encode(), digits.strip().encode())
        detail: dict[str, DetailValue] = {"step": step_id, "person": person_id,
                                          "confirmed": ok, "by": "ack code"}  # fmt: skip
        if ok and confirmed_at is None:
            await conn.execute(
                "UPDATE notifications SET status = 'confirmed', confirmed_at = %s,"
                " closed_reason = 'confirmed with the acknowledge code', updated_at = %s"
                " WHERE id = %s",
                (at, at, row_id),
            )
        entry = AuditEntry(at, alert_id, person_id, AuditAction.NOTED, Channel(channel), detail)
        await PgAlertTransaction(conn, worker).audit([entry])
    metrics.NOTIFY_CONFIRMATIONS.labels("confirmed" if ok else "wrong_code").inc()
    return ok
