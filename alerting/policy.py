"""Escalation policies as data (ARCHITECTURE §5), overridable per unit of the tree.

A policy is a ladder of levels, each saying whom (by role) to notify through
which channels and how long after the ladder's start; the ladder stops when
the alert reaches ``ladder_until`` (acknowledged for critical and major
alerts; resolved for minor ones: "fallback after 2 h unresolved"). Critical
alerts also carry the "15-minute service circle": once acknowledged they
remind every 10 min and escalate one level if nobody is on scene 15 min after
the acknowledgement. ``alerting.planner`` turns a policy into timed steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from alerting.model import AlertStatus, AlertType, Channel, Severity


class Role(StrEnum):
    """Whom a step reaches; the directory (staff, shifts, residents) resolves roles to people."""

    DUTY = "duty"  # on-duty staff of the responsible unit, by shift
    SUPERVISOR = "supervisor"  # the unit's supervisor
    FAMILY = "family"  # the resident's family contact
    STREET = "street"  # the street centre
    BUREAU = "bureau"  # the district bureau's safety network (webhook)
    ACKNOWLEDGER = "acknowledger"  # whoever acknowledged (reminders)


@dataclass(frozen=True, slots=True)
class Level:
    after: timedelta  # from the ladder's start (alert opened / reopened / severity raised)
    roles: tuple[Role, ...]
    channels: tuple[Channel, ...]


@dataclass(frozen=True, slots=True)
class EscalationPolicy:
    name: str
    levels: tuple[Level, ...]
    ladder_until: AlertStatus = AlertStatus.ACKNOWLEDGED
    # After the last level, while the ladder still runs: notify the top level again.
    repeat_top_every: timedelta | None = None
    # After an acknowledgement, while unresolved.
    remind_every: timedelta | None = None
    remind_roles: tuple[Role, ...] = (Role.ACKNOWLEDGER,)
    remind_channels: tuple[Channel, ...] = (Channel.CONSOLE, Channel.MESSAGING)
    on_scene_within: timedelta | None = None  # else escalate one level, once per acknowledgement

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError(f"policy {self.name}: needs at least one level")
        afters = [lv.after for lv in self.levels]
        if afters != sorted(afters) or len(set(afters)) != len(afters) or afters[0] < timedelta(0):
            raise ValueError(f"policy {self.name}: level times must strictly ascend from >= 0")
        for every in (self.repeat_top_every, self.remind_every):
            if every is not None and every <= timedelta(0):
                raise ValueError(f"policy {self.name}: repeat intervals must be positive")


_C = Channel
_PAGE = (_C.CONSOLE, _C.MESSAGING, _C.VOICE)  # per-person fallback order (pipeline)
_MSG = (_C.CONSOLE, _C.MESSAGING)

CRITICAL = EscalationPolicy(
    name="critical",
    levels=(
        Level(timedelta(0), (Role.DUTY,), _PAGE),
        Level(timedelta(seconds=60), (Role.SUPERVISOR, Role.FAMILY), _PAGE),
        Level(timedelta(minutes=3), (Role.STREET,), _PAGE),
        Level(timedelta(minutes=5), (Role.BUREAU,), (_C.WEBHOOK,)),
    ),
    repeat_top_every=timedelta(minutes=10),
    remind_every=timedelta(minutes=10),
    on_scene_within=timedelta(minutes=15),
)
# Smoke: the bureau's safety network hears of a fire risk at once, as well.
SMOKE = EscalationPolicy(
    name="critical-smoke",
    levels=(
        Level(timedelta(0), (Role.DUTY, Role.BUREAU), (*_PAGE, _C.WEBHOOK)),
        *CRITICAL.levels[1:],
    ),
    repeat_top_every=CRITICAL.repeat_top_every,
    remind_every=CRITICAL.remind_every,
    on_scene_within=CRITICAL.on_scene_within,
)
MAJOR = EscalationPolicy(
    name="major",
    levels=(
        Level(timedelta(0), (Role.DUTY,), _MSG),
        Level(timedelta(minutes=5), (Role.SUPERVISOR,), _PAGE),
        Level(timedelta(minutes=15), (Role.STREET,), _PAGE),
        Level(timedelta(minutes=30), (Role.BUREAU,), (_C.WEBHOOK,)),
    ),
)
MINOR = EscalationPolicy(
    name="minor",
    levels=(
        Level(timedelta(0), (Role.DUTY,), (_C.CONSOLE,)),
        Level(timedelta(hours=2), (Role.SUPERVISOR,), _MSG),
    ),
    ladder_until=AlertStatus.RESOLVED,
)

DEFAULT_BY_SEVERITY: Mapping[Severity, EscalationPolicy] = {
    Severity.CRITICAL: CRITICAL,
    Severity.MAJOR: MAJOR,
    Severity.MINOR: MINOR,
}
DEFAULT_BY_TYPE: Mapping[tuple[AlertType, Severity], EscalationPolicy] = {
    (AlertType.SMOKE, Severity.CRITICAL): SMOKE,
}


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Policies of one unit: by (type, severity) first, then by severity."""

    by_type: Mapping[tuple[AlertType, Severity], EscalationPolicy] = field(default_factory=dict)
    by_severity: Mapping[Severity, EscalationPolicy] = field(default_factory=dict)

    def find(self, alert_type: AlertType, severity: Severity) -> EscalationPolicy | None:
        return self.by_type.get((alert_type, severity)) or self.by_severity.get(severity)


DEFAULTS = PolicySet(DEFAULT_BY_TYPE, DEFAULT_BY_SEVERITY)


@dataclass(frozen=True, slots=True)
class PolicyBook:
    """Defaults plus overrides per organisation unit (``organisations.id``)."""

    overrides: Mapping[str, PolicySet] = field(default_factory=dict)
    defaults: PolicySet = DEFAULTS

    def resolve(
        self, unit_path: Sequence[str], alert_type: AlertType, severity: Severity
    ) -> EscalationPolicy:
        """The most specific policy: ``unit_path`` runs from the site's unit up to the bureau."""
        for unit in unit_path:
            found = self.overrides.get(unit)
            policy = found.find(alert_type, severity) if found else None
            if policy is not None:
                return policy
        policy = self.defaults.find(alert_type, severity)
        if policy is None:
            raise LookupError(f"no escalation policy for {alert_type.value}/{severity.value}")
        return policy
