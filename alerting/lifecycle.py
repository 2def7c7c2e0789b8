"""The alert lifecycle as one pure function: open → acknowledged → on_scene → resolved, reopen.

``transition(alert, command, at)`` returns the new alert and the audit entry
that records who did it, when and through which channel; an illegal command
raises ``IllegalTransition`` naming the alert, its status and what is allowed.
The legal moves are a table (``TRANSITIONS``), not a chain of ifs, so the
console, the API and the tests can ask it what a button may do.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from alerting.model import (
    SEVERITY_RANK,
    Alert,
    AlertStatus,
    AlertType,
    AuditAction,
    AuditEntry,
    Channel,
    DetailValue,
    Outcome,
    Severity,
    require_aware,
)

_O, _A, _S, _R = (
    AlertStatus.OPEN,
    AlertStatus.ACKNOWLEDGED,
    AlertStatus.ON_SCENE,
    AlertStatus.RESOLVED,
)
_UNRESOLVED = (_O, _A, _S)


class CommandKind(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    ON_SCENE = "on_scene"
    RESOLVE = "resolve"
    REOPEN = "reopen"
    REPEAT = "repeat"  # the same condition reported again
    ADD_SOURCE = "add_source"  # another contributor of the same condition
    CLEAR_SOURCE = "clear_source"  # one contributor's condition ended
    RAISE_SEVERITY = "raise_severity"
    NOTE = "note"  # record without a change
    ESCALATE = "escalate"  # staff call the next rung now (alerting.planner.escalate_by_hand)


# from-status → to-status for each command; a status not listed is illegal.
TRANSITIONS: Mapping[CommandKind, Mapping[AlertStatus, AlertStatus]] = {
    CommandKind.ACKNOWLEDGE: {_O: _A},
    # Arriving without a prior acknowledgement is allowed: being there is more than acking.
    CommandKind.ON_SCENE: {_O: _S, _A: _S},
    CommandKind.RESOLVE: {_O: _R, _A: _R, _S: _R},
    CommandKind.REOPEN: {_R: _O},
    CommandKind.REPEAT: {s: s for s in _UNRESOLVED},
    CommandKind.ADD_SOURCE: {s: s for s in _UNRESOLVED},
    CommandKind.CLEAR_SOURCE: {s: s for s in _UNRESOLVED},
    # A worse condition restarts the ladder unless someone is already there.
    CommandKind.RAISE_SEVERITY: {_O: _O, _A: _O, _S: _S},
    CommandKind.NOTE: {s: s for s in AlertStatus},
    # Only a running ladder has a next rung; once acknowledged the service circle takes over.
    CommandKind.ESCALATE: {_O: _O},
}

AUDIT_ACTION: Mapping[CommandKind, AuditAction] = {
    CommandKind.ACKNOWLEDGE: AuditAction.ACKNOWLEDGED,
    CommandKind.ON_SCENE: AuditAction.ON_SCENE,
    CommandKind.RESOLVE: AuditAction.RESOLVED,
    CommandKind.REOPEN: AuditAction.REOPENED,
    CommandKind.REPEAT: AuditAction.REPEATED,
    CommandKind.ADD_SOURCE: AuditAction.SOURCE_ADDED,
    CommandKind.CLEAR_SOURCE: AuditAction.SOURCE_CLEARED,
    CommandKind.RAISE_SEVERITY: AuditAction.SEVERITY_RAISED,
    CommandKind.NOTE: AuditAction.NOTED,
    CommandKind.ESCALATE: AuditAction.ESCALATED,
}


class IllegalTransition(ValueError):
    """A command the alert's current status does not allow (a stale click, a double ack)."""

    def __init__(self, alert: Alert, kind: CommandKind, reason: str) -> None:
        allowed = sorted(s.value for s in TRANSITIONS[kind])
        super().__init__(
            f"cannot {kind.value} alert {alert.id} ({alert.type.value}, status "
            f"{alert.status.value}): {reason}; {kind.value} is allowed from {allowed}"
        )
        self.alert_id = alert.id
        self.status = alert.status
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Command:
    """What someone (or the engine) does to an alert.

    ``outcome`` is needed by RESOLVE; ``severity`` by RAISE_SEVERITY; ``source``
    by ADD_SOURCE/CLEAR_SOURCE; ``event_id`` ties a device-driven change to
    its event; ``level`` and ``after`` (the rung and its delay from the ladder's
    start) by ESCALATE.
    """

    kind: CommandKind
    actor: str
    channel: Channel
    outcome: Outcome | None = None
    severity: Severity | None = None
    source: str | None = None
    event_id: uuid.UUID | None = None
    note: str = ""
    level: int | None = None
    after: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    before: Alert
    after: Alert
    audit: AuditEntry


