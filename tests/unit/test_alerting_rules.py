"""Rules as data: events → alerts, dedup, one fire incident per site, storm control, cancel."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from alerting.lifecycle import CommandKind, acknowledge, on_scene, transition
from alerting.model import (
    Alert,
    AlertStatus,
    AlertType,
    AuditAction,
    AuditEntry,
    Channel,
    Outcome,
    Severity,
)
from alerting.planner import due_steps
from alerting.policy import PolicyBook
from alerting.rules import (
    ALERT_RULES,
    EVENT_RULES,
    AlertRule,
    ClearPolicy,
    Decision,
    EngineEvent,
    EventKind,
    EventRule,
    Phase,
    RuleBook,
    Scope,
    alert_id_for,
    decide,
    dedup_keys,
)

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
SITE = "home-7"


def ev(
    kind: EventKind,
    phase: Phase = Phase.PULSE,
    device: str = "wb-1",
    at: timedelta = timedelta(0),
    site: str = SITE,
) -> EngineEvent:
    return EngineEvent(uuid.uuid4(), site, device, kind, phase, T0 + at, "es-wb1")


class Engine:
    """Open alerts by dedup key, as the store will hold them (one unresolved per key)."""

    def __init__(self) -> None:
        self.open: dict[str, Alert] = {}
        self.all: dict[uuid.UUID, Alert] = {}
        self.audit: list[AuditEntry] = []

    def feed(self, event: EngineEvent) -> Decision:
        keys = dedup_keys(event)
        locked: Mapping[str, Alert] = {k: self.open[k] for k in keys if k in self.open}
        decision = decide(event, locked)
        self.apply(decision)
        return decision

    def apply(self, decision: Decision) -> None:
        for change in decision.transitions:
            a = change.after
            self.all[a.id] = a
            self.audit.append(change.audit)
            if a.unresolved:
                self.open[a.dedup_key] = a
            else:
                self.open.pop(a.dedup_key, None)


def test_an_sos_opens_one_critical_alert_keyed_by_device() -> None:
    e = ev(EventKind.SOS)
    assert dedup_keys(e) == ("sos:home-7:wb-1",)
    (change,) = decide(e, {}).transitions
    assert change.after == Alert(
        id=alert_id_for(str(e.event_id), "sos:home-7:wb-1"),
        site_id=SITE,
        device_id="wb-1",
        type=AlertType.SOS,
        severity=Severity.CRITICAL,
        status=AlertStatus.OPEN,
        dedup_key="sos:home-7:wb-1",
        opened_at=T0,
        last_seen_at=T0,
        escalation_anchor=T0,
        sources=frozenset({"wb-1"}),
        first_event_id=e.event_id,
        last_event_id=e.event_id,
    )


def test_a_repeat_updates_the_open_alert_and_the_same_event_twice_changes_nothing() -> None:
    engine = Engine()
    first = ev(EventKind.SOS)
    engine.feed(first)
    for _ in range(5):  # one press heard by two receivers, three repeats each
        engine.feed(first)
    assert engine.feed(first).ignored == (
        f"event {first.event_id} already applied to alert "
        f"{alert_id_for(str(first.event_id), 'sos:home-7:wb-1')}"
    )
    again = ev(EventKind.SOS, at=timedelta(seconds=30))
    engine.feed(again)
    (alert,) = engine.all.values()
    assert (alert.count, alert.last_seen_at, alert.last_event_id) == (
        2,
        T0 + timedelta(seconds=30),
        again.event_id,
    )
    assert [a.action for a in engine.audit] == [AuditAction.OPENED, AuditAction.REPEATED]


def test_two_smoke_detectors_at_one_site_are_one_fire_incident_latched_until_a_person() -> None:
    engine = Engine()
    engine.feed(ev(EventKind.SMOKE, Phase.RAISE, "sd-1"))
    engine.feed(ev(EventKind.SMOKE, Phase.RAISE, "sd-2", timedelta(seconds=20)))
    (incident,) = engine.open.values()
    assert (incident.dedup_key, incident.device_id, incident.count, incident.sources) == (
        "smoke:home-7",
        None,
        2,
        frozenset({"sd-1", "sd-2"}),
    )
    engine.feed(ev(EventKind.SMOKE, Phase.CLEAR, "sd-1", timedelta(minutes=2)))
    engine.feed(ev(EventKind.SMOKE, Phase.CLEAR, "sd-2", timedelta(minutes=3)))
    (incident,) = engine.open.values()
    assert (incident.status, incident.sources, incident.condition_cleared_at) == (
        AlertStatus.OPEN,
        frozenset(),
        T0 + timedelta(minutes=3),
    )
    assert [a.action for a in engine.audit] == [
        AuditAction.OPENED,
        AuditAction.SOURCE_ADDED,
        AuditAction.SOURCE_CLEARED,
        AuditAction.SOURCE_CLEARED,
    ]
    # Smoke again at the same site, still unresolved: the same incident.
    engine.feed(ev(EventKind.SMOKE, Phase.RAISE, "sd-1", timedelta(minutes=4)))
    assert len(engine.all) == 1
    assert next(iter(engine.open.values())).condition_cleared_at is None


def test_a_site_going_offline_with_20_devices_is_one_alert_that_clears_when_all_return() -> None:
    engine = Engine()
    devices = [f"dev-{i:02d}" for i in range(20)]
    for i, d in enumerate(devices):
        engine.feed(ev(EventKind.DEVICE_OFFLINE, Phase.RAISE, d, timedelta(milliseconds=i)))
    (alert,) = engine.all.values()
    assert (alert.type, alert.severity, alert.dedup_key, alert.count, alert.sources) == (
        AlertType.DEVICE_OFFLINE,
        Severity.MINOR,
        "device_offline:home-7",
        20,
        frozenset(devices),
    )
    for d in devices:
        engine.feed(ev(EventKind.DEVICE_OFFLINE, Phase.CLEAR, d, timedelta(minutes=5)))
    (alert,) = engine.all.values()
    assert (alert.status, alert.outcome, alert.resolved_by) == (
        AlertStatus.RESOLVED,
        Outcome.CLEARED,
        "device:home-7/dev-19",
    )
    assert engine.open == {}


@pytest.mark.parametrize("kind", [EventKind.SOS, EventKind.FALL, EventKind.SMOKE])
def test_storm_control_never_holds_back_a_first_sos_fall_or_smoke(kind: EventKind) -> None:
    engine = Engine()
    for i in range(20):
        engine.feed(ev(EventKind.DEVICE_OFFLINE, Phase.RAISE, f"dev-{i}"))
    engine.feed(ev(EventKind.LOW_BATTERY, Phase.RAISE, "wb-1"))
    at = timedelta(seconds=1)
    decision = engine.feed(ev(kind, Phase.RAISE, "wb-1", at))
    (opened,) = decision.transitions
    assert opened.audit.action is AuditAction.OPENED
    alert = opened.after
    policy = PolicyBook().resolve(["station-1"], alert.type, alert.severity)
    (first,) = due_steps(alert, policy, set(), T0 + at)
    assert (first.at, first.level) == (T0 + at, 0)


def test_a_cancel_resolves_the_open_sos_of_that_device_as_cancelled_by_resident() -> None:
    engine = Engine()
    engine.feed(ev(EventKind.SOS))
    engine.feed(ev(EventKind.SOS, device="wb-2"))
    cancel = ev(EventKind.CANCEL, at=timedelta(seconds=8))
    (change,) = engine.feed(cancel).transitions
    assert (change.after.status, change.after.outcome, change.after.device_id) == (
        AlertStatus.RESOLVED,
        Outcome.CANCELLED_BY_RESIDENT,
        "wb-1",
    )
    assert change.audit == AuditEntry(
        T0 + timedelta(seconds=8),
        change.after.id,
        "device:home-7/wb-1",
        AuditAction.RESOLVED,
        Channel.DEVICE,
        {
            "from": "open",
            "to": "resolved",
            "outcome": "cancelled_by_resident",
            "event_id": str(cancel.event_id),
        },
    )
    assert [a.device_id for a in engine.open.values()] == ["wb-2"]


def test_a_cancel_while_staff_are_on_scene_is_recorded_but_leaves_the_alert_to_them() -> None:
    engine = Engine()
    engine.feed(ev(EventKind.FALL))
    (fall,) = engine.open.values()
    there = transition(fall, on_scene("staff:wang.li", Channel.CONSOLE), T0 + timedelta(minutes=4))
    engine.open[fall.dedup_key] = there.after
    (change,) = engine.feed(ev(EventKind.CANCEL, at=timedelta(minutes=5))).transitions
    assert change.after == there.after
    assert (change.audit.action, change.audit.detail["note"]) == (
        AuditAction.NOTED,
        "resident pressed cancel; staff on scene decide",
    )


def test_a_cancel_reaches_an_acknowledged_alert_too() -> None:
    engine = Engine()
    engine.feed(ev(EventKind.SOS))
    (alert,) = engine.open.values()
    engine.open[alert.dedup_key] = transition(
        alert, acknowledge("staff:wang.li", Channel.CONSOLE), T0 + timedelta(seconds=30)
    ).after
    (change,) = engine.feed(ev(EventKind.CANCEL, at=timedelta(seconds=40))).transitions
    assert change.after.outcome is Outcome.CANCELLED_BY_RESIDENT


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (ev(EventKind.SOS, Phase.CLEAR), "an sos never clears without a person"),
        (ev(EventKind.FALL, Phase.CLEAR), "a fall never clears without a person"),
        (ev(EventKind.SUPERVISION), "supervision check-in: liveness is the edge's timer"),
        (ev(EventKind.TEST, Phase.RAISE, "sd-1"), "detector test button: recorded, no alarm"),
        (ev(EventKind.CANCEL), "cancel from wb-1: no open sos or fall to cancel"),
        (ev(EventKind.TAMPER, Phase.CLEAR), "nothing open to clear for tamper:home-7:wb-1:tamper"
         " from wb-1"),
    ],
)
def test_inputs_that_change_nothing_say_why(event: EngineEvent, reason: str) -> None:
    assert decide(event, {}) == Decision(ignored=reason)


def test_device_conditions_clear_by_themselves_and_sensor_types_map_as_documented() -> None:
    expected = {
        EventKind.RESIDUAL_CURRENT: (AlertType.ELECTRICAL, Severity.MAJOR,
                                     "electrical:home-7:ef-1:residual_current"),
        EventKind.CABLE_TEMPERATURE: (AlertType.ELECTRICAL, Severity.MAJOR,
                                      "electrical:home-7:ef-1:cable_temperature"),
        EventKind.OVER_CURRENT: (AlertType.ELECTRICAL, Severity.MAJOR,
                                 "electrical:home-7:ef-1:over_current"),
        EventKind.DEVICE_FAULT: (AlertType.DEVICE_FAULT, Severity.MINOR,
                                 "device_fault:home-7:ef-1"),
        EventKind.LOW_BATTERY: (AlertType.LOW_BATTERY, Severity.MINOR, "low_battery:home-7:ef-1"),
        EventKind.TAMPER: (AlertType.TAMPER, Severity.MINOR, "tamper:home-7:ef-1:tamper"),
        EventKind.REMOVED: (AlertType.TAMPER, Severity.MINOR, "tamper:home-7:ef-1:removed"),
    }
    for kind, (alert_type, severity, key) in expected.items():
        engine = Engine()
        engine.feed(ev(kind, Phase.RAISE, "ef-1"))
        (alert,) = engine.open.values()
        assert (alert.type, alert.severity, alert.dedup_key) == (alert_type, severity, key)
        engine.feed(ev(kind, Phase.CLEAR, "ef-1", timedelta(seconds=10)))
        (alert,) = engine.all.values()
        assert (alert.status, alert.outcome) == (AlertStatus.RESOLVED, Outcome.CLEARED)


def test_wandering_opens_a_major_alert_that_only_a_person_ends() -> None:
    engine = Engine()
    engine.feed(ev(EventKind.GEOFENCE_EXIT))
    (alert,) = engine.open.values()
    assert (alert.type, alert.severity) == (AlertType.WANDERING, Severity.MAJOR)
    assert [t.audit.action for t in engine.feed(ev(EventKind.GEOFENCE_EXIT)).transitions] == [
        AuditAction.REPEATED
    ]


def test_the_rule_book_covers_every_contract_event_type_and_refuses_gaps() -> None:
    assert set(EVENT_RULES) == set(EventKind)
    partial: dict[EventKind, EventRule] = {
        k: v for k, v in EVENT_RULES.items() if k is not EventKind.TAMPER
    }
    with pytest.raises(ValueError, match=r"no rule for event types \['tamper'\]"):
        RuleBook(events=partial)
    nope = EventRule("nope", EVENT_RULES[EventKind.TAMPER].effects)
    bad = {**EVENT_RULES, EventKind.TAMPER: nope}
    with pytest.raises(ValueError, match="names unknown condition 'nope'"):
        RuleBook(events=bad)


def test_rules_are_data_a_site_may_latch_electrical_alarms() -> None:
    latched = RuleBook(
        alerts={
            **ALERT_RULES,
            "residual_current": dataclasses.replace(
                ALERT_RULES["residual_current"], clear=ClearPolicy.LATCH
            ),
        }
    )
    raised = decide(ev(EventKind.RESIDUAL_CURRENT, Phase.RAISE, "ef-1"), {}, latched).alerts[0]
    cleared = decide(
        ev(EventKind.RESIDUAL_CURRENT, Phase.CLEAR, "ef-1"), {raised.dedup_key: raised}, latched
    )
    assert [t.audit.action for t in cleared.transitions] == [AuditAction.SOURCE_CLEARED]
    assert cleared.alerts[0].status is AlertStatus.OPEN
    assert ALERT_RULES["sos"] == AlertRule(
        AlertType.SOS, Severity.CRITICAL, Scope.DEVICE, ClearPolicy.NEVER
    )
    assert CommandKind.CLEAR_SOURCE.value == "clear_source"
