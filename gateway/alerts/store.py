"""PostgreSQL implementation of ``alerting.ports.AlertTransaction`` (schema v3).

One ``PgAlertTransaction`` wraps one open transaction on one connection. The
alert row lock (``FOR UPDATE`` in ``lock_open``/``lock_alert``, ``SKIP LOCKED``
in ``claim_due``) is held until commit, so everything appended for an alert —
its row, its chained audit rows and head, its change-log rows, its fired steps
— is written by one transaction at a time, and the chain needs no global lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from alerting.audit import ChainHead, chain_entry
from alerting.lifecycle import Transition
from alerting.model import Alert, AlertStatus, AlertType, AuditEntry, Outcome, Severity
from alerting.planner import StepKey, StepKind
from alerting.ports import StoreError

# The alert row as a column definition list (``recordset``); its names, in this order,
# are ``_ALERT_COLUMNS``.
_ALERT_RECORD = (
    "id uuid, site_id text, device_id text, type text, severity text, status text,"
    " dedup_key text, opened_at timestamptz, last_seen_at timestamptz,"
    " escalation_anchor timestamptz, count int, level int, epoch int, sources jsonb,"
    " first_event_id uuid, last_event_id uuid, acknowledged_at timestamptz,"
    " acknowledged_by text, on_scene_at timestamptz, on_scene_by text,"
    " condition_cleared_at timestamptz, outcome text, resolved_at timestamptz, resolved_by text"
)
_ALERT_NAMES = tuple(column.split()[0] for column in _ALERT_RECORD.split(","))
_ALERT_COLUMNS = ", ".join(_ALERT_NAMES)
# Every write is one statement for a whole list of rows, the rows in ONE jsonb parameter
# (``recordset``) that jsonb_to_recordset turns back into typed columns (executemany
# would cost a pipeline sync, and in async psycopg a busy wait, per call; a plain
# statement is one round trip).
_UPSERT = f"""
INSERT INTO alerts ({_ALERT_COLUMNS}, unit_id, updated_at)
SELECT u.id, u.site_id, u.device_id, u.type, u.severity, u.status, u.dedup_key, u.opened_at,
       u.last_seen_at, u.escalation_anchor, u.count, u.level, u.epoch,
       ARRAY(SELECT jsonb_array_elements_text(u.sources)), u.first_event_id, u.last_event_id,
       u.acknowledged_at, u.acknowledged_by, u.on_scene_at, u.on_scene_by,
       u.condition_cleared_at, u.outcome, u.resolved_at, u.resolved_by,
       (SELECT organisation_id FROM sites WHERE id = u.site_id), now()
