"""The notifier runner: every due notice is delivered, retried or falls back, and recorded.

One pass (``deliver_due``) is one transaction: claim due rows of the
notifications outbox (``FOR UPDATE SKIP LOCKED``: any number of servers share
the outbox and each attempt happens once), run them through
``alerting.pipeline``'s stages (dedup → mute → group → notify → retry, the one
retry stage acting on each failure's ``recoverable``), write each row's new
state and append every attempt and drop to the alert's audit chain with the
engine's own writer (``PgAlertTransaction.audit``). The row locks are held
while the channels send, bounded by the send timeout: a server that dies
mid-send leaves its rows pending, and the next attempt carries the same
idempotency key (at-least-once, receivers keep the first of each key).

The server runs ``NotifierRunner``: a few passes at once, woken by the outbox
trigger's NOTIFY at commit, sleeping to the earliest ``not_before`` otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
import psycopg
from psycopg.rows import dict_row

from alerting.model import Channel
from alerting.pipeline import (
    RETRY_SCHEDULES,
    Batch,
    Dedup,
    Delivery,
    FallbackPolicy,
    Group,
    Mute,
    Notify,
    Retry,
    RetrySchedule,
    Silence,
    Stage,
    run_stages,
)
from alerting.ports import NotifierChannel
from gateway import metrics
from gateway.alerts.store import PgAlertTransaction
from gateway.alerts.workers import ClockSource, engine_now
from gateway.config import Settings
from gateway.db.stall_guard import guarded
from gateway.notify import http
from gateway.notify.console import ConsoleChannel
from gateway.notify.facts import BatchFacts, RowFacts
from gateway.notify.messaging import MessagingChannel
from gateway.notify.outbox import (
    CLAIM,
    PLACES,
    POSITIONS,
    UNREADABLE,
    UPDATE,
    OutboxRow,
    ledger_of,
    row_from_db,
    settle,
)
from gateway.notify.text import Place
from gateway.notify.voice import PhoneChannel
from gateway.restarting import run_forever

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Notifiers:
    """The channels' long-lived parts; ``bind`` gives one pass its ``NotifierChannel``s."""

    http: httpx.AsyncClient
    webhook_secret: bytes
    voice_url: str | None = None
    voice_token: str | None = None
    send_timeout_s: float = 10.0

    def bind(self, facts: BatchFacts) -> dict[Channel, NotifierChannel]:
        from gateway.notify.webhook import WebhookChannel

        def phone(kind: Literal["voice", "sms"]) -> PhoneChannel:
            return PhoneChannel(self.http, self.voice_url, self.voice_token, facts, kind)

        return {
            Channel.CONSOLE: ConsoleChannel(facts.positions),
            Channel.MESSAGING: MessagingChannel(facts, self.send_timeout_s),
            Channel.VOICE: phone("voice"),
            Channel.SMS: phone("sms"),
            Channel.WEBHOOK: WebhookChannel(self.http, self.webhook_secret, facts),
        }


@dataclass(frozen=True, slots=True)
class Timings:
    """Retry schedules per channel and the fallback windows (data; settings may change them)."""

    schedules: Mapping[Channel, RetrySchedule] = field(default_factory=lambda: RETRY_SCHEDULES)
    default: RetrySchedule = field(default_factory=RetrySchedule)
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    silences: tuple[Silence, ...] = ()  # no silence table yet: nothing is muted


@dataclass
class PassOutcome:
    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    alerts: set[uuid.UUID] = field(default_factory=set)


async def _facts(
    conn: psycopg.AsyncConnection[Any], rows: Sequence[OutboxRow], now: datetime
) -> BatchFacts:
    sites = sorted({r.notice.site_id for r in rows})
    alerts = sorted({r.notice.alert_id for r in rows})
    places: dict[str, Place] = {}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(PLACES, (sites,))
        for p in await cur.fetchall():
            places[p["id"]] = Place(p["id"], p["name"], p["address"], tuple(p["residents"]))
    cur2 = await conn.execute(POSITIONS, (alerts,))
    positions = {a: int(pos) for a, pos in await cur2.fetchall()}
    return BatchFacts(
        now=now,
        rows={r.identity: RowFacts(r.key, r.lane_seq, r.ack_code) for r in rows},
        places=places,
        positions=positions,
    )


