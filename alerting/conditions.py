"""Server-side conditions over telemetry, as pure evaluators over explicit state.

* ``ThresholdRule``: levels with a raise threshold and a lower clear threshold
  (hysteresis), each to be held for ``consecutive`` readings in a row, both
  ways, so a value wobbling around a limit neither floods nor flaps. Defaults
  are ARCHITECTURE §4's: residual current alarm at 300 mA with an early warning
  at 80 % (240 mA); cable temperature at 70 °C.
* ``VitalRange``: heart rate / SpO2 outside the resident's own range for a
  duration; back inside for as long before it clears.
* ``InactivityProfile``: no movement (or no electricity use) for longer than
  the resident's window, counting only waking hours, so that sleep never
  raises a welfare check; ``inactivity_due_at`` tells the sweep when to look.

The state each evaluator returns is what the store keeps per (site, device,
metric); the ``ConditionSignal`` it may return goes to ``rules.decide_signal``.
Non-finite readings raise ``InvalidReading`` (hostile input gets a clear error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

from alerting.model import Severity, require_aware
from alerting.rules import ConditionSignal


class InvalidReading(ValueError):
    """A reading no rule can judge (NaN, infinity)."""


def _finite(value: float, metric: str) -> float:
    if not math.isfinite(value):
        raise InvalidReading(f"{metric}: non-finite value {value!r}")
    return value


# --- thresholds -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThresholdLevel:
    name: str
    at_or_above: float
    clear_below: float  # < at_or_above: the hysteresis band
    severity: Severity

    def __post_init__(self) -> None:
        if not self.clear_below < self.at_or_above:
            raise ValueError(f"{self.name}: clear_below must lie below at_or_above")


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    """One condition over some metrics; levels ascend (warning, then alarm)."""

    condition: str  # an alerting.rules ALERT_RULES name: shares the device alarm's alert
    metrics: frozenset[str]
    levels: tuple[ThresholdLevel, ...]
    consecutive: int = 2

    def __post_init__(self) -> None:
        if self.consecutive < 1 or not self.levels:
            raise ValueError(f"{self.condition}: needs levels and consecutive >= 1")
        pairs = zip(self.levels, self.levels[1:], strict=False)
        if any(b.at_or_above <= a.at_or_above or b.clear_below <= a.clear_below for a, b in pairs):
            raise ValueError(f"{self.condition}: levels must ascend")


RESIDUAL_CURRENT = ThresholdRule(
    condition="residual_current",
    metrics=frozenset({"residual_current_ma"}),
    levels=(
        ThresholdLevel("early_warning", 240.0, 216.0, Severity.MINOR),
        ThresholdLevel("alarm", 300.0, 270.0, Severity.MAJOR),
    ),
)
CABLE_TEMPERATURE = ThresholdRule(
    condition="cable_temperature",
    metrics=frozenset({f"cable_temp_c_{i}" for i in range(1, 5)}),
    levels=(ThresholdLevel("alarm", 70.0, 65.0, Severity.MAJOR),),
)
THRESHOLD_RULES: tuple[ThresholdRule, ...] = (RESIDUAL_CURRENT, CABLE_TEMPERATURE)


def threshold_rule_for(
    metric: str, rules: tuple[ThresholdRule, ...] = THRESHOLD_RULES
) -> ThresholdRule | None:
    return next((r for r in rules if metric in r.metrics), None)


NORMAL = -1  # a ThresholdState level below every ThresholdLevel


@dataclass(frozen=True, slots=True)
class ThresholdState:
    """Per (device, metric): the level in force and, per level, the current runs."""

    level: int = NORMAL
    runs_above: tuple[int, ...] = ()  # consecutive readings >= levels[i].at_or_above
    runs_below: tuple[int, ...] = ()  # consecutive readings < levels[i].clear_below


@dataclass(frozen=True, slots=True)
class ThresholdOutcome:
    state: ThresholdState
    previous_level: int
    signal: ConditionSignal | None  # None also when an alarm eases to a warning


def evaluate_threshold(
    rule: ThresholdRule,
    state: ThresholdState,
    *,
    site_id: str,
    device_id: str,
    metric: str,
    value: float,
    at: datetime,
) -> ThresholdOutcome:
    """Judge one reading; a level changes only after ``consecutive`` readings agree."""
    _finite(value, metric)
    require_aware(at, "reading time")
    n = len(rule.levels)
    old_above = state.runs_above or (0,) * n
    old_below = state.runs_below or (0,) * n
    above = tuple(
        a + 1 if value >= lv.at_or_above else 0
        for a, lv in zip(old_above, rule.levels, strict=True)
    )
    below = tuple(
        b + 1 if value < lv.clear_below else 0
        for b, lv in zip(old_below, rule.levels, strict=True)
    )
    level = state.level
    held_up = [i for i in range(n) if i > level and above[i] >= rule.consecutive]
    if held_up:
        level = max(held_up)
    else:
        while level > NORMAL and below[level] >= rule.consecutive:
            level -= 1
    new_state = ThresholdState(level, above, below)
    signal: ConditionSignal | None = None
    source = f"{device_id}/{metric}"
    if level > state.level:
        lv = rule.levels[level]
        signal = ConditionSignal(
            rule.condition, site_id, device_id, source, True, at, lv.severity,
            note=f"{metric} {value:g} >= {lv.at_or_above:g} ({lv.name})",
        )
    elif level == NORMAL and state.level > NORMAL:
        lowest = rule.levels[0]
        signal = ConditionSignal(
            rule.condition, site_id, device_id, source, False, at,
            note=f"{metric} {value:g} < {lowest.clear_below:g}",
        )
    return ThresholdOutcome(new_state, state.level, signal)


# --- vital signs ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VitalRange:
    """A resident's own acceptable range for one metric, held ``hold`` long to change state."""

    metric: str
    low: float | None = None
    high: float | None = None
    hold: timedelta = timedelta(minutes=2)

    def inside(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (
            self.high is None or value <= self.high
        )


DEFAULT_VITAL_RANGES: Mapping[str, VitalRange] = {
    "heart_rate_bpm": VitalRange("heart_rate_bpm", low=45.0, high=120.0),
    "spo2_pct": VitalRange("spo2_pct", low=90.0),
}


@dataclass(frozen=True, slots=True)
class VitalState:
    alerting: bool = False
    since: datetime | None = None  # start of the current run against the state
    last_at: datetime | None = None


def evaluate_vital(
    vital: VitalRange,
    state: VitalState,
    *,
    site_id: str,
    device_id: str,
    value: float,
    at: datetime,
) -> tuple[VitalState, ConditionSignal | None]:
    """Raise after ``hold`` outside the range, clear after ``hold`` back inside.

    A reading older than the last one changes nothing (readings may arrive
    out of order from a batch or a replayed outbox).
    """
    _finite(value, vital.metric)
    require_aware(at, "reading time")
    if state.last_at is not None and at <= state.last_at:
        return state, None
    against = vital.inside(value) if state.alerting else not vital.inside(value)
    if not against:
        return VitalState(state.alerting, None, at), None
    since = state.since or at
    if at - since < vital.hold:
        return VitalState(state.alerting, since, at), None
    raising = not state.alerting
    signal = ConditionSignal(
        "vital_signs", site_id, device_id, f"{device_id}/{vital.metric}", raising, at,
        note=f"{vital.metric} {value:g} {'outside' if raising else 'back within'} "
        f"[{vital.low}, {vital.high}] for {int((at - since).total_seconds())} s",
    )
    return VitalState(raising, None, at), signal


# --- inactivity ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NightHours:
    """Local sleeping hours, e.g. 22:00-07:00 (may cross midnight); not counted."""

    start: time = time(22, 0)
    end: time = time(7, 0)

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError("night hours must not be empty or the whole day")


CHINA_STANDARD_TIME = ZoneInfo("Asia/Shanghai")


@dataclass(frozen=True, slots=True)
class InactivityProfile:
    """From ``residents.inactivity_window_min`` and the resident's night hours."""

    window: timedelta = timedelta(hours=12)
    night: NightHours | None = field(default_factory=NightHours)
    tz: tzinfo = CHINA_STANDARD_TIME

    def __post_init__(self) -> None:
        if not timedelta(0) < self.window <= timedelta(days=14):
            raise ValueError("inactivity window must lie in (0, 14 days]")


def _night_segment(t: datetime, night: NightHours, tz: tzinfo) -> tuple[bool, datetime]:
    """Whether instant ``t`` is at night, and the UTC instant the answer next changes."""
    local = t.astimezone(tz)
    crosses = night.start > night.end
    spans: list[tuple[datetime, datetime]] = []
    for offset in (-1, 0, 1):
        d: date = local.date() + timedelta(days=offset)
        start = datetime.combine(d, night.start, tzinfo=tz)
        end_day = d + timedelta(days=1) if crosses else d
        spans.append((start, datetime.combine(end_day, night.end, tzinfo=tz)))
    for start, end in spans:
        if start <= local < end:
            return True, end.astimezone(UTC)
    upcoming = min(start for start, _ in spans if start > local)
    return False, upcoming.astimezone(UTC)


def awake_time_between(a: datetime, b: datetime, profile: InactivityProfile) -> timedelta:
    """Time between ``a`` and ``b`` outside night hours."""
    t, end = require_aware(a).astimezone(UTC), require_aware(b).astimezone(UTC)
    if profile.night is None:
        return max(end - t, timedelta(0))
    total = timedelta(0)
    while t < end:
        night, boundary = _night_segment(t, profile.night, profile.tz)
        stop = min(end, boundary)
        if not night:
            total += stop - t
        t = stop
    return total


def inactivity_due_at(last_activity: datetime, profile: InactivityProfile) -> datetime:
    """The instant the waking time since ``last_activity`` reaches the window."""
    t = require_aware(last_activity, "last activity").astimezone(UTC)
    if profile.night is None:
        return t + profile.window
    remaining = profile.window
    while True:
        night, boundary = _night_segment(t, profile.night, profile.tz)
        if not night:
            if boundary - t >= remaining:
                return t + remaining
            remaining -= boundary - t
        t = boundary


@dataclass(frozen=True, slots=True)
class InactivityVerdict:
    overdue: bool
    due_at: datetime  # when the sweep should look again if not overdue
    awake_inactive: timedelta


def evaluate_inactivity(
    profile: InactivityProfile, last_activity: datetime, now: datetime
) -> InactivityVerdict:
    due = inactivity_due_at(last_activity, profile)
    return InactivityVerdict(
        overdue=require_aware(now) >= due,
        due_at=due,
        awake_inactive=awake_time_between(last_activity, now, profile),
    )


@dataclass(frozen=True, slots=True)
class ActivityRule:
    """A reading that shows the resident is up and about."""

    metric: str
    min_value: float


# ``activity`` is the wristband's movement index; ``power_w`` must exceed the
# home's standing load (fridge, router), which the site's configuration sets.
ACTIVITY_RULES: Mapping[str, ActivityRule] = {
    "activity": ActivityRule("activity", 1.0),
    "power_w": ActivityRule("power_w", 150.0),
}


def is_activity(
    metric: str, value: float, rules: Mapping[str, ActivityRule] = ACTIVITY_RULES
) -> bool:
    rule = rules.get(metric)
    return rule is not None and math.isfinite(value) and value >= rule.min_value
