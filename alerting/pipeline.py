"""The notification pipeline, shaped like Alertmanager's: stages with one signature.

``Batch → Batch`` (async, because the notify stage awaits its channels); the
order is escalate → dedup → mute → group → notify → retry (``default_stages``):

* ``Escalate`` turns due steps (planner) into notices, one per person, each on
  the person's first channel of the step, with the rest as its fallback;
* ``Dedup`` drops what was already delivered (idempotency key), what a person
  confirmed, and what the alert's progress made moot (acknowledged, on scene);
* ``Mute`` drops notices inside a maintenance silence — never for sos, fall,
  smoke or any critical alert;
* ``Group`` folds minor notices to one person and channel at one site into a
  single summary (storm control) — never critical or major ones;
* ``Notify`` calls the channel ports; each attempt becomes a ``Delivery``;
* ``Retry`` acts on each failure's ``recoverable`` flag: backoff on the same
  channel while it fits the channel's window, else the next channel; an
  unconfirmed delivery moves on to the next channel once the window passes
  (console → messaging → voice within 30 s, ``FallbackPolicy``).

Nothing is dropped in silence: every drop carries a reason, every attempt a
``Delivery``; the runner writes both to the audit log and the notifications
table. Deferred notices go back to the durable outbox with their ``not_before``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from alerting.model import (
    NEVER_HELD_BACK,
    STATUS_RANK,
    Alert,
    AlertStatus,
    AlertType,
    AuditAction,
    AuditEntry,
    Channel,
    DetailValue,
    Severity,
)
from alerting.planner import Step
from alerting.policy import Role
from alerting.ports import DeliveryError, NotifierChannel, Receipt

# --- what flows through ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recipient:
    """A person (or the bureau's endpoint) with an address per channel, in their order."""

    person_id: str
    role: Role
    targets: Mapping[Channel, str]  # console: staff id; messaging: Apprise URL; voice: phone
    order: tuple[Channel, ...] | None = None  # personal fallback order; None: the policy's


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """A due step with the alert it belongs to and the people its roles resolve to now."""

    alert: Alert
    step: Step
    recipients: Mapping[Role, tuple[Recipient, ...]]


@dataclass(frozen=True, slots=True)
class Notice:
    """One message to one person on one channel; ``key`` is its idempotency key."""

    alert_id: uuid.UUID
    alert_type: AlertType
    severity: Severity
    site_id: str
    step_id: str
    level: int
    person_id: str
    role: Role
    channel: Channel
    target: str
    text: str
    until: AlertStatus
    not_before: datetime
    channel_since: datetime  # when this channel's window began (fallback deadline)
    fallback: tuple[tuple[Channel, str], ...] = ()  # next channels and their targets
    attempt: int = 0  # attempts made on this channel
    members: tuple[str, ...] = ()  # keys of the notices a group summary stands for

    @property
    def key(self) -> str:
        return f"{self.step_id}/{self.person_id}/{self.channel.value}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """The result of one attempt: what the notifications table and audit log record."""

    notice: Notice
    at: datetime
    delivered: bool
    confirmed: bool = False
    error: str | None = None
    recoverable: bool = False
    reference: str | None = None  # the provider's message / call id

    def audit(self) -> AuditEntry:
        n = self.notice
        detail: dict[str, DetailValue] = {
            "step": n.step_id,
            "person": n.person_id,
            "role": n.role.value,
            "target": n.target,
            "attempt": n.attempt + 1,
            "confirmed": self.confirmed,
        }
        if self.error is not None:
            detail["error"] = self.error
            detail["recoverable"] = self.recoverable
        if self.reference is not None:
            detail["reference"] = self.reference
        if n.members:
            detail["members"] = len(n.members)
        action = AuditAction.NOTIFIED if self.delivered else AuditAction.DELIVERY_FAILED
        return AuditEntry(self.at, n.alert_id, "system:notifier", action, n.channel, detail)


@dataclass(frozen=True, slots=True)
class Dropped:
    notice: Notice
    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unstaffed:
    """A role of a step that reached nobody (no one on shift, no family contact on file):
    recorded, never silent, so the console and the audit show the gap."""

    alert_id: uuid.UUID
    step_id: str
    role: Role
    at: datetime

    def audit(self) -> AuditEntry:
        detail: dict[str, DetailValue] = {
            "step": self.step_id,
            "role": self.role.value,
            "note": "nobody reachable in this role",
        }
        return AuditEntry(self.at, self.alert_id, "system:notifier", AuditAction.NOTED,
                          Channel.SYSTEM, detail)


@dataclass(frozen=True, slots=True)
class Batch:
    now: datetime
    steps: tuple[PlannedStep, ...] = ()
    pending: tuple[Notice, ...] = ()  # to go through the remaining stages
    deferred: tuple[Notice, ...] = ()  # for later: back to the outbox with not_before
    deliveries: tuple[Delivery, ...] = ()
    dropped: tuple[Dropped, ...] = ()
    unstaffed: tuple[Unstaffed, ...] = ()


class Stage(Protocol):
    @property
    def name(self) -> str: ...

    async def __call__(self, batch: Batch) -> Batch: ...


async def run_stages(stages: Sequence[Stage], batch: Batch) -> Batch:
    for stage in stages:
        batch = await stage(batch)
    return batch


# --- policies as data -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Delays before attempt 2, 3, …; the last delay repeats up to ``max_attempts``."""

    delays: tuple[timedelta, ...] = (
        timedelta(seconds=2),
        timedelta(seconds=5),
        timedelta(seconds=10),
        timedelta(seconds=30),
        timedelta(minutes=2),
    )
    max_attempts: int = 6

    def delay(self, attempts_made: int) -> timedelta | None:
        if not self.delays or attempts_made >= self.max_attempts or attempts_made < 1:
            return None
        return self.delays[min(attempts_made, len(self.delays)) - 1]


# The bureau's webhook has no channel to fall back to: its durable outbox keeps
# trying for a day (the safety network may be down for maintenance).
WEBHOOK_RETRY = RetrySchedule(
    delays=(
        timedelta(seconds=1),
        timedelta(seconds=2),
        timedelta(seconds=5),
        timedelta(seconds=10),
        timedelta(seconds=30),
        timedelta(minutes=1),
    ),
    max_attempts=24 * 60,
)
RETRY_SCHEDULES: Mapping[Channel, RetrySchedule] = {Channel.WEBHOOK: WEBHOOK_RETRY}


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """Per person: channels in order, and how long one may take before the next is tried."""

    order: tuple[Channel, ...] = (
        Channel.CONSOLE,
        Channel.MESSAGING,
        Channel.VOICE,
        Channel.SMS,
        Channel.WEBHOOK,
    )
    switch_within: Mapping[Channel, timedelta] = field(
        default_factory=lambda: {
            Channel.CONSOLE: timedelta(seconds=15),
            Channel.MESSAGING: timedelta(seconds=30),
            Channel.VOICE: timedelta(seconds=30),
            Channel.SMS: timedelta(seconds=30),
            Channel.WEBHOOK: timedelta(minutes=10),  # last resort: retried, nothing to fall to
        }
    )

    def window(self, channel: Channel) -> timedelta:
        return self.switch_within.get(channel, timedelta(seconds=30))


# Chinese text, as the call would speak it and the message would read.
TEXTS: Mapping[AlertType, str] = {
    AlertType.SOS: "紧急呼叫：{site} 的老人按下了求助按钮，请立即处理。",
    AlertType.FALL: "跌倒报警：{site} 的老人可能跌倒，请立即处理。",
    AlertType.SMOKE: "火警：{site} 烟感报警，请立即处理。",
    AlertType.ELECTRICAL: "电气火灾预警：{site} 用电异常，请尽快处理。",
    AlertType.VITAL_SIGNS: "体征异常：{site} 的老人心率或血氧异常，请尽快处理。",
    AlertType.INACTIVITY: "无活动提醒：{site} 的老人长时间无活动，请上门探视。",
    AlertType.WANDERING: "走失预警：{site} 的老人离开了安全区域，请尽快处理。",
    AlertType.DEVICE_OFFLINE: "设备离线：{site} 有设备离线。",
    AlertType.LOW_BATTERY: "电量低：{site} 有设备电量不足。",
    AlertType.TAMPER: "设备异常：{site} 的设备被摘下或拆动。",
    AlertType.DEVICE_FAULT: "设备故障：{site} 有设备故障。",
}
REMINDER_PREFIX = "【提醒】"
ESCALATED_PREFIX = "【升级】"


def render(alert: Alert, step: Step) -> str:
    text = TEXTS[alert.type].format(site=alert.site_id)
    prefix = {"reminder": REMINDER_PREFIX, "service_circle": ESCALATED_PREFIX}
    return prefix.get(step.kind.value, ESCALATED_PREFIX if step.level > 0 else "") + text


# --- the stages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Escalate:
    fallback: FallbackPolicy = FallbackPolicy()
    name: str = "escalate"

    async def __call__(self, batch: Batch) -> Batch:
        notices: list[Notice] = []
        unstaffed: list[Unstaffed] = []
        for planned in batch.steps:
            out = self.expand(planned, batch.now)
            notices += out
            reached = {n.role for n in out}
            unstaffed += [
                Unstaffed(planned.alert.id, planned.step.key.id, role, batch.now)
                for role in planned.step.roles
                if role not in reached and not self._covered(planned, role, out)
            ]
        return dataclasses.replace(
            batch,
            steps=(),
            pending=(*batch.pending, *notices),
            unstaffed=(*batch.unstaffed, *unstaffed),
        )

    @staticmethod
    def _covered(planned: PlannedStep, role: Role, out: list[Notice]) -> bool:
        """A role whose people were all reached under another role of the step."""
        people = {p.person_id for p in planned.recipients.get(role, ())}
        return bool(people) and people <= {n.person_id for n in out}

    def expand(self, planned: PlannedStep, now: datetime) -> list[Notice]:
        alert, step = planned.alert, planned.step
        out: list[Notice] = []
        seen: set[str] = set()
        for role in step.roles:
            for person in planned.recipients.get(role, ()):
                if person.person_id in seen:  # one person in two roles: one notice
                    continue
                order = person.order or self.fallback.order
                routes = [
                    (c, person.targets[c])
                    for c in order
                    if c in step.channels and c in person.targets
                ]
                if not routes:
                    continue
                seen.add(person.person_id)
                (channel, target), rest = routes[0], tuple(routes[1:])
                out.append(
                    Notice(
                        alert_id=alert.id,
                        alert_type=alert.type,
                        severity=alert.severity,
                        site_id=alert.site_id,
                        step_id=step.key.id,
                        level=step.level,
                        person_id=person.person_id,
                        role=role,
                        channel=channel,
                        target=target,
                        text=render(alert, step),
                        until=step.until,
                        not_before=now,
                        channel_since=now,
                        fallback=rest,
                    )
                )
        return out


@dataclass(frozen=True, slots=True)
class DeliveryLedger:
    """What the store knows when the batch runs (read in the claiming transaction)."""

    delivered: frozenset[str] = frozenset()  # Notice.key of successful attempts
    confirmed: frozenset[tuple[str, str]] = frozenset()  # (step_id, person_id)
    status: Mapping[uuid.UUID, AlertStatus] = field(default_factory=dict)


def _split(batch: Batch, stage: str, verdicts: list[tuple[Notice, str | None]]) -> Batch:
    """Keep the notices without a reason, drop the others with theirs."""
    keep = tuple(n for n, why in verdicts if why is None)
    dropped = tuple(Dropped(n, stage, why) for n, why in verdicts if why is not None)
    return dataclasses.replace(batch, pending=keep, dropped=(*batch.dropped, *dropped))


@dataclass(frozen=True, slots=True)
class Dedup:
    ledger: DeliveryLedger
    name: str = "dedup"

    async def __call__(self, batch: Batch) -> Batch:
        seen: set[str] = set()
        verdicts: list[tuple[Notice, str | None]] = []
        for n in batch.pending:
            verdicts.append((n, self.reason(n, seen)))
            seen.add(n.key)
        return _split(batch, self.name, verdicts)

    def reason(self, n: Notice, seen: set[str]) -> str | None:
        status = self.ledger.status.get(n.alert_id)
        if n.key in self.ledger.delivered or n.key in seen:
            return "already delivered"
        if (n.step_id, n.person_id) in self.ledger.confirmed:
            return "the person confirmed this step"
        if status is not None and STATUS_RANK[status] >= STATUS_RANK[n.until]:
            return f"alert is {status.value}"
        return None


@dataclass(frozen=True, slots=True)
class Silence:
    """A maintenance window for a site (e.g. detectors being replaced)."""

    site_id: str
    types: frozenset[AlertType]
    starts: datetime
    ends: datetime
    reason: str


def mutable(notice: Notice) -> bool:
    return notice.alert_type not in NEVER_HELD_BACK and notice.severity is not Severity.CRITICAL


@dataclass(frozen=True, slots=True)
class Mute:
    silences: tuple[Silence, ...] = ()
    name: str = "mute"

    async def __call__(self, batch: Batch) -> Batch:
        return _split(batch, self.name, [(n, self.reason(n, batch.now)) for n in batch.pending])

    def reason(self, n: Notice, now: datetime) -> str | None:
        if not mutable(n):
            return None
        for s in self.silences:
            if s.site_id == n.site_id and n.alert_type in s.types and s.starts <= now < s.ends:
                return f"silenced: {s.reason}"
        return None


@dataclass(frozen=True, slots=True)
class Group:
    """Storm control for minor notices: one summary per (person, channel, site)."""

    name: str = "group"

    async def __call__(self, batch: Batch) -> Batch:
        groups: dict[tuple[str, Channel, str], list[Notice]] = defaultdict(list)
        out: list[Notice] = []
        for n in batch.pending:
            ready = n.not_before <= batch.now
            if ready and n.severity is Severity.MINOR and n.alert_type not in NEVER_HELD_BACK:
                groups[(n.person_id, n.channel, n.site_id)].append(n)
            else:
                out.append(n)
        for members in groups.values():
            if len(members) == 1:
                out.append(members[0])
                continue
            first = members[0]
            kinds = sorted({m.alert_type.value for m in members})
            text = f"{first.site_id}：{len(members)} 条设备提醒（{'、'.join(kinds)}）。"
            out.append(
                dataclasses.replace(
                    first,
                    text=text,
                    members=tuple(m.key for m in members),
                )
            )
        return dataclasses.replace(batch, pending=tuple(out))


@dataclass(frozen=True, slots=True)
class Notify:
    channels: Mapping[Channel, NotifierChannel]
    name: str = "notify"

    async def __call__(self, batch: Batch) -> Batch:
        ready = [n for n in batch.pending if n.not_before <= batch.now]
        later = [n for n in batch.pending if n.not_before > batch.now]
        # In order per (alert, channel, target) — a webhook receiver sees an alert's
        # changes in order — and concurrently across them, so one slow call holds up
        # no other person's notice.
        lanes: dict[tuple[uuid.UUID, Channel, str], list[int]] = defaultdict(list)
        for i, n in enumerate(ready):
            lanes[(n.alert_id, n.channel, n.target)].append(i)
        results: dict[int, Delivery] = {}

        async def run_lane(indices: list[int]) -> None:
            for i in indices:
                results[i] = await self._attempt(ready[i], batch.now)

        await asyncio.gather(*(run_lane(ix) for ix in lanes.values()))
        deliveries = [results[i] for i in range(len(ready))]
        return dataclasses.replace(
            batch,
            pending=(),
            deferred=(*batch.deferred, *later),
            deliveries=(*batch.deliveries, *deliveries),
        )

    async def _attempt(self, notice: Notice, now: datetime) -> Delivery:
        channel = self.channels.get(notice.channel)
        if channel is None:
            return Delivery(notice, now, False, error="no notifier for this channel")
        try:
            receipt: Receipt = await channel.send(notice)
        except DeliveryError as exc:
            return Delivery(notice, now, False, error=str(exc), recoverable=exc.recoverable)
        except Exception as exc:  # a notifier bug must not lose the notice: retry, then fall back
            return Delivery(
                notice, now, False, error=f"{type(exc).__name__}: {exc}", recoverable=True
            )
        return Delivery(notice, now, True, receipt.confirmed, reference=receipt.reference)


@dataclass(frozen=True, slots=True)
class Retry:
    """Acts on each delivery: done, same channel again after a backoff, or the next channel."""

    schedules: Mapping[Channel, RetrySchedule] = field(default_factory=lambda: RETRY_SCHEDULES)
    default: RetrySchedule = RetrySchedule()
    fallback: FallbackPolicy = FallbackPolicy()
    name: str = "retry"

    async def __call__(self, batch: Batch) -> Batch:
        follow: list[Notice] = []
        dropped: list[Dropped] = []
        for d in batch.deliveries:
            nxt, why = self.follow_up(d)
            if nxt is not None:
                follow.append(nxt)
            elif why:
                dropped.append(Dropped(d.notice, self.name, why))
        return dataclasses.replace(
            batch,
            deferred=(*batch.deferred, *follow),
            dropped=(*batch.dropped, *dropped),
        )

    def follow_up(self, d: Delivery) -> tuple[Notice | None, str]:
        n = d.notice
        deadline = n.channel_since + self.fallback.window(n.channel)
        if d.delivered and d.confirmed:
            return None, ""
        if d.delivered:
            # Delivered but unconfirmed: the next channel once this one's window is over;
            # Dedup drops it if the person confirms or the alert moves on meanwhile.
            return self._next_channel(n, max(deadline, d.at)), ""
        attempts = n.attempt + 1
        schedule = self.schedules.get(n.channel, self.default)
        delay = schedule.delay(attempts) if d.recoverable else None
        if delay is not None and (d.at + delay <= deadline or not n.fallback):
            again = dataclasses.replace(n, attempt=attempts, not_before=d.at + delay)
            return again, ""
        if n.fallback:
            return self._next_channel(n, d.at), ""
        reason = "unrecoverable" if not d.recoverable else "retries exhausted"
        return None, f"{reason} on the last channel: {d.error}"

    @staticmethod
    def _next_channel(n: Notice, at: datetime) -> Notice | None:
        if not n.fallback:
            return None
        (channel, target), rest = n.fallback[0], n.fallback[1:]
        return dataclasses.replace(
            n,
            channel=channel,
            target=target,
            fallback=rest,
            attempt=0,
            not_before=at,
            channel_since=at,
        )


def default_stages(
    ledger: DeliveryLedger,
    channels: Mapping[Channel, NotifierChannel],
    silences: tuple[Silence, ...] = (),
    fallback: FallbackPolicy = FallbackPolicy(),
) -> tuple[Stage, ...]:
    return (
        Escalate(fallback),
        Dedup(ledger),
        Mute(silences),
        Group(),
        Notify(channels),
        Retry(fallback=fallback),
    )