async def _readable(
    conn: psycopg.AsyncConnection[Any], claimed: Sequence[dict[str, Any]], now: datetime
) -> list[OutboxRow]:
    """Rows as notices; a row that is not one (an unknown channel, a malformed fallback)
    is closed as failed with the reason and counted, so it cannot stall the outbox."""
    rows: list[OutboxRow] = []
    for r in claimed:
        try:
            rows.append(row_from_db(r))
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"unreadable row: {type(exc).__name__}: {exc}"
            log.error("notification %s closed: %s", r.get("key"), reason)
            metrics.NOTIFY_DROPPED.labels("unreadable").inc()
            await conn.execute(UNREADABLE, (reason[:500], now, r["id"]))
    return rows


def stages_for(rows: Sequence[OutboxRow], channels: Mapping[Channel, NotifierChannel],
               timings: Timings) -> tuple[Stage, ...]:
    # Escalate ran in the engine's transaction (the notices are the outbox rows).
    return (
        Dedup(ledger_of(rows)),
        Mute(timings.silences),
        Group(),
        Notify(channels),
        Retry(schedules=timings.schedules, default=timings.default, fallback=timings.fallback),
    )


async def deliver_due(
    conn: psycopg.AsyncConnection[Any],
    now: datetime,
    notifiers: Notifiers,
    timings: Timings = Timings(),
    limit: int = 20,
    worker: str = "notifier",
) -> PassOutcome:
    """One pass: claim up to ``limit`` due notices, attempt them, record everything; one commit."""
    out = PassOutcome()
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(CLAIM, {"now": now, "limit": limit})
            claimed = await cur.fetchall()
        out.claimed = len(claimed)
        rows = await _readable(conn, claimed, now)
        if not rows:
            return out
        facts = await _facts(conn, rows, now)
        stages = stages_for(rows, notifiers.bind(facts), timings)
        result = await run_stages(stages, Batch(now, pending=tuple(r.notice for r in rows)))
        updates, audit, lost = settle(rows, result)
        for row in lost:
            log.error("notice %s went through no stage; looked at again later", row.key)
        # Chains are appended in alert order, so two runners never wait on each
        # other's chain heads crosswise.
        audit.sort(key=lambda e: str(e.alert_id))
        for attempt in range(3):
            tx = PgAlertTransaction(conn, worker)
            try:
                async with conn.transaction():  # a savepoint: a deadlock victim retries it
                    if updates:  # one round trip for the batch (executemany pipelines)
                        async with conn.cursor() as cur:
                            await cur.executemany(UPDATE, [u.params(now) for u in updates])
                    await tx.audit(audit)
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == 2:
                    raise
                log.info("notifier %s: deadlock on audit chain heads, recording again", worker)
    await _observe_time_to_deliver(conn, rows, result.deliveries, now)
    for d in result.deliveries:
        result_label = "delivered" if d.delivered else "failed"
        metrics.NOTIFY_ATTEMPTS.labels(d.notice.channel.value, result_label).inc()
        out.delivered += d.delivered
        out.failed += not d.delivered
    for dr in result.dropped:
        metrics.NOTIFY_DROPPED.labels(dr.stage).inc()
    out.dropped = len(result.dropped)
    out.alerts = {r.notice.alert_id for r in rows}
    return out


_FIRED = "SELECT step_id, fired_at FROM alert_steps WHERE step_id = ANY(%s)"


async def _observe_time_to_deliver(
    conn: psycopg.AsyncConnection[Any],
    rows: Sequence[OutboxRow],
    deliveries: Sequence[Delivery],
    now: datetime,
) -> None:
    """Time to deliver, per notice once: from its step's firing to its first delivery
    (the step's clock and ``now`` are both the engine's)."""
    before = {r.identity: r.delivered for r in rows}
    first: dict[tuple[str, str], str] = {}
    for d in deliveries:
        identity = (d.notice.step_id, d.notice.person_id)
        if d.delivered and before.get(identity) is False and identity not in first:
            first[identity] = d.notice.channel.value
    if not first:
        return
    try:
        cur = await conn.execute(_FIRED, (sorted({step for step, _ in first}),))
        fired: dict[str, datetime] = {step: at for step, at in await cur.fetchall()}
    except psycopg.Error as exc:  # a metric only: the deliveries are committed
        log.warning("time to deliver not observed: %s", exc)
        return
    for (step, _), channel in first.items():
        if step in fired:
            seconds = max(0.0, (now - fired[step]).total_seconds())
            metrics.NOTIFY_TIME_TO_DELIVER.labels(channel).observe(seconds)


