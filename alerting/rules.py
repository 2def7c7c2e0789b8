"""Rules as data: device events and server-side conditions → alert state changes.

Two inputs reach the engine: an ``EngineEvent`` (a committed MQTT event; the
enums mirror the contract's event types and phases so that ``alerting`` does
not import the gateway) and a ``ConditionSignal`` (a server-side condition:
a telemetry threshold, a vital-sign duration, inactivity — see
``alerting.conditions``). Both go through the same two steps, which is what the
store implements around a transaction:

1. ``dedup_keys(...)`` — the keys of the alerts this input may touch; the store
   locks the unresolved alerts with those keys (``FOR UPDATE``);
2. ``decide(...)`` / ``decide_signal(...)`` — given those alerts, the
   transitions to write (each with its audit entry), or the reason the input
   changes nothing (never silence: the reason is recorded by the caller).

Dedup: one unresolved alert per key (schema v1 ``alerts_open_dedup``). Keys
are ``type:site[:device][:condition]``: smoke is keyed by site (one fire
incident however many detectors), device_offline too (storm control: a site
losing its 20 devices is one alert with 20 sources, not 21). Neither delays
anything: a first sos, fall or smoke opens its alert at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from alerting.lifecycle import Command, CommandKind, Transition, new_alert, transition
from alerting.model import (
    SEVERITY_RANK,
    Alert,
    AlertStatus,
    AlertType,
    Channel,
    Outcome,
    Severity,
    device_actor,
    require_aware,
)

Scalar = str | int | float | bool


class EventKind(StrEnum):
    """The MQTT contract's event types (``eldersafe/v1/{site}/{device}/event``)."""

    SOS = "sos"
    FALL = "fall"
    CANCEL = "cancel"
    REMOVED = "removed"
    GEOFENCE_EXIT = "geofence_exit"
    SUPERVISION = "supervision"
    TEST = "test"
    SMOKE = "smoke"
    RESIDUAL_CURRENT = "residual_current"
    CABLE_TEMPERATURE = "cable_temperature"
    OVER_CURRENT = "over_current"
    DEVICE_FAULT = "device_fault"
    LOW_BATTERY = "low_battery"
    TAMPER = "tamper"
    DEVICE_OFFLINE = "device_offline"


class Phase(StrEnum):
    PULSE = "pulse"  # a press: raises, never clears
    RAISE = "raise"  # a level condition became active
    CLEAR = "clear"  # a level condition ended


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """A device event that ingest made durable (one per stable ``event_id``)."""

    event_id: uuid.UUID
    site_id: str
    device_id: str
    kind: EventKind
    phase: Phase
    time: datetime
    profile: str = ""
    data: Mapping[str, Scalar] = field(default_factory=dict)


class Effect(StrEnum):
    RAISE = "raise"  # open the condition's alert, or count a repeat
    CLEAR = "clear"  # one contributor of the condition ended
    CANCEL = "cancel"  # the resident cancels their own sos/fall
    IGNORE = "ignore"  # no alert state; the reason says why


class Scope(StrEnum):
    DEVICE = "device"  # one alert per device and condition
    SITE = "site"  # one alert per site and condition, devices are its sources


class ClearPolicy(StrEnum):
    AUTO = "auto"  # resolves as 'cleared' when its last source clears
    # Recorded (condition_cleared_at) but a person resolves: fire alarm control
    # panels latch a fire alarm until reset by hand (GB 4717), and a detector
    # that went quiet may be one the fire has destroyed.
    LATCH = "latch"
    NEVER = "never"  # sos, fall, wandering: only a person (or the resident's cancel) ends it


@dataclass(frozen=True, slots=True)
class AlertRule:
    """What one condition becomes: type, severity, dedup scope, how it ends."""

    alert_type: AlertType
    severity: Severity
    scope: Scope
    clear: ClearPolicy
    condition: str | None = None  # distinguishes conditions of one type on one device


@dataclass(frozen=True, slots=True)
class EventRule:
    """How one event type acts, per phase; ``condition`` names an ``AlertRule``."""

    condition: str | None
    effects: Mapping[Phase, Effect]
    reason: str = ""  # why IGNORE
    cancels: tuple[str, ...] = ()  # conditions a CANCEL ends


_E, _P = Effect, Phase
_LEVEL = {_P.PULSE: _E.RAISE, _P.RAISE: _E.RAISE, _P.CLEAR: _E.CLEAR}
_PRESS = {_P.PULSE: _E.RAISE, _P.RAISE: _E.RAISE, _P.CLEAR: _E.IGNORE}
_NONE = {_P.PULSE: _E.IGNORE, _P.RAISE: _E.IGNORE, _P.CLEAR: _E.IGNORE}
_T, _S = AlertType, Severity

