"""The engine's two units of work over PostgreSQL: apply an inbox event, fire due timers.

Both run inside one transaction and end in ``persist``: the alert changes
(rows, chained audit rows, change-log rows), then each fired step's key in
``alert_steps`` (a key already there fired before: its transition and notices
are dropped) and the transitions of the steps that are new, the notices into
the notifications outbox, downlink commands into the downlink outbox, and each
alert's ``next_step_at``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from alerting.conditions import (
    ACTIVITY_RULES,
    InactivityProfile,
    InvalidReading,
    NightHours,
    ThresholdRule,
    ThresholdState,
    evaluate_inactivity,
    evaluate_threshold,
    threshold_rule_for,
)
from alerting.downlink import Downlink
from alerting.engine import Effects, settle
from alerting.lifecycle import Command, IllegalTransition, Transition, transition
from alerting.model import Alert, AlertStatus
from alerting.pipeline import Batch, Escalate, PlannedStep
from alerting.planner import Step, StepKey
from alerting.ports import StoreError
from alerting.rules import (
    ConditionSignal,
    EngineEvent,
    EventKind,
    Phase,
    decide,
    decide_signal,
    dedup_keys,
    signal_key,
)
from gateway.alerts.directory import Directory, Unit, load_policy_book, request_policy_book
from gateway.alerts.store import (
    STEPS_INSERT,
    Finish,
    PgAlertTransaction,
    recordset,
    request_alert_lock,
)
from gateway.db.pipelined import pipelined_transaction

log = logging.getLogger(__name__)

# One statement per kind for a whole unit of work (its rows in one parameter,
# store.recordset).
_NOTICE_NAMES = ("key", "alert_id", "step_id", "level", "person_id", "role", "channel", "target",
                 "text", "until_status", "fallback", "not_before", "channel_since")  # fmt: skip
_NOTICE_ROWS = """
INSERT INTO notifications (key, alert_id, step_id, level, person_id, role, channel, target, text,
    until_status, fallback, not_before, channel_since)
SELECT * FROM jsonb_to_recordset(%s::jsonb)
    AS n (key text, alert_id uuid, step_id text, level int, person_id text, role text,
          channel text, target text, text text, until_status text, fallback jsonb,
          not_before timestamptz, channel_since timestamptz)
"""
_NOTICES = _NOTICE_ROWS + "ON CONFLICT (key) DO NOTHING"
# The steps of a unit of work whose fired steps were read under the alerts' locks: each
# step recorded once (ON CONFLICT DO NOTHING), the notices of the steps that are new only,
# in one statement with no answer to wait for. Every step is expected new (the steps
# read after the lock): one that is not fails the statement, so the transaction rolls
# back before its commit and the events are applied one at a time, where the RETURNING
# of the steps recorded decides (``intake_batch``).
_STEPS_NOTIFYING = f"""
WITH new AS ({STEPS_INSERT}),
noticed AS ({_NOTICE_ROWS} WHERE n.step_id IN (SELECT step_id FROM new)
            ON CONFLICT (key) DO NOTHING)
SELECT CASE WHEN count(*) = %s THEN 0
            ELSE ('steps already recorded: ' || (%s - count(*)))::int END
FROM new
"""
_DOWNLINK_NAMES = ("command_id", "alert_id", "site_id", "device_id", "action", "created_at")
_DOWNLINKS = """
INSERT INTO downlink_outbox (command_id, alert_id, site_id, device_id, action, created_at)
SELECT * FROM jsonb_to_recordset(%s::jsonb) AS d (command_id uuid, alert_id uuid, site_id text,
    device_id text, action text, created_at timestamptz)