class NotifierRunner:
    """The server's notifier: ``passes`` loops share the outbox with every other server."""

    def __init__(
        self,
        dsn: str,
        name: str,
        notifiers: Notifiers,
        timings: Timings = Timings(),
        clock: ClockSource = "system",
        poll_s: float = 1.0,
        batch: int = 20,
        passes: int = 2,
        stall_limit_s: float = 20.0,
    ) -> None:
        self.dsn = dsn
        # A pass holds its rows while the channels send: a server stopped longer than a
        # send's timeout and a stall loses them to the others (gateway/db/stall_guard.py).
        self.work_dsn = guarded(dsn, f"{name} notify", stall_limit_s)
        self.name = name
        self.notifiers = notifiers
        self.timings = timings
        self.clock = clock
        self.poll_s = poll_s
        self.batch = batch
        self.passes = passes

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._forever(i) for i in range(self.passes)))
        finally:
            await self.notifiers.http.aclose()

    async def _forever(self, index: int) -> None:
        worker = f"{self.name}/notify-{index}"
        # a bug must not stop the server's other loops: log, retry
        await run_forever(
            f"notifier {self.name}",
            lambda: self._loop(worker),
            log=log,
            transient=(
                psycopg.OperationalError,
                psycopg.errors.SerializationFailure,
                psycopg.errors.DeadlockDetected,
                OSError,
            ),
        )

    async def _loop(self, worker: str) -> None:
        async with (
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as listen,
            await psycopg.AsyncConnection.connect(self.work_dsn, autocommit=True) as work,
        ):
            await listen.execute("LISTEN notifications")
            while True:
                now = await engine_now(work, self.clock)
                out = await deliver_due(work, now, self.notifiers, self.timings, self.batch,
                                        worker)  # fmt: skip
                if out.claimed >= self.batch:
                    continue
                wait = await self._until_next(work, now)
                async for _ in listen.notifies(timeout=wait, stop_after=1):
                    pass

    async def _until_next(self, conn: psycopg.AsyncConnection[Any], now: datetime) -> float:
        if self.clock != "system":
            return self.poll_s  # a test's clock: the poll (and NOTIFY) wake the runner
        cur = await conn.execute(
            "SELECT min(not_before) FROM notifications WHERE status = 'pending'"
        )
        row = await cur.fetchone()
        if row is None or row[0] is None:
            return self.poll_s
        due: datetime = row[0]
        # At least 10 ms: due rows another server holds are not ours to spin on.
        return min(self.poll_s, max((due - now) / timedelta(seconds=1), 0.01))


def runner_from(settings: Settings) -> NotifierRunner:
    """The server's runner, from its settings (the webhook key is checked first)."""
    settings.check_notifier_secrets()
    token = settings.voice_provider_token
    notifiers = Notifiers(
        http.client(settings.notify_send_timeout_s),
        settings.bureau_webhook_secret.get_secret_value().encode(),
        settings.voice_provider_url,
        token.get_secret_value() if token else None,
        settings.notify_send_timeout_s,
    )
    default = RetrySchedule(tuple(timedelta(seconds=s) for s in settings.notify_retry_s))
    webhook = RetrySchedule(
        tuple(timedelta(seconds=s) for s in settings.notify_webhook_retry_s),
        max_attempts=settings.notify_webhook_max_attempts,
    )
    timings = Timings(schedules={Channel.WEBHOOK: webhook}, default=default)
    return NotifierRunner(
        settings.database_url, settings.mqtt_username, notifiers, timings,
        settings.engine_clock, settings.engine_poll_s, passes=settings.notify_passes,
        stall_limit_s=settings.notify_send_timeout_s + settings.engine_stalled_s,
    )  # fmt: skip