def acknowledge(actor: str, channel: Channel) -> Command:
    return Command(CommandKind.ACKNOWLEDGE, actor, channel)


def on_scene(actor: str, channel: Channel) -> Command:
    return Command(CommandKind.ON_SCENE, actor, channel)


def resolve(actor: str, channel: Channel, outcome: Outcome, note: str = "") -> Command:
    return Command(CommandKind.RESOLVE, actor, channel, outcome=outcome, note=note)


def reopen(actor: str, channel: Channel, note: str = "") -> Command:
    return Command(CommandKind.REOPEN, actor, channel, note=note)


def _acknowledge(alert: Alert, c: Command, at: datetime) -> Alert:
    return dataclasses.replace(
        alert, status=_A, acknowledged_at=at, acknowledged_by=c.actor
    )


def _on_scene(alert: Alert, c: Command, at: datetime) -> Alert:
    return dataclasses.replace(
        alert,
        status=_S,
        on_scene_at=at,
        on_scene_by=c.actor,
        acknowledged_at=alert.acknowledged_at or at,
        acknowledged_by=alert.acknowledged_by or c.actor,
    )


def _resolve(alert: Alert, c: Command, at: datetime) -> Alert:
    if c.outcome is None:
        raise IllegalTransition(alert, c.kind, "resolving needs an outcome")
    return dataclasses.replace(
        alert, status=_R, outcome=c.outcome, resolved_at=at, resolved_by=c.actor
    )


def _reopen(alert: Alert, c: Command, at: datetime) -> Alert:
    # The ladder starts again from level 0 under a new epoch: new step ids.
    return dataclasses.replace(
        alert,
        status=_O,
        outcome=None,
        resolved_at=None,
        resolved_by=None,
        acknowledged_at=None,
        acknowledged_by=None,
        on_scene_at=None,
        on_scene_by=None,
        level=0,
        epoch=alert.epoch + 1,
        escalation_anchor=at,
    )


def _repeat(alert: Alert, c: Command, at: datetime) -> Alert:
    return dataclasses.replace(
        alert,
        count=alert.count + 1,
        last_seen_at=max(alert.last_seen_at, at),
        last_event_id=c.event_id or alert.last_event_id,
    )


def _add_source(alert: Alert, c: Command, at: datetime) -> Alert:
    if c.source is None:
        raise IllegalTransition(alert, c.kind, "no source given")
    return dataclasses.replace(
        _repeat(alert, c, at), sources=alert.sources | {c.source}, condition_cleared_at=None
    )


def _clear_source(alert: Alert, c: Command, at: datetime) -> Alert:
    if c.source is None:
        raise IllegalTransition(alert, c.kind, "no source given")
    remaining = alert.sources - {c.source}
    return dataclasses.replace(
        alert,
        sources=remaining,
        last_event_id=c.event_id or alert.last_event_id,
        condition_cleared_at=at if not remaining else None,
    )


def _raise_severity(alert: Alert, c: Command, at: datetime) -> Alert:
    if c.severity is None or SEVERITY_RANK[c.severity] <= SEVERITY_RANK[alert.severity]:
        raise IllegalTransition(
            alert, c.kind, f"{c.severity} is not above {alert.severity.value}"
        )
    restart = alert.status is not _S
    return dataclasses.replace(
        alert,
        severity=c.severity,
        status=TRANSITIONS[c.kind][alert.status],
        epoch=alert.epoch + 1 if restart else alert.epoch,
        escalation_anchor=at if restart else alert.escalation_anchor,
        level=0 if restart else alert.level,
        acknowledged_at=None if restart else alert.acknowledged_at,
        acknowledged_by=None if restart else alert.acknowledged_by,
        last_seen_at=max(alert.last_seen_at, at),
        last_event_id=c.event_id or alert.last_event_id,
    )