FROM jsonb_to_recordset(%s::jsonb) AS u ({_ALERT_RECORD})
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
# The chained rows and the new heads of their alerts: one statement.
_AUDIT = """
WITH appended AS (
    INSERT INTO alert_audit (time, alert_id, seq, actor, action, channel, detail, prev_hash, hash)
    SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r (time timestamptz, alert_id uuid,
        seq bigint, actor text, action text, channel text, detail jsonb, prev_hash bytea,
        hash bytea)
)
INSERT INTO alert_audit_heads (alert_id, seq, hash)
SELECT * FROM jsonb_to_recordset(%s::jsonb) AS h (alert_id uuid, seq bigint, hash bytea)
ON CONFLICT (alert_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
"""
# Positions follow the list's order (the live feed's order of an alert's changes).
_CHANGES = """
INSERT INTO alert_changes (alert_id, seq, time, action, alert)
SELECT alert_id, seq, time, action, alert
FROM jsonb_to_recordset(%s::jsonb)
    AS c (n int, alert_id uuid, seq bigint, time timestamptz, action text, alert jsonb)
ORDER BY n
"""
# Timer workers sleep until the earliest deadline they know: told at the commit.
_NEXT_STEPS = """
WITH planned AS (
    UPDATE alerts a SET next_step_at = u.at
    FROM jsonb_to_recordset(%s::jsonb) AS u (id uuid, at timestamptz) WHERE a.id = u.id
)
SELECT pg_notify('engine_timers', '')
"""
# Parameters: ``step_params``. A step already recorded fired before: it is not recorded again.
STEPS_INSERT = """
INSERT INTO alert_steps (step_id, alert_id, epoch, kind, level, n, due_at, fired_at, fired_by)
SELECT step_id, alert_id, epoch, kind, level, n, due_at, %s, %s
FROM jsonb_to_recordset(%s::jsonb) AS s (step_id text, alert_id uuid, epoch int, kind text,
    level smallint, n int, due_at timestamptz)
ON CONFLICT (step_id) DO NOTHING
RETURNING step_id
"""
# The open alerts of some dedup keys locked in key order, then, as statements of their
# own in the same pipeline (so each starts once the locks are held and sees every step
# and head committed before), their fired steps of the current epoch and their
# audit-chain heads, locked in alert order after the alerts as ``request_heads`` does.
_LOCK_OPEN = f"""
SELECT {_ALERT_COLUMNS} FROM alerts WHERE dedup_key = ANY(%s) AND status <> 'resolved'
ORDER BY dedup_key FOR UPDATE
"""
_STEPS_OF_OPEN = """
SELECT s.alert_id, s.epoch, s.kind, s.level, s.n
FROM alert_steps s JOIN alerts a ON a.id = s.alert_id AND a.epoch = s.epoch
WHERE a.dedup_key = ANY(%s) AND a.status <> 'resolved'
"""
_HEADS_OF_OPEN = """
SELECT h.alert_id, h.seq, h.hash
FROM alert_audit_heads h JOIN alerts a ON a.id = h.alert_id
WHERE a.dedup_key = ANY(%s) AND a.status <> 'resolved'
ORDER BY h.alert_id FOR UPDATE OF h
"""


T = TypeVar("T")
# A read already sent: awaiting it reads the answer (see ``request_heads``).
Finish = Callable[[], Awaitable[T]]


def finished(value: T) -> Finish[T]:
    async def finish() -> T:
        return value

    return finish


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
        a.epoch, sorted(a.sources), a.first_event_id, a.last_event_id,
        a.acknowledged_at, a.acknowledged_by, a.on_scene_at, a.on_scene_by,
        a.condition_cleared_at, a.outcome.value if a.outcome else None, a.resolved_at,
        a.resolved_by,
    )  # fmt: skip


def recordset(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as ONE parameter for ``jsonb_to_recordset(%s::jsonb) AS x (name type, ...)``.

    Why not a list per column for ``unnest``: psycopg adapts every list parameter in
    Python, ≈ 30 µs a list however short, so the alert row's 24 columns cost ≈ 0.7 ms
    of CPU per statement, and list parameters were a third of the alarm lane's CPU
    (bench/README.md). orjson writes uuids and datetimes (RFC 3339, offset kept, to the
    microsecond) itself; bytes go as bytea's hex text, a ``Jsonb`` as its value. (orjson
    would write a non-finite float as null: none gets here, the audit chain refuses
    them and ingest's contract before it.)"""
    return orjson.dumps([dict(zip(names, r, strict=True)) for r in rows],
                        default=_json_value).decode()  # fmt: skip


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, Jsonb):
        return value.obj
    raise TypeError(f"no JSON form for {type(value).__name__} in a recordset")


_AUDIT_NAMES = ("time", "alert_id", "seq", "actor", "action", "channel", "detail", "prev_hash",
                "hash")  # fmt: skip
