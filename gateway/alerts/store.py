"""PostgreSQL implementation of ``alerting.ports.AlertTransaction`` (schema v3).

One ``PgAlertTransaction`` wraps one open transaction on one connection. The
alert row lock (``FOR UPDATE`` in ``lock_open``/``lock_alert``, ``SKIP LOCKED``
in ``claim_due``) is held until commit, so everything appended for an alert —
its row, its chained audit rows and head, its change-log rows, its fired steps
— is written by one transaction at a time, and the chain needs no global lock.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from alerting.audit import ChainHead, chain_entry
from alerting.lifecycle import Transition
from alerting.model import Alert, AlertStatus, AlertType, AuditEntry, Outcome, Severity
from alerting.planner import StepKey, StepKind
from alerting.ports import StoreError

_ALERT_COLUMNS = (
    "id, site_id, device_id, type, severity, status, dedup_key, opened_at, last_seen_at,"
    " escalation_anchor, count, level, epoch, sources, first_event_id, last_event_id,"
    " acknowledged_at, acknowledged_by, on_scene_at, on_scene_by, condition_cleared_at,"
    " outcome, resolved_at, resolved_by"
)
_UPSERT = f"""
INSERT INTO alerts ({_ALERT_COLUMNS}, unit_id, updated_at)
VALUES ({", ".join(["%s"] * 24)},
        (SELECT organisation_id FROM sites WHERE id = %s), now())
ON CONFLICT (id) DO UPDATE SET
    severity = excluded.severity, status = excluded.status, last_seen_at = excluded.last_seen_at,
    escalation_anchor = excluded.escalation_anchor, count = excluded.count,
    level = excluded.level, epoch = excluded.epoch, sources = excluded.sources,
    last_event_id = excluded.last_event_id, acknowledged_at = excluded.acknowledged_at,
    acknowledged_by = excluded.acknowledged_by, on_scene_at = excluded.on_scene_at,
    on_scene_by = excluded.on_scene_by, condition_cleared_at = excluded.condition_cleared_at,
    outcome = excluded.outcome, resolved_at = excluded.resolved_at,
    resolved_by = excluded.resolved_by, updated_at = now()
"""
_AUDIT = """
INSERT INTO alert_audit (time, alert_id, seq, actor, action, channel, detail, prev_hash, hash)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
_HEAD = """
INSERT INTO alert_audit_heads (alert_id, seq, hash) VALUES (%s, %s, %s)
ON CONFLICT (alert_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
"""
_CHANGE = """
INSERT INTO alert_changes (alert_id, seq, time, action, alert) VALUES (%s, %s, %s, %s, %s)
"""
_STEP = """
INSERT INTO alert_steps (step_id, alert_id, epoch, kind, level, n, due_at, fired_at, fired_by)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (step_id) DO NOTHING
RETURNING step_id
"""


def alert_from_row(r: Mapping[str, Any]) -> Alert:
    return Alert(
        id=r["id"],
        site_id=r["site_id"],
        device_id=r["device_id"],
        type=AlertType(r["type"]),
        severity=Severity(r["severity"]),
        status=AlertStatus(r["status"]),
        dedup_key=r["dedup_key"],
        opened_at=r["opened_at"],
        last_seen_at=r["last_seen_at"],
        escalation_anchor=r["escalation_anchor"],
        count=r["count"],
        level=r["level"],
        epoch=r["epoch"],
        sources=frozenset(r["sources"]),
        first_event_id=r["first_event_id"],
        last_event_id=r["last_event_id"],
        acknowledged_at=r["acknowledged_at"],
        acknowledged_by=r["acknowledged_by"],
        on_scene_at=r["on_scene_at"],
        on_scene_by=r["on_scene_by"],
        condition_cleared_at=r["condition_cleared_at"],
        outcome=Outcome(r["outcome"]) if r["outcome"] else None,
        resolved_at=r["resolved_at"],
        resolved_by=r["resolved_by"],
    )


def _values(a: Alert) -> tuple[Any, ...]:
    return (
        a.id, a.site_id, a.device_id, a.type.value, a.severity.value, a.status.value,
        a.dedup_key, a.opened_at, a.last_seen_at, a.escalation_anchor, a.count, a.level,
        a.epoch, sorted(a.sources), a.first_event_id, a.last_event_id, a.acknowledged_at,
        a.acknowledged_by, a.on_scene_at, a.on_scene_by, a.condition_cleared_at,
        a.outcome.value if a.outcome else None, a.resolved_at, a.resolved_by, a.site_id,
    )  # fmt: skip


