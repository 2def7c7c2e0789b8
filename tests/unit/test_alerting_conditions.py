"""Server-side conditions: electrical thresholds with hysteresis, vital signs, inactivity."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.conditions import (
    CABLE_TEMPERATURE,
    CHINA_STANDARD_TIME,
    DEFAULT_VITAL_RANGES,
    NORMAL,
    RESIDUAL_CURRENT,
    InactivityProfile,
    InactivityVerdict,
    InvalidReading,
    NightHours,
    ThresholdRule,
    ThresholdState,
    VitalRange,
    VitalState,
    awake_time_between,
    evaluate_inactivity,
    evaluate_threshold,
    evaluate_vital,
    inactivity_due_at,
    is_activity,
    threshold_rule_for,
)
from alerting.model import Alert, AlertStatus, AlertType, AuditAction, Outcome, Severity
from alerting.rules import ConditionSignal, EngineEvent, EventKind, Phase, decide, decide_signal

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
SITE, EF = "home-7", "ef-1"


def feed(
    rule: ThresholdRule, values: list[float], metric: str = "residual_current_ma"
) -> tuple[ThresholdState, list[tuple[int, ConditionSignal]]]:
    state = ThresholdState()
    signals: list[tuple[int, ConditionSignal]] = []
    for i, value in enumerate(values):
        out = evaluate_threshold(
            rule, state, site_id=SITE, device_id=EF, metric=metric, value=value,
            at=T0 + timedelta(seconds=2 * i),
        )
        state = out.state
        if out.signal is not None:
            signals.append((i, out.signal))
    return state, signals


def at(i: int) -> datetime:
    return T0 + timedelta(seconds=2 * i)


def test_leakage_rising_through_240_warns_then_300_twice_alarms_and_clears_below_the_band() -> None:
    readings = [100, 250, 250, 310, 299, 310, 310, 280, 260, 260, 230, 230, 215, 220, 215, 214]
    state, signals = feed(RESIDUAL_CURRENT, [float(v) for v in readings])
    src = "ef-1/residual_current_ma"
    assert signals == [
        (2, ConditionSignal("residual_current", SITE, EF, src, True, at(2), Severity.MINOR,
                            "residual_current_ma 250 >= 240 (early_warning)")),
        # 310 then 299 is not "held": the alarm needs two readings in a row at or above 300.
        (6, ConditionSignal("residual_current", SITE, EF, src, True, at(6), Severity.MAJOR,
                            "residual_current_ma 310 >= 300 (alarm)")),
        # 260 twice eases to the warning level (no signal); 230 stays above the 216 band;
        # only two readings in a row below 216 clear.
        (15, ConditionSignal("residual_current", SITE, EF, src, False, at(15), None,
                             "residual_current_ma 214 < 216")),
    ]
    assert state.level == NORMAL

    # Through the rules: one electrical alert, minor at the warning, major at the alarm,
    # resolved as cleared at the end.
    open_alerts: dict[str, Alert] = {}
    actions: list[AuditAction] = []
    alert: Alert | None = None
    for _, signal in signals:
        decision = decide_signal(signal, open_alerts)
        for change in decision.transitions:
            actions.append(change.audit.action)
            alert = change.after
            open_alerts = {alert.dedup_key: alert} if alert.unresolved else {}
    assert actions == [
        AuditAction.OPENED,
        AuditAction.SEVERITY_RAISED,
        AuditAction.REPEATED,
        AuditAction.SOURCE_CLEARED,
        AuditAction.RESOLVED,
    ]
    assert alert is not None
    assert (alert.type, alert.severity, alert.status, alert.outcome, alert.dedup_key) == (
        AlertType.ELECTRICAL,
        Severity.MAJOR,
        AlertStatus.RESOLVED,
        Outcome.CLEARED,
        "electrical:home-7:ef-1:residual_current",
    )


def test_the_devices_own_alarm_and_the_server_threshold_are_one_alert() -> None:
    _, signals = feed(RESIDUAL_CURRENT, [310.0, 310.0])
    (_, alarm), = signals
    opened = decide_signal(alarm, {}).alerts[0]
    device = EngineEvent(
        uuid.uuid4(), SITE, EF, EventKind.RESIDUAL_CURRENT, Phase.RAISE,
        T0 + timedelta(seconds=3), "es-ef1",
    )
    both = decide(device, {opened.dedup_key: opened}).alerts[-1]
    assert (both.id, both.count, both.sources) == (
        opened.id, 2, frozenset({"ef-1/residual_current_ma", "ef-1"}),
    )


def test_cable_temperature_alarms_at_70_held_twice_and_clears_below_65() -> None:
    metric = "cable_temp_c_3"
    assert threshold_rule_for(metric) is CABLE_TEMPERATURE
    _, signals = feed(CABLE_TEMPERATURE, [69.9, 70.0, 69.0, 70.5, 71.0, 66.0, 66.0, 64.9, 64.0],
                      metric)
    assert [(i, s.active, s.source) for i, s in signals] == [
        (4, True, "ef-1/cable_temp_c_3"),
        (8, False, "ef-1/cable_temp_c_3"),
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_readings_are_refused(bad: float) -> None:
    with pytest.raises(InvalidReading, match="non-finite"):
        evaluate_threshold(
            RESIDUAL_CURRENT, ThresholdState(), site_id=SITE, device_id=EF,
            metric="residual_current_ma", value=bad, at=T0,
        )


def test_threshold_rules_refuse_a_band_that_is_not_below_the_limit() -> None:
    from alerting.conditions import ThresholdLevel

    with pytest.raises(ValueError, match="clear_below must lie below"):
        ThresholdLevel("alarm", 70.0, 70.0, Severity.MAJOR)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=600, allow_nan=False), max_size=60))
def test_thresholds_alternate_raise_and_clear_and_never_flap_on_one_reading(
    values: list[float],
) -> None:
    _, signals = feed(RESIDUAL_CURRENT, values)
    # A clear only after a raise; never two clears in a row; a raise needs two readings.
    active = False
    for i, s in signals:
        assert s.active or active
        if s.active:
            assert i >= 1 and values[i - 1] >= 240.0 and values[i] >= 240.0
        else:
            assert values[i - 1] < 216.0 and values[i] < 216.0
        active = s.active


def test_vital_signs_outside_the_residents_range_for_two_minutes_raise_and_clear() -> None:
    hr = DEFAULT_VITAL_RANGES["heart_rate_bpm"]
    mine = VitalRange("heart_rate_bpm", low=40.0, high=110.0, hold=timedelta(minutes=2))
    state = VitalState()
    out: list[tuple[int, ConditionSignal | None]] = []
    for sec, bpm in [(0, 115), (60, 130), (119, 125), (120, 118), (180, 90), (240, 95), (300, 99)]:
        state, signal = evaluate_vital(
            mine, state, site_id=SITE, device_id="wb-1", value=float(bpm),
            at=T0 + timedelta(seconds=sec),
        )
        out.append((sec, signal))
    assert [(sec, s) for sec, s in out if s is not None] == [
        (120, ConditionSignal("vital_signs", SITE, "wb-1", "wb-1/heart_rate_bpm", True,
                              T0 + timedelta(seconds=120), None,
                              "heart_rate_bpm 118 outside [40.0, 110.0] for 120 s")),
        (300, ConditionSignal("vital_signs", SITE, "wb-1", "wb-1/heart_rate_bpm", False,
                              T0 + timedelta(seconds=300), None,
                              "heart_rate_bpm 99 back within [40.0, 110.0] for 120 s")),
    ]
    assert hr.inside(115.0)  # the default range would not have raised at 115
    raised = out[3][1]
    assert raised is not None
    (opened,) = decide_signal(raised, {}).transitions
    assert (opened.after.type, opened.after.severity, opened.after.dedup_key) == (
        AlertType.VITAL_SIGNS, Severity.MAJOR, "vital_signs:home-7:wb-1",
    )
    # A late reading from a replayed batch changes nothing.
    assert evaluate_vital(mine, state, site_id=SITE, device_id="wb-1", value=200.0,
                          at=T0 + timedelta(seconds=10)) == (state, None)


def test_a_single_reading_back_in_range_restarts_the_run() -> None:
    mine = VitalRange("spo2_pct", low=90.0, hold=timedelta(minutes=2))
    state = VitalState()
    signals = []
    for sec, pct in [(0, 85), (90, 95), (100, 86), (200, 84), (220, 80)]:
        state, s = evaluate_vital(mine, state, site_id=SITE, device_id="wb-1", value=float(pct),
                                  at=T0 + timedelta(seconds=sec))
        signals.append(s)
    assert [s is not None for s in signals] == [False, False, False, False, True]


# --- inactivity -----------------------------------------------------------------------

CST = CHINA_STANDARD_TIME


def local(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=CST)


ALONE = InactivityProfile(window=timedelta(hours=4), night=NightHours(time(22), time(7)))


def test_no_movement_for_longer_than_the_window_outside_night_hours_is_overdue() -> None:
    last = local(23, 8)
    assert evaluate_inactivity(ALONE, last, local(23, 11, 59)) == InactivityVerdict(
        overdue=False, due_at=local(23, 12).astimezone(UTC),
        awake_inactive=timedelta(hours=3, minutes=59),
    )
    assert evaluate_inactivity(ALONE, last, local(23, 12, 1)).overdue
    signal = ConditionSignal("inactivity", SITE, "wb-1", "wb-1/activity", True, local(23, 12, 1))
    (opened,) = decide_signal(signal, {}).transitions
    assert (opened.after.type, opened.after.severity, opened.after.dedup_key) == (
        AlertType.INACTIVITY, Severity.MAJOR, "inactivity:home-7:wb-1",
    )


def test_night_hours_do_not_count_towards_the_window() -> None:
    last = local(23, 20)  # 2 h awake until 22:00, then asleep until 07:00
    assert inactivity_due_at(last, ALONE) == local(24, 9).astimezone(UTC)
    assert not evaluate_inactivity(ALONE, last, local(24, 6, 59)).overdue
    assert awake_time_between(last, local(24, 8), ALONE) == timedelta(hours=3)
    # Inactive since the middle of the night: the count starts at 07:00.
    assert inactivity_due_at(local(24, 3), ALONE) == local(24, 11).astimezone(UTC)


def test_without_night_hours_the_window_is_plain_time() -> None:
    profile = InactivityProfile(window=timedelta(hours=12), night=None)
    assert inactivity_due_at(T0, profile) == T0 + timedelta(hours=12)


def test_night_hours_may_lie_within_one_day() -> None:
    siesta = InactivityProfile(
        window=timedelta(hours=2),
        night=NightHours(time(12), time(14)),
        tz=timezone(timedelta(hours=8)),
    )
    assert inactivity_due_at(local(23, 11), siesta) == local(23, 15).astimezone(UTC)


@settings(max_examples=200, deadline=None)
@given(
    start=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1),
                       timezones=st.just(UTC)),
    window_min=st.integers(min_value=1, max_value=3 * 24 * 60),
    night_start=st.integers(min_value=0, max_value=23),
    night_len=st.integers(min_value=1, max_value=12),
)
def test_the_due_time_is_exactly_when_waking_time_reaches_the_window(
    start: datetime, window_min: int, night_start: int, night_len: int
) -> None:
    night = NightHours(time(night_start), time((night_start + night_len) % 24))
    profile = InactivityProfile(window=timedelta(minutes=window_min), night=night)
    due = inactivity_due_at(start, profile)
    assert awake_time_between(start, due, profile) == profile.window
    assert not evaluate_inactivity(profile, start, due - timedelta(microseconds=1)).overdue
    assert evaluate_inactivity(profile, start, due).overdue


def test_activity_signals_are_data() -> None:
    readings = [
        ("activity", 3.0),
        ("activity", 0.0),
        ("power_w", 900.0),
        ("power_w", 60.0),  # the fridge alone
        ("heart_rate_bpm", 80.0),  # worn, not moving
        ("power_w", math.nan),
    ]
    assert [is_activity(m, v) for m, v in readings] == [True, False, True, False, False, False]
