"""Escalation by hand (issue 8): staff call the next rung now; the planner fires it once and
the ladder keeps its spacing from there. Injected clock, the same timer as the ladder's tests."""

from __future__ import annotations

import pytest
from test_alerting_escalation import PAGE, STAFF, T0, M, S, Timer, raise_alert, step

from alerting.lifecycle import IllegalTransition, acknowledge, transition
from alerting.model import AlertStatus, AuditAction, Channel
from alerting.planner import StepKind, escalate_by_hand, next_step_at
from alerting.policy import CRITICAL, Role
from alerting.ports import ManualClock
from alerting.rules import EventKind

ACK = AlertStatus.ACKNOWLEDGED


def test_escalating_at_20s_fires_the_supervisor_rung_now_and_the_ladder_goes_on_from_it() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.SOS)
    timer = Timer(alert, CRITICAL, clock)
    timer.tick()
    timer.run_until(20 * S)
    change = timer.act(
        lambda: escalate_by_hand(timer.alert, CRITICAL, STAFF, Channel.CONSOLE, "cannot go")
    )
    assert change.audit.action is AuditAction.ESCALATED and change.audit.actor == STAFF
    assert change.audit.detail["level"] == 1 and change.audit.detail["note"] == "cannot go"
    assert change.after.status is AlertStatus.OPEN
    # level 1 fired at 20 s (its key, so the 60 s timer finds it fired); street 2 min later
    timer.run_until(4 * M)
    fired = [(at, s.key.kind, s.level) for at, s in timer.log]
    assert fired == [(0 * S, StepKind.LEVEL, 0), (20 * S, StepKind.LEVEL, 1),
                     (20 * S + 2 * M, StepKind.LEVEL, 2)]
    assert timer.log[1][1].key == step(alert, StepKind.LEVEL, 1, 60 * S,
                                       (Role.SUPERVISOR, Role.FAMILY), PAGE, ACK).key
    assert timer.alert.level == 2


def test_escalating_twice_climbs_two_rungs_and_the_top_refuses() -> None:
    clock = ManualClock(T0)
    timer = Timer(raise_alert(EventKind.FALL), CRITICAL, clock)
    timer.tick()
    for _ in range(3):
        clock.advance(S)
        timer.act(lambda: escalate_by_hand(timer.alert, CRITICAL, STAFF, Channel.CONSOLE, ""))
    assert timer.alert.level == 3
    assert [s.level for _, s in timer.log] == [0, 1, 2, 3]
    with pytest.raises(IllegalTransition, match="top of policy critical"):
        escalate_by_hand(timer.alert, CRITICAL, STAFF, Channel.CONSOLE, "")
    # the top rung repeats 10 min after it fired, as it would have
    assert next_step_at(timer.alert, CRITICAL, timer.fired, clock.now()) == clock.now() + 10 * M


def test_an_acknowledged_alert_cannot_be_escalated_by_hand() -> None:
    clock = ManualClock(T0)
    timer = Timer(raise_alert(EventKind.SOS), CRITICAL, clock)
    timer.tick()
    timer.act(lambda: acknowledge(STAFF, Channel.CONSOLE))
    command = escalate_by_hand(timer.alert, CRITICAL, STAFF, Channel.CONSOLE, "")
    with pytest.raises(IllegalTransition, match="escalate is allowed from \\['open'\\]"):
        transition(timer.alert, command, clock.now())