def alert_json(a: Alert) -> dict[str, Any]:
    """The alert as the live feed shows it (the change log's ``alert`` column)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(a):
        value = getattr(a, f.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, frozenset):
            value = sorted(value)
        elif hasattr(value, "value"):
            value = value.value
        out[f.name] = value
    return out


def step_key_from_row(r: Mapping[str, Any]) -> StepKey:
    return StepKey(r["alert_id"], r["epoch"], StepKind(r["kind"]), r["level"], r["n"])


class PgAlertTransaction:
    """``AlertTransaction`` over an async connection already inside a transaction."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], worker: str = "engine") -> None:
        self.conn = conn
        self.worker = worker
        self._heads: dict[uuid.UUID, ChainHead | None] = {}

    def forget(self) -> None:
        """Drop cached chain heads after a rolled-back savepoint (they may not exist)."""
        self._heads.clear()

    async def _alerts(self, sql: str, params: Sequence[Any]) -> list[Alert]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return [alert_from_row(r) for r in await cur.fetchall()]

    async def lock_open(self, dedup_keys: Sequence[str]) -> Mapping[str, Alert]:
        if not dedup_keys:
            return {}
        rows = await self._alerts(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE dedup_key = ANY(%s)"
            " AND status <> 'resolved' ORDER BY dedup_key FOR UPDATE",
            (sorted(dedup_keys),),
        )
        return {a.dedup_key: a for a in rows}

    async def lock_alert(self, alert_id: uuid.UUID) -> Alert | None:
        rows = await self._alerts(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = %s FOR UPDATE", (alert_id,)
        )
        return rows[0] if rows else None

    async def save(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            try:
                await self.conn.execute(_UPSERT, _values(t.after))
            except psycopg.errors.UniqueViolation as exc:
                # Another server opened this dedup key first (nothing to lock before):
                # roll back and apply again — it will then find that alert and count a repeat.
                raise StoreError(f"alert {t.after.dedup_key} opened concurrently: {exc}",
                                 recoverable=True) from exc
            seq = await self._append(t.audit)
            await self.conn.execute(
                _CHANGE,
                (t.after.id, seq, t.audit.time, t.audit.action.value, Jsonb(alert_json(t.after))),
            )

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        for entry in entries:
            await self._append(entry)

    async def _head(self, alert_id: uuid.UUID) -> ChainHead | None:
        if alert_id not in self._heads:
            cur = await self.conn.execute(
                "SELECT seq, hash FROM alert_audit_heads WHERE alert_id = %s FOR UPDATE",
                (alert_id,),
            )
            row = await cur.fetchone()
            self._heads[alert_id] = ChainHead(alert_id, row[0], bytes(row[1])) if row else None
        return self._heads[alert_id]

    async def _append(self, entry: AuditEntry) -> int:
        row, head = chain_entry(entry, await self._head(entry.alert_id))
        await self.conn.execute(
            _AUDIT,
            (row.time, row.alert_id, row.seq, row.actor, row.action, row.channel,
             Jsonb(dict(row.detail)), row.prev_hash, row.hash),
        )  # fmt: skip
        await self.conn.execute(_HEAD, (head.alert_id, head.seq, head.hash))
        self._heads[entry.alert_id] = head
        return head.seq

    async def fired_steps(self, alert_id: uuid.UUID, epoch: int) -> frozenset[StepKey]:
        fired = await self.fired_steps_of([alert_id])
        return frozenset(k for k in fired.get(alert_id, ()) if k.epoch == epoch)

    async def fired_steps_of(
        self, alert_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, frozenset[StepKey]]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT alert_id, epoch, kind, level, n FROM alert_steps WHERE alert_id = ANY(%s)",
                (list(alert_ids),),
            )
            out: dict[uuid.UUID, set[StepKey]] = {}
            for r in await cur.fetchall():
                out.setdefault(r["alert_id"], set()).add(step_key_from_row(r))
        return {k: frozenset(v) for k, v in out.items()}

    async def record_step(self, key: StepKey, at: datetime, due: datetime | None = None) -> bool:
        cur = await self.conn.execute(
            _STEP,
            (key.id, key.alert_id, key.epoch, key.kind.value, key.level, key.n,
             due or at, at, self.worker),
        )  # fmt: skip
        return await cur.fetchone() is not None

    async def set_next_step_at(self, alert_id: uuid.UUID, at: datetime | None) -> None:
        await self.conn.execute("UPDATE alerts SET next_step_at = %s WHERE id = %s", (at, alert_id))

    async def claim_due(self, now: datetime, limit: int) -> Sequence[Alert]:
        return await self._alerts(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE next_step_at <= %s"
            " AND status <> 'resolved' ORDER BY next_step_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, limit),
        )


class PgAlertStore:
    """``AlertStore``: a transaction on a connection the caller owns (one per worker)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], worker: str = "engine") -> None:
        self.conn = conn
        self.worker = worker

    def transaction(self) -> _Tx:
        return _Tx(self)


class _Tx:
    def __init__(self, store: PgAlertStore) -> None:
        self.store = store
        self._cm: Any = None

    async def __aenter__(self) -> PgAlertTransaction:
        self._cm = self.store.conn.transaction()
        await self._cm.__aenter__()
        return PgAlertTransaction(self.store.conn, self.store.worker)

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)
