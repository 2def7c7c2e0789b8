"""An event stamped in the future (a device clock ahead, up to the contract's 24 h) starts
its ladder at the engine's ``now``: the first rung goes out at once, the next on time."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from alerting.engine import settle
from alerting.model import Alert, AlertStatus
from alerting.planner import StepKey
from alerting.policy import EscalationPolicy, PolicyBook
from alerting.rules import ConditionSignal, EngineEvent, EventKind, Phase, decide, decide_signal

NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
BOOK = PolicyBook()


def sos(at: datetime) -> EngineEvent:
    return EngineEvent(uuid.uuid4(), "home-7", "wb-1", EventKind.SOS, Phase.PULSE, at, "es-wb1")


@pytest.mark.parametrize("ahead", [timedelta(seconds=5), timedelta(hours=23, minutes=59)])
def test_a_future_event_opens_its_alert_now_and_fires_the_first_rung_at_once(
    ahead: timedelta,
) -> None:
    decision = decide(sos(NOW + ahead), {}, now=NOW)
    opened = decision.transitions[0].after
    assert opened.escalation_anchor == NOW
    assert opened.opened_at == NOW and opened.status is AlertStatus.OPEN

    def policy(alert: Alert) -> EscalationPolicy:
        return BOOK.resolve(["s"], alert.type, alert.severity)

    nothing: frozenset[StepKey] = frozenset()
    first = settle(decision.transitions, policy, lambda _a: nothing, NOW)
    assert [step.key.level for _, step in first.steps] == [0]
    plan = dict(first.next_step_at)
    assert plan[opened.id] == NOW + timedelta(seconds=60)  # the supervisor rung, on time


def test_a_past_event_keeps_its_own_time_so_a_late_delivery_catches_up() -> None:
    late = NOW - timedelta(minutes=2)
    opened = decide(sos(late), {}, now=NOW).transitions[0].after
    assert opened.escalation_anchor == late


def test_a_future_reading_raises_its_condition_now() -> None:
    signal = ConditionSignal("residual_current", "home-7", "ef-1", "ef-1/residual_current_ma",
                             True, NOW + timedelta(hours=3))  # fmt: skip
    opened = decide_signal(signal, {}, now=NOW).transitions[0].after
    assert opened.escalation_anchor == NOW


def test_a_naive_engine_time_is_refused() -> None:
    with pytest.raises(ValueError, match="engine time"):
        decide(sos(NOW), {}, now=NOW.replace(tzinfo=None))