ALERT_RULES: Mapping[str, AlertRule] = {
    "sos": AlertRule(_T.SOS, _S.CRITICAL, Scope.DEVICE, ClearPolicy.NEVER),
    "fall": AlertRule(_T.FALL, _S.CRITICAL, Scope.DEVICE, ClearPolicy.NEVER),
    "smoke": AlertRule(_T.SMOKE, _S.CRITICAL, Scope.SITE, ClearPolicy.LATCH),
    "geofence_exit": AlertRule(_T.WANDERING, _S.MAJOR, Scope.DEVICE, ClearPolicy.NEVER),
    "residual_current": AlertRule(
        _T.ELECTRICAL, _S.MAJOR, Scope.DEVICE, ClearPolicy.AUTO, "residual_current"
    ),
    "cable_temperature": AlertRule(
        _T.ELECTRICAL, _S.MAJOR, Scope.DEVICE, ClearPolicy.AUTO, "cable_temperature"
    ),
    "over_current": AlertRule(
        _T.ELECTRICAL, _S.MAJOR, Scope.DEVICE, ClearPolicy.AUTO, "over_current"
    ),
    "vital_signs": AlertRule(_T.VITAL_SIGNS, _S.MAJOR, Scope.DEVICE, ClearPolicy.AUTO),
    "inactivity": AlertRule(_T.INACTIVITY, _S.MAJOR, Scope.DEVICE, ClearPolicy.AUTO),
    "removed": AlertRule(_T.TAMPER, _S.MINOR, Scope.DEVICE, ClearPolicy.AUTO, "removed"),
    "tamper": AlertRule(_T.TAMPER, _S.MINOR, Scope.DEVICE, ClearPolicy.AUTO, "tamper"),
    "device_fault": AlertRule(_T.DEVICE_FAULT, _S.MINOR, Scope.DEVICE, ClearPolicy.AUTO),
    "low_battery": AlertRule(_T.LOW_BATTERY, _S.MINOR, Scope.DEVICE, ClearPolicy.AUTO),
    "device_offline": AlertRule(_T.DEVICE_OFFLINE, _S.MINOR, Scope.SITE, ClearPolicy.AUTO),
}

_K = EventKind
EVENT_RULES: Mapping[EventKind, EventRule] = {
    _K.SOS: EventRule("sos", _PRESS, "an sos never clears without a person"),
    _K.FALL: EventRule("fall", _PRESS, "a fall never clears without a person"),
    _K.CANCEL: EventRule(
        None,
        {_P.PULSE: _E.CANCEL, _P.RAISE: _E.CANCEL, _P.CLEAR: _E.IGNORE},
        "a cancel has no clear phase",
        cancels=("sos", "fall"),
    ),
    _K.REMOVED: EventRule("removed", _LEVEL),
    _K.GEOFENCE_EXIT: EventRule("geofence_exit", _PRESS, "wandering ends when a person says so"),
    _K.SUPERVISION: EventRule(None, _NONE, "supervision check-in: liveness is the edge's timer"),
    _K.TEST: EventRule(None, _NONE, "detector test button: recorded, no alarm"),
    _K.SMOKE: EventRule("smoke", _LEVEL),
    _K.RESIDUAL_CURRENT: EventRule("residual_current", _LEVEL),
    _K.CABLE_TEMPERATURE: EventRule("cable_temperature", _LEVEL),
    _K.OVER_CURRENT: EventRule("over_current", _LEVEL),
    _K.DEVICE_FAULT: EventRule("device_fault", _LEVEL),
    _K.LOW_BATTERY: EventRule("low_battery", _LEVEL),
    _K.TAMPER: EventRule("tamper", _LEVEL),
    _K.DEVICE_OFFLINE: EventRule("device_offline", _LEVEL),
}


@dataclass(frozen=True, slots=True)
class RuleBook:
    alerts: Mapping[str, AlertRule] = field(default_factory=lambda: ALERT_RULES)
    events: Mapping[EventKind, EventRule] = field(default_factory=lambda: EVENT_RULES)

    def __post_init__(self) -> None:
        missing = [k.value for k in EventKind if k not in self.events]
        if missing:
            raise ValueError(f"rule book has no rule for event types {missing}")
        for kind, rule in self.events.items():
            for name in (rule.condition, *rule.cancels):
                if name is not None and name not in self.alerts:
                    raise ValueError(f"event {kind.value} names unknown condition {name!r}")