def _note(alert: Alert, c: Command, at: datetime) -> Alert:
    return alert


def _escalate(alert: Alert, c: Command, at: datetime) -> Alert:
    # The schedule is anchor + rung delay: moving the anchor back makes rung ``level`` due
    # now, so the planner fires it (one step key: once) and the ladder goes on from there.
    if c.level is None or c.after is None or c.level <= alert.level:
        raise IllegalTransition(alert, c.kind, f"no rung above level {alert.level} given")
    return dataclasses.replace(alert, escalation_anchor=min(alert.escalation_anchor, at - c.after))


_APPLY: Mapping[CommandKind, Callable[[Alert, Command, datetime], Alert]] = {
    CommandKind.ACKNOWLEDGE: _acknowledge,
    CommandKind.ON_SCENE: _on_scene,
    CommandKind.RESOLVE: _resolve,
    CommandKind.REOPEN: _reopen,
    CommandKind.REPEAT: _repeat,
    CommandKind.ADD_SOURCE: _add_source,
    CommandKind.CLEAR_SOURCE: _clear_source,
    CommandKind.RAISE_SEVERITY: _raise_severity,
    CommandKind.NOTE: _note,
    CommandKind.ESCALATE: _escalate,
}


def transition(alert: Alert, command: Command, at: datetime) -> Transition:
    """Apply ``command`` at ``at``; the audit entry says who, when, through which channel."""
    require_aware(at, "transition time")
    if alert.status not in TRANSITIONS[command.kind]:
        raise IllegalTransition(alert, command.kind, "not from this status")
    after = _APPLY[command.kind](alert, command, at)
    detail: dict[str, DetailValue] = {"from": alert.status.value, "to": after.status.value}
    if command.outcome is not None:
        detail["outcome"] = command.outcome.value
    if command.severity is not None:
        detail["severity"] = command.severity.value
    if command.source is not None:
        detail["source"] = command.source
    if command.event_id is not None:
        detail["event_id"] = str(command.event_id)
    if command.note:
        detail["note"] = command.note
    if command.level is not None:
        detail["level"] = command.level
    if after.epoch != alert.epoch:
        detail["epoch"] = after.epoch
    audit = AuditEntry(
        time=at,
        alert_id=alert.id,
        actor=command.actor,
        action=AUDIT_ACTION[command.kind],
        channel=command.channel,
        detail=detail,
    )
    return Transition(alert, after, audit)


def new_alert(
    *,
    alert_id: uuid.UUID,
    site_id: str,
    device_id: str | None,
    alert_type: AlertType,
    severity: Severity,
    dedup_key: str,
    at: datetime,
    actor: str,
    channel: Channel,
    source: str | None = None,
    event_id: uuid.UUID | None = None,
) -> Transition:
    """Open an alert; its 'before' is the same value (there was none)."""
    require_aware(at, "opening time")
    alert = Alert(
        id=alert_id,
        site_id=site_id,
        device_id=device_id,
        type=alert_type,
        severity=severity,
        status=_O,
        dedup_key=dedup_key,
        opened_at=at,
        last_seen_at=at,
        escalation_anchor=at,
        sources=frozenset({source}) if source else frozenset(),
        first_event_id=event_id,
        last_event_id=event_id,
    )
    detail: dict[str, DetailValue] = {
        "type": alert_type.value,
        "severity": severity.value,
        "dedup_key": dedup_key,
        "site_id": site_id,
        "device_id": device_id,
    }
    if event_id is not None:
        detail["event_id"] = str(event_id)
    if source is not None:
        detail["source"] = source
    audit = AuditEntry(at, alert_id, actor, AuditAction.OPENED, channel, detail)
    return Transition(alert, alert, audit)