_HEAD_NAMES = ("alert_id", "seq", "hash")
_CHANGE_NAMES = ("n", "alert_id", "seq", "time", "action", "alert")
_STEP_NAMES = ("step_id", "alert_id", "epoch", "kind", "level", "n", "due_at")


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

    async def request_open(
        self, dedup_keys: Sequence[str]
    ) -> Finish[tuple[dict[str, Alert], dict[uuid.UUID, frozenset[StepKey]]]]:
        """``lock_open`` with what follows the lock sent in the same round trip: the open
        alerts by dedup key and their fired steps; their chain heads are locked and kept.

        Statements of one pipeline run one after the other: the reads start once the
        alert locks are held, and a step or head is only written under its alert's lock
        (a step's foreign key alone needs a key-share lock on the row, which ours
        excludes), so they see every step fired and every head written before: never a
        snapshot taken before a wait for the lock."""
        keys = sorted(set(dedup_keys))
        if not keys:
            return finished(({}, {}))
        lock = self.conn.cursor(row_factory=dict_row)
        await lock.execute(_LOCK_OPEN, (keys,))
        steps = self.conn.cursor(row_factory=dict_row)
        await steps.execute(_STEPS_OF_OPEN, (keys,))
        heads = await self.conn.execute(_HEADS_OF_OPEN, (keys,))

        async def finish() -> tuple[dict[str, Alert], dict[uuid.UUID, frozenset[StepKey]]]:
            alerts = {a.dedup_key: a for a in map(alert_from_row, await lock.fetchall())}
            locked = {a.id for a in alerts.values()}
            fired: dict[uuid.UUID, set[StepKey]] = {}
            for r in await steps.fetchall():
                if r["alert_id"] in locked:  # an alert opened meanwhile is not ours
                    fired.setdefault(r["alert_id"], set()).add(step_key_from_row(r))
            for alert_id in locked:
                self._heads.setdefault(alert_id, None)
            for alert_id, seq, digest in await heads.fetchall():
                if alert_id in locked:
                    self._heads[alert_id] = ChainHead(alert_id, seq, bytes(digest))
            await lock.close()
            await steps.close()
            return alerts, {k: frozenset(v) for k, v in fired.items()}

        return finish

    def new_chains(self, alert_ids: Iterable[uuid.UUID]) -> None:
        """Alerts opened in this transaction: their chains start here, no head to read.
        (An alert's id derives from the event that opens it, applied once.)"""
        for alert_id in alert_ids:
            self._heads.setdefault(alert_id, None)

    async def lock_alert(self, alert_id: uuid.UUID) -> Alert | None:
        rows = await self._alerts(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = %s FOR UPDATE", (alert_id,)
        )
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def opening_race(self) -> AsyncIterator[None]:
        """Around writes that may open an alert: losing the race for a dedup key is a
        recoverable ``StoreError``. In pipeline mode the violation surfaces at the next
        sync, so this wraps the first read that follows the upsert too."""
        try:
            yield
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "alerts_open_dedup":
                raise
            # Another server opened this dedup key first (nothing to lock before): roll
            # back and apply again — it will then find that alert and count a repeat.
            raise StoreError(f"alert opened concurrently: {exc}", recoverable=True) from exc

    async def load_heads(self, alert_ids: Iterable[uuid.UUID]) -> None:
        """Lock and cache the audit-chain heads of ``alert_ids`` in one round trip."""
        await (await self.request_heads(alert_ids))()

    async def request_heads(self, alert_ids: Iterable[uuid.UUID]) -> Finish[None]:
        """Send the heads' read; the returned coroutine function reads the answer. On a
        connection in pipeline mode several requests then share one round trip."""
        missing = sorted({a for a in alert_ids if a not in self._heads})
        if not missing:
            return finished(None)
        cur = await self.conn.execute(
            "SELECT alert_id, seq, hash FROM alert_audit_heads WHERE alert_id = ANY(%s)"
            " ORDER BY alert_id FOR UPDATE",
            (missing,),
        )

        async def finish() -> None:
            rows = await cur.fetchall()
            for alert_id in missing:
                self._heads[alert_id] = None
            for alert_id, seq, digest in rows:
                self._heads[alert_id] = ChainHead(alert_id, seq, bytes(digest))

        return finish

    async def save(
        self, transitions: Sequence[Transition], rows: Sequence[Alert] | None = None
    ) -> None:
        """Each transition's row, chained audit row and change-log row, in order.

        Set-based: one statement per kind for the whole list, the chain computed here
        from heads read in one go. An alert's row is written once, in its final state;
        change-log positions follow the list's order. ``rows``, when given, are the
        states to write instead (a unit of work's final state of each alert)."""
        if not transitions:
            return
        final = list({t.after.id: t.after for t in transitions}.values()) if rows is None else rows
        async with self.opening_race():
            await self.conn.execute(_UPSERT, (recordset(_ALERT_NAMES, map(_values, final)),))
        changes = []
        seqs = await self._append_all([t.audit for t in transitions])
        for n, (t, seq) in enumerate(zip(transitions, seqs, strict=True)):
            changes.append(
                (n, t.after.id, seq, t.audit.time, t.audit.action.value, alert_json(t.after))
            )
        await self.conn.execute(_CHANGES, (recordset(_CHANGE_NAMES, changes),))

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        await self._append_all(entries)

    async def _append_all(self, entries: Sequence[AuditEntry]) -> list[int]:
        """Chain ``entries`` in order onto their alerts' heads: rows and heads written set-based."""
        if not entries:
            return []
        await self.load_heads(e.alert_id for e in entries)
        rows = []
        heads: dict[uuid.UUID, ChainHead] = {}
        seqs = []
        for entry in entries:
            row, head = chain_entry(entry, self._heads[entry.alert_id])
            rows.append(
                (row.time, row.alert_id, row.seq, row.actor, row.action, row.channel,
                 dict(row.detail), row.prev_hash, row.hash)
            )  # fmt: skip
            self._heads[entry.alert_id] = heads[entry.alert_id] = head
            seqs.append(head.seq)
        news = [(h.alert_id, h.seq, h.hash) for h in heads.values()]
        await self.conn.execute(
            _AUDIT, (recordset(_AUDIT_NAMES, rows), recordset(_HEAD_NAMES, news))
        )
        return seqs

    async def fired_steps(self, alert_id: uuid.UUID, epoch: int) -> frozenset[StepKey]:
        fired = await self.fired_steps_of([alert_id])
        return frozenset(k for k in fired.get(alert_id, ()) if k.epoch == epoch)

    async def fired_steps_of(
        self, alert_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, frozenset[StepKey]]:
        return await (await self.request_fired_steps(alert_ids))()

    async def request_fired_steps(
        self, alert_ids: Sequence[uuid.UUID]
    ) -> Finish[dict[uuid.UUID, frozenset[StepKey]]]:
        cur = self.conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT alert_id, epoch, kind, level, n FROM alert_steps WHERE alert_id = ANY(%s)",
            (list(alert_ids),),
        )

        async def finish() -> dict[uuid.UUID, frozenset[StepKey]]:
            out: dict[uuid.UUID, set[StepKey]] = {}
            for r in await cur.fetchall():
                out.setdefault(r["alert_id"], set()).add(step_key_from_row(r))
            await cur.close()
            return {k: frozenset(v) for k, v in out.items()}

        return finish

    async def record_step(self, key: StepKey, at: datetime, due: datetime | None = None) -> bool:
        return key.id in await self.record_steps([(key, due or at)], at)

    async def record_steps(
        self, steps: Sequence[tuple[StepKey, datetime]], at: datetime
    ) -> frozenset[str]:
        """Record each (step, due) fired at ``at``; returns the ids that are new (a key
        already there fired before). One statement for the whole list."""
        if not steps:
            return frozenset()
        cur = await self.conn.execute(STEPS_INSERT, self.step_params(steps, at))
        return frozenset(str(r[0]) for r in await cur.fetchall())

    def step_params(self, steps: Sequence[tuple[StepKey, datetime]], at: datetime) -> list[Any]:
        """The parameters of ``STEPS_INSERT``: each (step, due) fired at ``at`` by us."""
        rows = [(k.id, k.alert_id, k.epoch, k.kind.value, k.level, k.n, due) for k, due in steps]
        return [at, self.worker, recordset(_STEP_NAMES, rows)]

    async def set_next_step_at(self, alert_id: uuid.UUID, at: datetime | None) -> None:
        await self.set_next_steps_at([(alert_id, at)])

    async def set_next_steps_at(self, plans: Sequence[tuple[uuid.UUID, datetime | None]]) -> None:
        if plans:
            await self.conn.execute(_NEXT_STEPS, (recordset(("id", "at"), plans),))

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


async def request_alert_lock(
    conn: psycopg.AsyncConnection[Any], alert_id: uuid.UUID
) -> Finish[Alert | None]:
    """``PgAlertTransaction.lock_alert`` as a request (``Finish``): a person's command sends
    it with the other reads it needs, so on a connection in pipeline mode they share one
    round trip (``unit_of_work.request_command``)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))

    async def finish() -> Alert | None:
        row = await cur.fetchone()
        await cur.close()
        return alert_from_row(row) if row else None

    return finish