DEFAULT_RULES = RuleBook()

# Alert ids are derived from the event that opens them, so applying the same
# event twice (a retried transaction) cannot open two different alerts.
ALERT_ID_NAMESPACE = uuid.UUID("6b1f2f4e-6c1e-4a55-9d0a-0d5e1a7e0001")


def alert_id_for(opening_id: uuid.UUID | str, dedup_key: str) -> uuid.UUID:
    return uuid.uuid5(ALERT_ID_NAMESPACE, f"{opening_id}/{dedup_key}")


def dedup_key(rule: AlertRule, site_id: str, device_id: str) -> str:
    parts = [rule.alert_type.value, site_id]
    if rule.scope is Scope.DEVICE:
        parts.append(device_id)
    if rule.condition is not None:
        parts.append(rule.condition)
    return ":".join(parts)


@dataclass(frozen=True, slots=True)
class Decision:
    """What an input does: transitions to write in order, or why it does nothing."""

    transitions: tuple[Transition, ...] = ()
    ignored: str | None = None

    @property
    def alerts(self) -> tuple[Alert, ...]:
        return tuple(t.after for t in self.transitions)


def dedup_keys(event: EngineEvent, rules: RuleBook = DEFAULT_RULES) -> tuple[str, ...]:
    """The keys whose unresolved alerts ``decide`` needs (the store locks them)."""
    rule = rules.events[event.kind]
    effect = rule.effects[event.phase]
    if effect is Effect.CANCEL:
        names: tuple[str, ...] = rule.cancels
    elif effect is Effect.IGNORE or rule.condition is None:
        names = ()
    else:
        names = (rule.condition,)
    return tuple(dedup_key(rules.alerts[n], event.site_id, event.device_id) for n in names)


def decide(
    event: EngineEvent,
    open_alerts: Mapping[str, Alert],
    rules: RuleBook = DEFAULT_RULES,
    *,
    now: datetime | None = None,
) -> Decision:
    """The alert changes one committed event makes, given the unresolved alerts by key.

    ``now`` is the engine's clock: a change happens at ``min(event time, now)``, so an
    event stamped in the future (a device clock ahead; the contract lets it be up to
    24 h) starts its ladder now instead of delaying the first rung until that time."""
    require_aware(event.time, "event time")
    at = _not_after(event.time, now)
    rule = rules.events[event.kind]
    effect = rule.effects[event.phase]
    if effect is Effect.IGNORE:
        return Decision(ignored=rule.reason or f"{event.kind.value}/{event.phase.value}")
    actor = device_actor(event.site_id, event.device_id)
    if effect is Effect.CANCEL:
        return _cancel(event, rule, open_alerts, rules, actor, at)
    assert rule.condition is not None  # RuleBook validated
    alert_rule = rules.alerts[rule.condition]
    key = dedup_key(alert_rule, event.site_id, event.device_id)
    current = open_alerts.get(key)
    if current is not None and current.last_event_id == event.event_id:
        return Decision(ignored=f"event {event.event_id} already applied to alert {current.id}")
    change = _Change(
        rule=alert_rule,
        key=key,
        site_id=event.site_id,
        device_id=event.device_id,
        source=event.device_id,
        severity=alert_rule.severity,
        at=at,
        actor=actor,
        channel=Channel.DEVICE,
        event_id=event.event_id,
        opening_id=str(event.event_id),
    )
    return _raise(change, current) if effect is Effect.RAISE else _clear(change, current)


def _not_after(at: datetime, now: datetime | None) -> datetime:
    if now is None:
        return at
    return min(at, require_aware(now, "engine time"))


@dataclass(frozen=True, slots=True)
class ConditionSignal:
    """A server-side condition began or ended (threshold, vital signs, inactivity).

    ``source`` is the contributor (e.g. ``ef-1/residual_current_ma``); its
    condition shares the device alarm's dedup key so the device's own alarm and
    the server's threshold are one alert. ``severity`` overrides the rule's
    (an early warning is minor).
    """

    condition: str
    site_id: str
    device_id: str
    source: str
    active: bool
    at: datetime
    severity: Severity | None = None
    note: str = ""


def signal_key(signal: ConditionSignal, rules: RuleBook = DEFAULT_RULES) -> str:
    return dedup_key(rules.alerts[signal.condition], signal.site_id, signal.device_id)