ON CONFLICT (command_id) DO NOTHING
"""
# Events of one site are applied in order by one worker at a time: a worker takes
# the site's advisory lock with its rows, so another never applies a later event
# (a smoke "clear") before an earlier one of that site (its "raise") is committed.
SITE_LOCK_SPACE = 0x656E67  # "eng": the first key of pg_advisory locks on sites
_CLAIM_INBOX = f"""
SELECT id, event_id, time, site_id, device_id, type, phase, profile, data FROM engine_inbox
WHERE pg_try_advisory_xact_lock({SITE_LOCK_SPACE}, hashtext(site_id))
ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
"""
_SAVEPOINT = "engine_intake"
_DELETE_INBOX = "DELETE FROM engine_inbox WHERE id = ANY(%s)"
_DEAD = """
INSERT INTO engine_dead_letters (event_id, event, reason) VALUES (%s, %s, %s)
ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason, failed_at = now()
"""


@dataclass
class Outcome:
    """What one unit of work did (for metrics, logs and tests)."""

    events: int = 0
    ignored: int = 0
    dead: int = 0
    steps: int = 0
    steps_already_fired: int = 0
    notices: int = 0
    downlinks: int = 0
    alerts: set[uuid.UUID] = field(default_factory=set)


def event_from_row(r: dict[str, Any]) -> EngineEvent:
    data = r["data"] if isinstance(r["data"], dict) else {}
    return EngineEvent(
        event_id=r["event_id"],
        site_id=r["site_id"],
        device_id=r["device_id"],
        kind=EventKind(r["type"]),
        phase=Phase(r["phase"]),
        time=r["time"],
        profile=r["profile"],
        data={k: v for k, v in data.items() if isinstance(v, str | int | float | bool)},
    )


async def persist(
    tx: PgAlertTransaction,
    directory: Directory,
    effects: Effects,
    now: datetime,
    out: Outcome,
    *,
    steps_read_locked: bool = False,
) -> None:
    """Write ``effects`` with a handful of set-based statements, whatever the batch's size.

    The reads come first (audit-chain heads, the roles' people, the devices' profiles;
    none when read already), then the writes. On a connection in pipeline mode only the
    fired-steps insert (its RETURNING says which steps are new) waits for PostgreSQL
    before the commit; with ``steps_read_locked`` (the fired steps were read after the
    alerts' locks, ``PgAlertTransaction.request_open``) every step is new and nothing
    waits: a step found recorded fails the transaction instead (``_STEPS_NOTIFYING``)."""
    wanted = [(alert, step.roles) for alert, step in effects.steps]
    heads = await tx.request_heads(t.after.id for t in effects.transitions)
    recipients = await directory.request_recipients(wanted, now)
    devices = await directory.request_device_commands(
        (d.site_id, d.device_id) for d in effects.downlinks
    )
    await heads()
    people = await recipients()
    await devices()
    if steps_read_locked:
        await tx.save(effects.transitions)  # a new alert's row first: its steps refer to it
        new = frozenset(step.key.id for _, step in effects.steps)
        out.alerts.update(t.after.id for t in effects.transitions)
    else:
        changes = [t for t in effects.transitions if "step" not in t.audit.detail]
        async with tx.opening_race():
            await tx.save(changes)  # a new alert's row first: its steps refer to it
            new = await tx.record_steps([(step.key, step.at) for _, step in effects.steps], now)
        out.steps_already_fired += len(effects.steps) - len(new)
        fired = [
            t for t in effects.transitions
            if "step" in t.audit.detail and t.audit.detail["step"] in new
        ]  # fmt: skip
        # Each alert's row ends in its last kept state: in a batch of events, a repeat may
        # follow the step its opening fired, and the step's own state is then not the last.
        kept = [t for t in effects.transitions
                if "step" not in t.audit.detail or t.audit.detail["step"] in new]  # fmt: skip
        await tx.save(fired, rows=list({t.after.id: t.after for t in kept}.values()))
        out.alerts.update(t.after.id for t in (*changes, *fired))
    out.steps += len(new)
    planned = [
        PlannedStep(alert, step, found)
        for (alert, step), found in zip(effects.steps, people, strict=True)
        if step.key.id in new
    ]
    notices: list[tuple[Any, ...]] = []
    if planned:
        batch = await Escalate()(Batch(now, steps=tuple(planned)))
        notices = [
            (n.key, n.alert_id, n.step_id, n.level, n.person_id, n.role.value,
             n.channel.value, n.target, n.text, n.until.value,
             [[c.value, t] for c, t in n.fallback], n.not_before, n.channel_since)
            for n in batch.pending
        ]  # fmt: skip
    if steps_read_locked and effects.steps:
        recorded = [(step.key, step.at) for _, step in effects.steps]
        await tx.conn.execute(
            _STEPS_NOTIFYING,
            [*tx.step_params(recorded, now), recordset(_NOTICE_NAMES, notices), len(recorded),
             len(recorded)],
        )
    elif notices:
        await tx.conn.execute(_NOTICES, (recordset(_NOTICE_NAMES, notices),))
    out.notices += len(notices)
    if planned:
        await tx.audit([u.audit() for u in batch.unstaffed])
    downlinks = [
        (d.command_id, d.alert_id, d.site_id, d.device_id, d.action, now)
        for d in effects.downlinks
        if directory.accepts(d)
    ]
    if downlinks:
        await tx.conn.execute(_DOWNLINKS, (recordset(_DOWNLINK_NAMES, downlinks),))
        out.downlinks += len(downlinks)
    await tx.set_next_steps_at(effects.next_step_at)  # and wakes the timer workers


async def _settle_and_persist(
    tx: PgAlertTransaction,
    directory: Directory,
    changes: Sequence[Transition],
    now: datetime,
    out: Outcome,
    claimed: Sequence[Alert] = (),
) -> None:
    latest = {a.id: a for a in claimed} | {t.after.id: t.after for t in changes}
    paths = await directory.request_paths([a.site_id for a in latest.values()])
    steps = await tx.request_fired_steps(list(latest))
    await paths()
    fired = await steps()

    def fired_for(alert: Alert) -> frozenset[StepKey]:
        return frozenset(k for k in fired.get(alert.id, ()) if k.epoch == alert.epoch)

    effects = settle(changes, directory.policy_for, fired_for, now, claimed)
    await persist(tx, directory, effects, now, out)


async def apply_event(
    tx: PgAlertTransaction, directory: Directory, event: EngineEvent, now: datetime, out: Outcome
) -> None:
    """One event: lock its alerts, decide, settle (first rung, downlink, next timer)."""
    open_alerts = await tx.lock_open(dedup_keys(event))
    decision = decide(event, open_alerts, now=now)
    if decision.ignored is not None:
        out.ignored += 1
        log.debug("event %s changes no alert: %s", event.event_id, decision.ignored)
        return
    await _settle_and_persist(tx, directory, decision.transitions, now, out)


def _lock_order(row: dict[str, Any]) -> tuple[str, ...]:
    try:
        return dedup_keys(event_from_row(row))
    except ValueError:
        return ()


async def intake_batch(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int = 50, worker: str = "engine"
) -> Outcome:
    """Claim up to ``limit`` inbox rows (SKIP LOCKED), apply them, delete them; one commit.

    Together first, in three round trips: the claim (with the policy overrides); the
    dedup-key lock (with the unit paths, fired steps, chain heads, on-duty staff and
    device profiles it needs); every write, the inbox delete and the commit. A batch
    the database refuses (lost a race to open a key, a check, a step found recorded)
    fails at that commit as a whole and rolls back: its events are then claimed again
    and applied one at a time, each in a savepoint of its own, retried or dead-lettered
    alone."""
    # Inside a caller's transaction (ingest may run the intake with its events) the batch
    # is a savepoint of it, rolled back alone when refused.
    savepoint = None if conn.info.transaction_status is TransactionStatus.IDLE else _SAVEPOINT
    try:
        return await _intake_together(
            conn, now, limit, worker, pipelined_transaction(conn, savepoint)
        )
    except psycopg.OperationalError:
        raise
    except (StoreError, psycopg.DatabaseError, ValueError, KeyError, IllegalTransition) as exc:
        log.info("inbox batch applied one event at a time: %s", exc)
        return await _intake_one_at_a_time(conn, now, limit, worker)


async def intake_within(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int = 50, worker: str = "engine"
) -> Outcome:
    """``intake_batch`` as statements of the caller's transaction, in the caller's
    pipeline: no transaction or savepoint of its own, so it waits for PostgreSQL only for
    its claim and its reads. No fallback either: whatever fails it fails the caller's
    transaction, which is then written again without it (ingest's alarm lane), and the
    workers take those inbox rows with ``intake_batch``."""
    return await _intake_together(conn, now, limit, worker, contextlib.nullcontext())


async def _intake_together(
    conn: psycopg.AsyncConnection[Any],
    now: datetime,
    limit: int,
    worker: str,
    scope: contextlib.AbstractAsyncContextManager[Any],
) -> Outcome:
    out = Outcome()
    async with scope:
        book = await request_policy_book(conn)  # sent with the claim: one round trip
        rows = await _claim_inbox(conn, limit)
        if not rows:
            return out
        tx = PgAlertTransaction(conn, worker)
        directory = Directory(conn, await book())
        await _apply_rows_together(conn, tx, directory, rows, now, out)
        out.events += len(rows)
        await conn.execute(_DELETE_INBOX, ([r["id"] for r in rows],))
    return out


async def _intake_one_at_a_time(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int, worker: str
) -> Outcome:
    out = Outcome()
    async with conn.pipeline(), conn.transaction():
        book = await request_policy_book(conn)
        rows = await _claim_inbox(conn, limit)
        if not rows:
            return out
        tx = PgAlertTransaction(conn, worker)
        directory = Directory(conn, await book())
        for row in rows:
            await _apply_row(conn, tx, directory, row, now, out)
        out.events += len(rows)
        await conn.execute(_DELETE_INBOX, ([r["id"] for r in rows],))
    return out


async def _claim_inbox(conn: psycopg.AsyncConnection[Any], limit: int) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_CLAIM_INBOX, (limit,))
        rows = await cur.fetchall()
    # Alerts are locked in key order across the batch, so two workers never deadlock.
    rows.sort(key=lambda r: (_lock_order(r), r["id"]))
    return rows


async def _apply_rows_together(
    conn: psycopg.AsyncConnection[Any],
    tx: PgAlertTransaction,
    directory: Directory,
    rows: Sequence[dict[str, Any]],
    now: datetime,
    out: Outcome,
) -> None:
    """The batch's events in order, as ``apply_event`` would apply them one by one, but
    decided and settled in memory and persisted once: one round trip for every read (the
    lock of every dedup key, fired steps, chain heads, unit paths, who is on duty, the
    devices' profiles), one set-based write. An event the rules refuse is dead-lettered
    before anything of it is kept."""
    events: list[tuple[dict[str, Any], EngineEvent, tuple[str, ...]]] = []
    for row in rows:
        try:
            event = event_from_row(row)
            events.append((row, event, tuple(dedup_keys(event))))
        except (ValueError, KeyError) as exc:
            await _dead_letter(conn, row, exc, out)
    sites = [r["site_id"] for r in rows]
    paths = await directory.request_paths(sites)
    locked = await tx.request_open([k for _, _, ks in events for k in ks])
    # Sent speculatively, before the decision: what a first rung and a downlink need.
    duty = await directory.request_duty_at_sites(sites, now)
    devices = await directory.request_device_commands(
        (e.site_id, e.device_id) for _, e, _ in events if e.device_id
    )
    open_by_key, recorded = await locked()
    await paths()
    await duty()
    await devices()
    opened = set()
    fired_now: dict[uuid.UUID, set[StepKey]] = {}

    def fired_for(alert: Alert) -> frozenset[StepKey]:
        keys = (*recorded.get(alert.id, ()), *fired_now.get(alert.id, ()))
        return frozenset(k for k in keys if k.epoch == alert.epoch)

    transitions: list[Transition] = []
    steps: list[tuple[Alert, Step]] = []
    downlinks: list[Downlink] = []
    plans: dict[uuid.UUID, datetime | None] = {}
    for row, event, event_keys in events:
        try:
            mine = {k: open_by_key[k] for k in event_keys if k in open_by_key}
            decision = decide(event, mine, now=now)
            if decision.ignored is not None:
                out.ignored += 1
                log.debug("event %s changes no alert: %s", event.event_id, decision.ignored)
                continue
            effects = settle(decision.transitions, directory.policy_for, fired_for, now)
        except (ValueError, KeyError, IllegalTransition) as exc:
            await _dead_letter(conn, row, exc, out)
            continue
        transitions += effects.transitions
        steps += effects.steps
        downlinks += effects.downlinks
        plans.update(effects.next_step_at)
        for _alert, step in effects.steps:
            fired_now.setdefault(step.key.alert_id, set()).add(step.key)
        for alert in effects.alerts.values():
            if alert.status is AlertStatus.RESOLVED:
                if alert.dedup_key in open_by_key and open_by_key[alert.dedup_key].id == alert.id:
                    del open_by_key[alert.dedup_key]
            else:
                if alert.dedup_key not in open_by_key:
                    opened.add(alert.id)
                open_by_key[alert.dedup_key] = alert
    tx.new_chains(opened)
    merged = Effects(tuple(transitions), tuple(steps), tuple(downlinks), tuple(plans.items()))
    await persist(tx, directory, merged, now, out, steps_read_locked=True)


async def _dead_letter(
    conn: psycopg.AsyncConnection[Any], row: dict[str, Any], exc: Exception, out: Outcome
) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    log.error("event %s cannot be applied, kept in engine_dead_letters: %s",
              row["event_id"], reason)  # fmt: skip
    event = {k: (str(v) if k in ("event_id", "time") else v) for k, v in row.items()
             if k != "id"}  # fmt: skip
    await conn.execute(_DEAD, (row["event_id"], Jsonb(event), reason))
    out.dead += 1


async def _apply_row(
    conn: psycopg.AsyncConnection[Any],
    tx: PgAlertTransaction,
    directory: Directory,
    row: dict[str, Any],
    now: datetime,
    out: Outcome,
) -> None:
    for attempt in range(3):
        try:
            async with conn.transaction():  # a savepoint: one bad event spoils no other
                await apply_event(tx, directory, event_from_row(row), now, out)
            return
        except StoreError as exc:
            # Lost the race to open a key: the winner has committed, so the next try
            # finds its alert and counts a repeat (alerting/README.md, point 2).
            tx.forget()
            if attempt == 2:
                raise
            log.info("retrying event %s: %s", row["event_id"], exc)
        except (ValueError, KeyError, IllegalTransition) as exc:
            tx.forget()
            await _dead_letter(conn, row, exc, out)
            return


async def timers_tick(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int = 100, worker: str = "engine"
) -> Outcome:
    """Claim alerts whose ``next_step_at`` has come (SKIP LOCKED) and fire their steps."""
    out = Outcome()
    async with conn.pipeline(), conn.transaction():
        tx = PgAlertTransaction(conn, worker)
        book = await request_policy_book(conn)  # sent with the claim: one round trip
        claimed = await tx.claim_due(now, limit)
        if not claimed:
            return out
        directory = Directory(conn, await book())
        await _settle_and_persist(tx, directory, (), now, out, claimed)
    return out


# The unit path of one alert's site, asked for by the alert's id, so it goes out with the
# alert's lock instead of a round trip after it (``Directory.request_paths`` by site).
_ALERT_UNIT_PATH = """
WITH RECURSIVE up (id, parent_id, kind, webhook_url, depth) AS (
    SELECT o.id, o.parent_id, o.kind, o.webhook_url, 0
    FROM alerts a JOIN sites s ON s.id = a.site_id JOIN organisations o ON o.id = s.organisation_id
    WHERE a.id = %s
    UNION ALL
    SELECT o.id, o.parent_id, o.kind, o.webhook_url, up.depth + 1
    FROM organisations o JOIN up ON o.id = up.parent_id
)
SELECT id, kind, webhook_url FROM up ORDER BY depth
"""
# The profile of the alert's device (none: not in the registry), for its downlink.
_ALERT_DEVICE = """
SELECT d.profile FROM alerts a JOIN devices d ON d.site_id = a.site_id AND d.id = a.device_id
WHERE a.id = %s
"""


@dataclass
class Commanded(Outcome):
    """What a person's command did, with the alert as it now stands and its next timer
    (the API answers from them). ``alert`` is None when a step it fired was found fired
    before: the row then holds another state, read it."""

    alert: Alert | None = None
    next_step_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CommandReads:
    """What ``request_command`` read: the alert under its row lock (None: no such alert),
    the policy overrides, its fired steps; its chain head is locked and kept in ``tx``."""

    alert_id: uuid.UUID
    tx: PgAlertTransaction
    directory: Directory
    alert: Alert | None
    fired: frozenset[StepKey]


async def request_command(
    conn: psycopg.AsyncConnection[Any], alert_id: uuid.UUID, worker: str = "console"
) -> Finish[CommandReads]:
    """Send the reads of a command on ``alert_id`` (``store.Finish``): the alert's row
    lock, the policy overrides, its unit path, device, fired steps and audit-chain head.
    On a connection in pipeline mode they share one round trip with whatever the caller
    sends around them (the API sends its idempotency lookup and its view). Statements of
    a pipeline run in order, each with its own snapshot: the steps and the head are read
    once the row's lock is held, and the head is locked after the row, as every writer
    does."""
    tx = PgAlertTransaction(conn, worker)
    locked = await request_alert_lock(conn, alert_id)
    book = await request_policy_book(conn)
    path = await conn.execute(_ALERT_UNIT_PATH, (alert_id,))
    device = await conn.execute(_ALERT_DEVICE, (alert_id,))
    steps = await tx.request_fired_steps([alert_id])
    heads = await tx.request_heads([alert_id])

    async def finish() -> CommandReads:
        alert = await locked()
        directory = Directory(conn, await book())
        units = [Unit(*r) for r in await path.fetchall()]
        profile = await device.fetchone()
        if alert is not None:
            directory.know_path(alert.site_id, units)
            if alert.device_id is not None:
                directory.know_device(
                    alert.site_id, alert.device_id, str(profile[0]) if profile else None
                )
        fired = (await steps()).get(alert_id, frozenset())
        await heads()
        return CommandReads(alert_id, tx, directory, alert, fired)

    return finish


async def command(
    conn: psycopg.AsyncConnection[Any],
    alert_id: uuid.UUID,
    make: Callable[[Alert], Command],
    now: datetime,
    worker: str = "console",
    sent: Finish[CommandReads] | None = None,
) -> Commanded:
    """A person's command on an alert (acknowledge, on scene, resolve): ``make(alert)``
    gives the ``Command``; it is applied, settled (downlink, new timers) and committed.

    ``sent``: its reads, sent by ``request_command`` inside the caller's transaction,
    which the caller commits (no savepoint of its own: in pipeline mode each costs a
    round trip, and a refused command raises before it writes anything)."""
    if sent is not None:
        return await _apply_command(await sent(), make, now)
    async with conn.transaction():
        reads = await request_command(conn, alert_id, worker)
        return await _apply_command(await reads(), make, now)


async def _apply_command(
    reads: CommandReads, make: Callable[[Alert], Command], now: datetime
) -> Commanded:
    alert = reads.alert
    if alert is None:
        raise LookupError(f"no alert {reads.alert_id}")
    change = transition(alert, make(alert), now)
    await reads.directory.preload([alert.site_id])  # read already: no round trip

    def fired_for(a: Alert) -> frozenset[StepKey]:
        return frozenset(k for k in reads.fired if k.epoch == a.epoch)

    effects = settle([change], reads.directory.policy_for, fired_for, now)
    out = Commanded()
    await persist(reads.tx, reads.directory, effects, now, out)
    if not out.steps_already_fired:  # every transition kept: the last is the row's state
        out.alert = effects.alerts[alert.id]
    out.next_step_at = dict(effects.next_step_at).get(alert.id)
    return out


_CLAIM_READINGS = f"""
SELECT id, time, site_id, device_id, metric, value FROM condition_inbox
WHERE pg_try_advisory_xact_lock({SITE_LOCK_SPACE}, hashtext(site_id))
ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
"""
_STATE = """
SELECT state, last_time FROM condition_state
WHERE site_id = %s AND device_id = %s AND metric = %s FOR UPDATE
"""
_SAVE_STATE = """
INSERT INTO condition_state (site_id, device_id, metric, state, last_time)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (site_id, device_id, metric) DO UPDATE SET
    state = excluded.state, last_time = excluded.last_time, updated_at = now()
"""


def _state_from_json(doc: dict[str, Any]) -> ThresholdState:
    return ThresholdState(int(doc["level"]), tuple(doc["runs_above"]), tuple(doc["runs_below"]))


def _state_json(state: ThresholdState) -> dict[str, Any]:
    return {
        "level": state.level,
        "runs_above": list(state.runs_above),
        "runs_below": list(state.runs_below),
    }


async def apply_signal(
    tx: PgAlertTransaction,
    directory: Directory,
    signal: ConditionSignal,
    now: datetime,
    out: Outcome,
) -> None:
    open_alerts = await tx.lock_open([signal_key(signal)])
    decision = decide_signal(signal, open_alerts, now=now)
    if decision.ignored is not None:
        out.ignored += 1
        return
    await _settle_and_persist(tx, directory, decision.transitions, now, out)


async def conditions_batch(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int = 200, worker: str = "engine"
) -> Outcome:
    """Judge queued threshold readings (SKIP LOCKED, one worker per site at a time) with
    the state kept per (site, device, metric); a level change goes through the rules."""
    out = Outcome()
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_CLAIM_READINGS, (limit,))
            readings = await cur.fetchall()
        if not readings:
            return out
        tx = PgAlertTransaction(conn, worker)
        directory = Directory(conn, await load_policy_book(conn))
        readings.sort(key=lambda r: (r["site_id"], r["device_id"], r["metric"], r["time"]))
        series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in readings:
            series.setdefault((r["site_id"], r["device_id"], r["metric"]), []).append(r)
        for (site_id, device_id, metric), items in series.items():
            rule = threshold_rule_for(metric)
            if rule is not None:
                await _judge(tx, directory, rule, site_id, device_id, metric, items, now, out)
            out.events += len(items)
        await conn.execute(
            "DELETE FROM condition_inbox WHERE id = ANY(%s)", ([r["id"] for r in readings],)
        )
    return out


async def _judge(
    tx: PgAlertTransaction,
    directory: Directory,
    rule: ThresholdRule,
    site_id: str,
    device_id: str,
    metric: str,
    items: list[dict[str, Any]],
    now: datetime,
    out: Outcome,
) -> None:
    cur = await tx.conn.execute(_STATE, (site_id, device_id, metric))
    row = await cur.fetchone()
    state = _state_from_json(row[0]) if row else ThresholdState()
    last: datetime | None = row[1] if row else None
    for r in items:
        if last is not None and r["time"] <= last:
            out.ignored += 1  # late or repeated: the runs are judged in time order
            continue
        try:
            outcome = evaluate_threshold(
                rule, state, site_id=site_id, device_id=device_id, metric=metric,
                value=r["value"], at=r["time"],
            )  # fmt: skip
        except InvalidReading as exc:
            log.error("reading refused by the threshold rules: %s", exc)
            out.dead += 1
            continue
        state, last = outcome.state, r["time"]
        if outcome.signal is not None:
            await apply_signal(tx, directory, outcome.signal, now, out)
    if last is not None:
        await tx.conn.execute(
            _SAVE_STATE, (site_id, device_id, metric, Jsonb(_state_json(state)), last)
        )


_CLAIM_WATCHES = """
SELECT w.resident_id, w.last_activity, w.raised, r.site_id, r.inactivity_window_min,
       r.timezone, r.night_start, r.night_end,
       coalesce((SELECT d.id FROM devices d WHERE d.resident_id = r.id ORDER BY d.id LIMIT 1),
                'resident-' || r.id) AS device_id
FROM inactivity_watch w JOIN residents r ON r.id = w.resident_id
WHERE w.check_at <= %s
ORDER BY w.check_at LIMIT %s FOR UPDATE OF w SKIP LOCKED
"""
# The newest reading that shows the resident up and about, from the site's devices
# (wristband movement, the home's electricity use); the telemetry key index serves it.
_LAST_ACTIVITY = """
SELECT max(t.time) FROM telemetry t JOIN devices d ON d.site_id = t.site_id AND d.id = t.device_id
WHERE t.site_id = %s AND t.metric = %s AND t.value >= %s AND t.time <= %s
  AND (d.resident_id = %s OR d.resident_id IS NULL)
"""
_WATCHED = "UPDATE inactivity_watch SET last_activity = %s, raised = %s, check_at = %s"
_WATCHED += " WHERE resident_id = %s"
RECHECK_RAISED = timedelta(minutes=1)  # how soon a raised check looks for movement again


async def inactivity_sweep(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int = 200, worker: str = "engine"
) -> Outcome:
    """Welfare checks whose time has come: overdue → an inactivity alert; movement again
    → it clears. Each watch sleeps until its due time (waking hours only)."""
    out = Outcome()
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_CLAIM_WATCHES, (now, limit))
            watches = await cur.fetchall()
        if not watches:
            return out
        tx = PgAlertTransaction(conn, worker)
        directory = Directory(conn, await load_policy_book(conn))
        for w in watches:
            await _check_watch(tx, directory, w, now, out)
            out.events += 1
    return out


async def _check_watch(
    tx: PgAlertTransaction, directory: Directory, w: dict[str, Any], now: datetime, out: Outcome
) -> None:
    profile = InactivityProfile(
        window=timedelta(minutes=w["inactivity_window_min"]),
        night=NightHours(w["night_start"], w["night_end"]),
        tz=ZoneInfo(w["timezone"]),
    )
    newest: datetime | None = None
    for rule in ACTIVITY_RULES.values():
        cur = await tx.conn.execute(
            _LAST_ACTIVITY, (w["site_id"], rule.metric, rule.min_value, now, w["resident_id"])
        )
        row = await cur.fetchone()
        if row and row[0] is not None and (newest is None or row[0] > newest):
            newest = row[0]
    known: datetime | None = w["last_activity"]
    seen = [t for t in (known, newest) if t is not None]
    last = max(seen) if seen else now  # never looked, nothing seen: watch from now
    verdict = evaluate_inactivity(profile, last, now)
    raised: bool = w["raised"]
    signal: ConditionSignal | None = None
    source = f"resident-{w['resident_id']}"
    if verdict.overdue and not raised:
        note = f"no activity for {verdict.awake_inactive} of waking time since {last.isoformat()}"
        signal = ConditionSignal("inactivity", w["site_id"], w["device_id"], source, True, now,
                                 note=note)  # fmt: skip
        raised = True
    elif raised and not verdict.overdue:
        signal = ConditionSignal("inactivity", w["site_id"], w["device_id"], source, False, now,
                                 note=f"activity at {last.isoformat()}")  # fmt: skip
        raised = False
    if signal is not None:
        await apply_signal(tx, directory, signal, now, out)
    check_at = now + RECHECK_RAISED if raised else verdict.due_at
    await tx.conn.execute(_WATCHED, (last, raised, check_at, w["resident_id"]))
