"""One unit of work, pure: from alert changes to everything the transaction must write.

The store's transaction (next session) does: lock → ``rules.decide`` or a
console command → ``settle`` → write what ``settle`` returns → commit. Keeping
this step pure means the whole sequence of an event (open, first rung, the
wristband's "alarm received", the timer's next wake-up) is tested here with an
injected clock, and the PostgreSQL code only persists it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import datetime

from alerting.downlink import Downlink, command_for
from alerting.lifecycle import Transition
from alerting.model import Alert
from alerting.planner import Step, StepKey, due_steps, fire_step, next_step_at
from alerting.policy import EscalationPolicy


@dataclass(frozen=True, slots=True)
class Effects:
    """What to write, in order: transitions (each with its audit entry), the steps whose
    notices go to the outbox, downlink commands, and each alert's ``next_step_at``."""

    transitions: tuple[Transition, ...] = ()
    steps: tuple[tuple[Alert, Step], ...] = ()
    downlinks: tuple[Downlink, ...] = ()
    next_step_at: tuple[tuple[uuid.UUID, datetime | None], ...] = ()

    @property
    def alerts(self) -> dict[uuid.UUID, Alert]:
        """The final state of each alert touched."""
        return {t.after.id: t.after for t in self.transitions}


def settle(
    changes: Sequence[Transition],
    policy_for: Callable[[Alert], EscalationPolicy],
    fired_for: Callable[[Alert], Container[StepKey]],
    now: datetime,
    claimed: Sequence[Alert] = (),
) -> Effects:
    """Fire the steps that are due for the alerts the changes touched (a new alert's first
    rung at once) and for alerts a timer ``claimed``, and plan each one's next wake-up.
    ``fired_for`` gives the step keys already recorded for an alert (none for a new one)."""
    transitions = list(changes)
    downlinks = [d for d in (command_for(t) for t in changes) if d is not None]
    latest: dict[uuid.UUID, Alert] = {a.id: a for a in claimed}
    latest.update((t.after.id, t.after) for t in changes)
    steps: list[tuple[Alert, Step]] = []
    plans: list[tuple[uuid.UUID, datetime | None]] = []
    for alert_id, alert in latest.items():
        policy = policy_for(alert)
        recorded = fired_for(alert)
        fired_now: set[StepKey] = set()
        for step in due_steps(alert, policy, recorded, now):
            change = fire_step(alert, step, now)
            transitions.append(change)
            steps.append((alert, step))
            fired_now.add(step.key)
            alert = change.after
        plans.append(
            (alert_id, next_step_at(alert, policy, _Union(recorded, fired_now), now))
        )
    return Effects(tuple(transitions), tuple(steps), tuple(downlinks), tuple(plans))


class _Union:
    """Membership in either of two containers (recorded before, fired now)."""

    def __init__(self, a: Container[StepKey], b: Container[StepKey]) -> None:
        self.a, self.b = a, b

    def __contains__(self, key: object) -> bool:
        return key in self.a or key in self.b