def decide_signal(
    signal: ConditionSignal,
    open_alerts: Mapping[str, Alert],
    rules: RuleBook = DEFAULT_RULES,
    *,
    now: datetime | None = None,
) -> Decision:
    """As ``decide``, for a server-side condition (its reading's time may be ahead too)."""
    require_aware(signal.at, "signal time")
    at = _not_after(signal.at, now)
    alert_rule = rules.alerts[signal.condition]
    key = dedup_key(alert_rule, signal.site_id, signal.device_id)
    change = _Change(
        rule=alert_rule,
        key=key,
        site_id=signal.site_id,
        device_id=signal.device_id,
        source=signal.source,
        severity=signal.severity or alert_rule.severity,
        at=at,
        actor="system:rules",
        channel=Channel.SYSTEM,
        event_id=None,
        # Two signals opening the same key at the same instant are one alert.
        opening_id=f"{signal.source}@{signal.at.isoformat()}",
        note=signal.note,
    )
    current = open_alerts.get(key)
    return _raise(change, current) if signal.active else _clear(change, current)


@dataclass(frozen=True, slots=True)
class _Change:
    rule: AlertRule
    key: str
    site_id: str
    device_id: str
    source: str
    severity: Severity
    at: datetime
    actor: str
    channel: Channel
    event_id: uuid.UUID | None
    opening_id: str
    note: str = ""

    def command(self, kind: CommandKind, severity: Severity | None = None) -> Command:
        return Command(
            kind,
            self.actor,
            self.channel,
            severity=severity,
            source=self.source,
            event_id=self.event_id,
            note=self.note,
        )


def _raise(c: _Change, current: Alert | None) -> Decision:
    if current is None:
        opened = new_alert(
            alert_id=alert_id_for(c.opening_id, c.key),
            site_id=c.site_id,
            device_id=c.device_id if c.rule.scope is Scope.DEVICE else None,
            alert_type=c.rule.alert_type,
            severity=c.severity,
            dedup_key=c.key,
            at=c.at,
            actor=c.actor,
            channel=c.channel,
            source=c.source,
            event_id=c.event_id,
        )
        return Decision((opened,))
    steps: list[Transition] = []
    alert = current
    if SEVERITY_RANK[c.severity] > SEVERITY_RANK[alert.severity]:
        raised = transition(alert, c.command(CommandKind.RAISE_SEVERITY, severity=c.severity), c.at)
        steps.append(raised)
        alert = raised.after
    kind = CommandKind.REPEAT if c.source in alert.sources else CommandKind.ADD_SOURCE
    steps.append(transition(alert, c.command(kind), c.at))
    return Decision(tuple(steps))


def _clear(c: _Change, current: Alert | None) -> Decision:
    if current is None or c.source not in current.sources:
        return Decision(ignored=f"nothing open to clear for {c.key} from {c.source}")
    if c.rule.clear is ClearPolicy.NEVER:
        return Decision(ignored=f"{c.key} never clears without a person")
    cleared = transition(current, c.command(CommandKind.CLEAR_SOURCE), c.at)
    if cleared.after.sources or c.rule.clear is ClearPolicy.LATCH:
        return Decision((cleared,))
    resolved = transition(
        cleared.after,
        Command(
            CommandKind.RESOLVE,
            c.actor,
            c.channel,
            outcome=Outcome.CLEARED,
            event_id=c.event_id,
            note=c.note,
        ),
        c.at,
    )
    return Decision((cleared, resolved))


# A cancel ends an alert nobody has reached yet; once staff are on scene the
# person there decides, and the cancel is recorded for them.
_CANCELLABLE = frozenset({AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED})


def _cancel(
    event: EngineEvent,
    rule: EventRule,
    open_alerts: Mapping[str, Alert],
    rules: RuleBook,
    actor: str,
    at: datetime,
) -> Decision:
    steps: list[Transition] = []
    for name in rule.cancels:
        alert = open_alerts.get(dedup_key(rules.alerts[name], event.site_id, event.device_id))
        if alert is None or alert.last_event_id == event.event_id:
            continue
        command = (
            Command(
                CommandKind.RESOLVE,
                actor,
                Channel.DEVICE,
                outcome=Outcome.CANCELLED_BY_RESIDENT,
                event_id=event.event_id,
            )
            if alert.status in _CANCELLABLE
            else Command(
                CommandKind.NOTE,
                actor,
                Channel.DEVICE,
                event_id=event.event_id,
                note="resident pressed cancel; staff on scene decide",
            )
        )
        steps.append(transition(alert, command, at))
    if not steps:
        return Decision(ignored=f"cancel from {event.device_id}: no open sos or fall to cancel")
    return Decision(tuple(steps))
