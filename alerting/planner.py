"""The escalation planner: which steps of a policy are due for an alert, and when the next one is.

A step is identified by ``StepKey`` (alert, epoch, kind, level, n): the store
records each fired key once (a unique row), so a step fires exactly once
however many servers claim the timer, and a restart resumes where it left.
The durable timer is one column, ``alerts.next_step_at`` = ``next_step_at()``;
whoever claims a due alert (``FOR UPDATE SKIP LOCKED``) calls ``due_steps()``,
fires them in order, records their keys and writes the new ``next_step_at``.

The schedule is a pure function of the alert's facts (ladder start,
acknowledged / on scene / resolved times) and the policy, so late timers
catch up: every step whose time has come and that the facts still want fires,
none is skipped, none twice (tests/unit/test_alerting_planner.py checks this
over arbitrary tick sequences with hypothesis).
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Container, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from alerting.lifecycle import Command, CommandKind, IllegalTransition, Transition
from alerting.model import (
    STATUS_RANK,
    Alert,
    AlertStatus,
    AuditAction,
    AuditEntry,
    Channel,
    DetailValue,
    require_aware,
)
from alerting.policy import EscalationPolicy, Level, Role


class StepKind(StrEnum):
    LEVEL = "level"  # a rung of the ladder
    REPEAT = "repeat"  # the top rung again while nobody acknowledges
    REMINDER = "reminder"  # acknowledged, still unresolved
    SERVICE_CIRCLE = "service_circle"  # acknowledged, nobody on scene in time: one rung up


KIND_ORDER = {k: i for i, k in enumerate(StepKind)}


@dataclass(frozen=True, slots=True, order=True)
class StepKey:
    alert_id: uuid.UUID
    epoch: int
    kind: StepKind
    level: int
    n: int = 0

    @property
    def id(self) -> str:
        """The idempotency key stored with the step and its notices."""
        return f"{self.alert_id}/{self.epoch}/{self.kind.value}/{self.level}/{self.n}"


@dataclass(frozen=True, slots=True)
class Step:
    key: StepKey
    at: datetime
    roles: tuple[Role, ...]
    channels: tuple[Channel, ...]
    until: AlertStatus  # its notices are moot once the alert reaches this status

    @property
    def kind(self) -> StepKind:
        return self.key.kind

    @property
    def level(self) -> int:
        return self.key.level

    def sort_key(self) -> tuple[datetime, int, int, int]:
        return (self.at, KIND_ORDER[self.key.kind], self.key.level, self.key.n)


def ladder_stopped_at(alert: Alert, policy: EscalationPolicy) -> datetime | None:
    """When the alert first reached the status that stops the ladder, if it has."""
    facts = (
        (AlertStatus.ACKNOWLEDGED, alert.acknowledged_at),
        (AlertStatus.ON_SCENE, alert.on_scene_at),
        (AlertStatus.RESOLVED, alert.resolved_at),
    )
    rank = STATUS_RANK[policy.ladder_until]
    times = [t for status, t in facts if t is not None and STATUS_RANK[status] >= rank]
    return min(times) if times else None


def _before(at: datetime, stop: datetime | None) -> bool:
    return stop is None or at < stop


def _level_steps(alert: Alert, policy: EscalationPolicy) -> Iterator[Step]:
    stop = ladder_stopped_at(alert, policy)
    for i, lv in enumerate(policy.levels):
        at = alert.escalation_anchor + lv.after
        # The first rung always goes out: an alert is never silently born acknowledged.
        if i > 0 and not _before(at, stop):
            return
        key = StepKey(alert.id, alert.epoch, StepKind.LEVEL, i)
        yield Step(key, at, lv.roles, lv.channels, policy.ladder_until)


def _repeat_steps(alert: Alert, policy: EscalationPolicy) -> Iterator[Step]:
    every = policy.repeat_top_every
    if every is None:
        return
    stop = ladder_stopped_at(alert, policy)
    top = len(policy.levels) - 1
    last = policy.levels[top]
    for n in itertools.count(1):
        at = alert.escalation_anchor + last.after + n * every
        if not _before(at, stop):
            return
        key = StepKey(alert.id, alert.epoch, StepKind.REPEAT, top, n)
        yield Step(key, at, last.roles, last.channels, policy.ladder_until)


def _reminder_steps(alert: Alert, policy: EscalationPolicy) -> Iterator[Step]:
    every, acked = policy.remind_every, alert.acknowledged_at
    if every is None or acked is None:
        return
    for n in itertools.count(1):
        at = acked + n * every
        if not _before(at, alert.resolved_at):
            return
        # Level 0 in the key: the alert's level may rise (service circle), the key must not move.
        key = StepKey(alert.id, alert.epoch, StepKind.REMINDER, 0, n)
        yield Step(key, at, policy.remind_roles, policy.remind_channels, AlertStatus.RESOLVED)


def reached_level(alert: Alert, policy: EscalationPolicy, by: datetime) -> int:
    """The highest rung the ladder had reached at ``by`` (it stops when the ladder stops)."""
    stop = ladder_stopped_at(alert, policy)
    reached = [
        i
        for i, lv in enumerate(policy.levels)
        if i == 0
        or (
            alert.escalation_anchor + lv.after <= by
            and _before(alert.escalation_anchor + lv.after, stop)
        )
    ]
    return max(reached)


def _service_circle_steps(alert: Alert, policy: EscalationPolicy) -> Iterator[Step]:
    within, acked = policy.on_scene_within, alert.acknowledged_at
    if within is None or acked is None:
        return
    at = acked + within
    if not (_before(at, alert.on_scene_at) and _before(at, alert.resolved_at)):
        return
    target = min(reached_level(alert, policy, at) + 1, len(policy.levels) - 1)
    lv: Level = policy.levels[target]
    key = StepKey(alert.id, alert.epoch, StepKind.SERVICE_CIRCLE, target)
    yield Step(key, at, lv.roles, lv.channels, AlertStatus.ON_SCENE)


_FAMILIES = (_level_steps, _repeat_steps, _reminder_steps, _service_circle_steps)


def due_steps(
    alert: Alert, policy: EscalationPolicy, fired: Container[StepKey], now: datetime
) -> tuple[Step, ...]:
    """Steps whose time has come, that the facts still want and that have not fired, in order."""
    require_aware(now, "now")
    out: list[Step] = []
    for family in _FAMILIES:
        for step in family(alert, policy):
            if step.at > now:
                break
            if step.key not in fired:
                out.append(step)
    return tuple(sorted(out, key=Step.sort_key))


def next_step(
    alert: Alert, policy: EscalationPolicy, fired: Container[StepKey], now: datetime
) -> Step | None:
    """The earliest unfired wanted step — due already (a late timer) or the next to come —
    as the console's countdown shows it: when, which level, whom by role, which channels."""
    due = due_steps(alert, policy, fired, now)
    if due:
        return due[0]
    upcoming = [
        step
        for family in _FAMILIES
        for step in itertools.islice(
            itertools.dropwhile(lambda s: s.at <= now, family(alert, policy)), 1
        )
    ]
    return min(upcoming, key=Step.sort_key) if upcoming else None


