"""One unit of work, pure: an SOS from press to acknowledgement as transactions write it."""

from __future__ import annotations

import uuid
from collections.abc import Container
from datetime import UTC, datetime, timedelta

from alerting.downlink import ALARM_RECEIVED, COMMAND_NAMESPACE, HELP_COMING, Downlink
from alerting.engine import Effects, settle
from alerting.lifecycle import acknowledge, transition
from alerting.model import Alert, AuditAction, Channel
from alerting.planner import StepKey
from alerting.policy import EscalationPolicy, PolicyBook
from alerting.ports import ManualClock
from alerting.rules import EngineEvent, EventKind, Phase, decide

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
S = timedelta(seconds=1)
BOOK = PolicyBook()


def policy_for(alert: Alert) -> EscalationPolicy:
    return BOOK.resolve(["station-3", "street-2", "bureau-1"], alert.type, alert.severity)


class Store:
    """What the tables will hold between transactions: alerts, fired steps, timers."""

    def __init__(self) -> None:
        self.alerts: dict[uuid.UUID, Alert] = {}
        self.fired: set[StepKey] = set()
        self.timers: dict[uuid.UUID, datetime | None] = {}
        self.actions: list[AuditAction] = []
        self.downlinks: list[Downlink] = []

    def fired_for(self, alert: Alert) -> Container[StepKey]:
        return self.fired

    def write(self, effects: Effects) -> Effects:
        for t in effects.transitions:
            self.alerts[t.after.id] = t.after
            self.actions.append(t.audit.action)
        for _, step in effects.steps:
            assert step.key not in self.fired
            self.fired.add(step.key)
        self.timers.update(effects.next_step_at)
        self.downlinks += effects.downlinks
        return effects

    def due(self, now: datetime) -> list[Alert]:
        return [self.alerts[i] for i, at in self.timers.items() if at is not None and at <= now]


def test_an_sos_from_press_to_acknowledgement() -> None:
    clock, store = ManualClock(T0), Store()
    press = EngineEvent(uuid.uuid4(), "home-7", "cb-1", EventKind.SOS, Phase.PULSE, T0, "es-cb1")
    decision = decide(press, {})
    first = store.write(settle(decision.transitions, policy_for, store.fired_for, clock.now()))
    (alert,) = first.alerts.values()
    assert [t.audit.action for t in first.transitions] == [
        AuditAction.OPENED,
        AuditAction.ESCALATED,
    ]
    assert [(s.level, s.at) for _, s in first.steps] == [(0, T0)]
    assert first.downlinks == (
        Downlink("home-7", "cb-1", uuid.uuid5(COMMAND_NAMESPACE, f"{alert.id}/0/{ALARM_RECEIVED}"),
                 ALARM_RECEIVED, alert.id),
    )
    assert first.next_step_at == ((alert.id, T0 + 60 * S),)

    # The timer wakes at 60 s (and a second server waking at the same time finds nothing).
    clock.advance(60 * S)
    claimed = store.due(clock.now())
    assert [a.id for a in claimed] == [alert.id]
    rung = store.write(settle((), policy_for, store.fired_for, clock.now(), claimed))
    assert [(s.level, s.at) for _, s in rung.steps] == [(1, T0 + 60 * S)]
    again = settle((), policy_for, store.fired_for, clock.now(), claimed)
    assert again.steps == ()

    # Staff acknowledge at 90 s: the button hears "help is coming", the ladder stops.
    clock.advance(30 * S)
    ack = transition(store.alerts[alert.id], acknowledge("staff:wang.li", Channel.CONSOLE),
                     clock.now())
    done = store.write(settle((ack,), policy_for, store.fired_for, clock.now()))
    assert done.steps == ()
    assert [d.action for d in done.downlinks] == [HELP_COMING]
    assert done.next_step_at == ((alert.id, T0 + 90 * S + 10 * 60 * S),)
    assert store.alerts[alert.id].level == 1
    assert store.actions == [
        AuditAction.OPENED,
        AuditAction.ESCALATED,
        AuditAction.ESCALATED,
        AuditAction.ACKNOWLEDGED,
    ]
