"""The lifecycle as a pure function: legal moves, refused moves, and the audit entry of each."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from alerting.lifecycle import (
    TRANSITIONS,
    Command,
    CommandKind,
    IllegalTransition,
    Transition,
    acknowledge,
    new_alert,
    on_scene,
    reopen,
    resolve,
    transition,
)
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

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
ID = uuid.UUID("00000000-0000-4000-8000-000000000007")
EVENT = uuid.UUID("00000000-0000-4000-8000-0000000000e1")
STAFF = "staff:wang.li"


def sos() -> Alert:
    return new_alert(
        alert_id=ID,
        site_id="home-7",
        device_id="wb-1",
        alert_type=AlertType.SOS,
        severity=Severity.CRITICAL,
        dedup_key="sos:home-7:wb-1",
        at=T0,
        actor="device:home-7/wb-1",
        channel=Channel.DEVICE,
        source="wb-1",
        event_id=EVENT,
    ).after


def test_opening_yields_the_alert_and_its_audit_entry() -> None:
    opened = new_alert(
        alert_id=ID,
        site_id="home-7",
        device_id="wb-1",
        alert_type=AlertType.SOS,
        severity=Severity.CRITICAL,
        dedup_key="sos:home-7:wb-1",
        at=T0,
        actor="device:home-7/wb-1",
        channel=Channel.DEVICE,
        source="wb-1",
        event_id=EVENT,
    )
    expected = Alert(
        id=ID,
        site_id="home-7",
        device_id="wb-1",
        type=AlertType.SOS,
        severity=Severity.CRITICAL,
        status=AlertStatus.OPEN,
        dedup_key="sos:home-7:wb-1",
        opened_at=T0,
        last_seen_at=T0,
        escalation_anchor=T0,
        sources=frozenset({"wb-1"}),
        first_event_id=EVENT,
        last_event_id=EVENT,
    )
    assert opened == Transition(
        expected,
        expected,
        AuditEntry(
            T0,
            ID,
            "device:home-7/wb-1",
            AuditAction.OPENED,
            Channel.DEVICE,
            {
                "type": "sos",
                "severity": "critical",
                "dedup_key": "sos:home-7:wb-1",
                "site_id": "home-7",
                "device_id": "wb-1",
                "event_id": str(EVENT),
                "source": "wb-1",
            },
        ),
    )


def test_open_acknowledged_on_scene_resolved_with_who_when_and_channel() -> None:
    a0 = sos()
    t1, t2, t3 = T0 + timedelta(seconds=40), T0 + timedelta(minutes=9), T0 + timedelta(minutes=30)
    ack = transition(a0, acknowledge(STAFF, Channel.CONSOLE), t1)
    there = transition(ack.after, on_scene("staff:zhao.min", Channel.MESSAGING), t2)
    done = transition(there.after, resolve(STAFF, Channel.CONSOLE, Outcome.HANDLED, "ok"), t3)
    assert done.after == dataclasses.replace(
        a0,
        status=AlertStatus.RESOLVED,
        acknowledged_at=t1,
        acknowledged_by=STAFF,
        on_scene_at=t2,
        on_scene_by="staff:zhao.min",
        outcome=Outcome.HANDLED,
        resolved_at=t3,
        resolved_by=STAFF,
    )
    assert [ack.audit, there.audit, done.audit] == [
        AuditEntry(t1, ID, STAFF, AuditAction.ACKNOWLEDGED, Channel.CONSOLE,
                   {"from": "open", "to": "acknowledged"}),
        AuditEntry(t2, ID, "staff:zhao.min", AuditAction.ON_SCENE, Channel.MESSAGING,
                   {"from": "acknowledged", "to": "on_scene"}),
        AuditEntry(t3, ID, STAFF, AuditAction.RESOLVED, Channel.CONSOLE,
                   {"from": "on_scene", "to": "resolved", "outcome": "handled", "note": "ok"}),
    ]


def test_on_scene_without_acknowledgement_counts_as_acknowledged_too() -> None:
    t1 = T0 + timedelta(minutes=3)
    after = transition(sos(), on_scene(STAFF, Channel.CONSOLE), t1).after
    assert (after.status, after.acknowledged_at, after.acknowledged_by) == (
        AlertStatus.ON_SCENE,
        t1,
        STAFF,
    )


def test_a_second_acknowledgement_is_refused_with_a_clear_error() -> None:
    acked = transition(sos(), acknowledge(STAFF, Channel.CONSOLE), T0 + timedelta(seconds=5)).after
    with pytest.raises(IllegalTransition) as err:
        transition(acked, acknowledge("staff:zhao.min", Channel.CONSOLE), T0 + timedelta(seconds=6))
    assert str(err.value) == (
        f"cannot acknowledge alert {ID} (sos, status acknowledged): not from this status; "
        "acknowledge is allowed from ['open']"
    )
    assert (err.value.alert_id, err.value.status) == (ID, AlertStatus.ACKNOWLEDGED)


ILLEGAL = [
    (status, kind)
    for kind, table in TRANSITIONS.items()
    for status in AlertStatus
    if status not in table
]


@pytest.mark.parametrize(("status", "kind"), ILLEGAL)
def test_every_move_outside_the_table_is_refused(status: AlertStatus, kind: CommandKind) -> None:
    alert = dataclasses.replace(sos(), status=status)
    command = Command(kind, STAFF, Channel.CONSOLE, outcome=Outcome.HANDLED,
                      severity=Severity.CRITICAL, source="x")
    with pytest.raises(IllegalTransition, match=f"cannot {kind.value} alert"):
        transition(alert, command, T0 + timedelta(seconds=1))


def test_resolving_needs_an_outcome() -> None:
    with pytest.raises(IllegalTransition, match="resolving needs an outcome"):
        transition(sos(), Command(CommandKind.RESOLVE, STAFF, Channel.CONSOLE), T0)


def test_cancelled_by_resident_can_be_reopened_and_escalates_afresh() -> None:
    t1, t2 = T0 + timedelta(seconds=20), T0 + timedelta(minutes=2)
    cancelled = transition(
        sos(), resolve("device:home-7/wb-1", Channel.DEVICE, Outcome.CANCELLED_BY_RESIDENT), t1
    ).after
    back = transition(cancelled, reopen(STAFF, Channel.CONSOLE, "no answer on the phone"), t2)
    assert back.after == dataclasses.replace(sos(), epoch=1, escalation_anchor=t2)
    assert back.audit == AuditEntry(
        t2, ID, STAFF, AuditAction.REOPENED, Channel.CONSOLE,
        {"from": "resolved", "to": "open", "note": "no answer on the phone", "epoch": 1},
    )


def test_raising_severity_restarts_the_ladder_unless_someone_is_on_scene() -> None:
    warn = dataclasses.replace(sos(), type=AlertType.ELECTRICAL, severity=Severity.MINOR)
    acked = transition(warn, acknowledge(STAFF, Channel.CONSOLE), T0 + timedelta(seconds=5)).after
    up = Command(CommandKind.RAISE_SEVERITY, "system:rules", Channel.SYSTEM,
                 severity=Severity.MAJOR)
    t1 = T0 + timedelta(minutes=1)
    raised = transition(acked, up, t1).after
    assert (raised.status, raised.severity, raised.epoch, raised.escalation_anchor) == (
        AlertStatus.OPEN, Severity.MAJOR, 1, t1,
    )
    there = transition(warn, on_scene(STAFF, Channel.CONSOLE), T0 + timedelta(seconds=5)).after
    kept = transition(there, up, t1).after
    assert (kept.status, kept.severity, kept.epoch) == (AlertStatus.ON_SCENE, Severity.MAJOR, 0)
    with pytest.raises(IllegalTransition, match="is not above major"):
        transition(raised, up, t1)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        transition(sos(), acknowledge(STAFF, Channel.CONSOLE), datetime(2026, 11, 23, 2, 0))