def next_step_at(
    alert: Alert, policy: EscalationPolicy, fired: Container[StepKey], now: datetime
) -> datetime | None:
    """What the durable timer row holds (None: nothing left to fire)."""
    step = next_step(alert, policy, fired, now)
    return step.at if step else None


_STEP_ACTION = {
    StepKind.LEVEL: AuditAction.ESCALATED,
    StepKind.REPEAT: AuditAction.ESCALATED,
    StepKind.SERVICE_CIRCLE: AuditAction.ESCALATED,
    StepKind.REMINDER: AuditAction.REMINDED,
}


def fire_step(alert: Alert, step: Step, at: datetime) -> Transition:
    """Record a fired step on the alert (its level) with its audit entry."""
    require_aware(at, "fire time")
    after = dataclasses.replace(alert, level=max(alert.level, step.level))
    detail: dict[str, DetailValue] = {
        "step": step.key.id,
        "kind": step.kind.value,
        "level": step.level,
        "due": step.at.isoformat(),
        "lag_ms": int((at - step.at) / timedelta(milliseconds=1)),
        "roles": ",".join(r.value for r in step.roles),
        "channels": ",".join(c.value for c in step.channels),
    }
    action = _STEP_ACTION[step.kind]
    audit = AuditEntry(at, alert.id, "system:escalation", action, Channel.SYSTEM, detail)
    return Transition(alert, after, audit)


def escalate_by_hand(
    alert: Alert, policy: EscalationPolicy, actor: str, channel: Channel, reason: str
) -> Command:
    """Staff escalate an open alert now (the duty worker cannot go): the rung above the
    alert's level fires at once, with its own step key, and the rungs after it keep their
    spacing from there. IllegalTransition at the top rung."""
    target = alert.level + 1
    if target >= len(policy.levels):
        raise IllegalTransition(
            alert, CommandKind.ESCALATE, f"level {alert.level} is the top of policy {policy.name}"
        )
    return Command(
        CommandKind.ESCALATE, actor, channel, note=reason, level=target,
        after=policy.levels[target].after,
    )  # fmt: skip
