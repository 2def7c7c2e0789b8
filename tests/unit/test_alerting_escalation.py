"""Escalation with an injected clock: the ladder, the acknowledgement, the 15-minute service circle.

The pure half of issue 7's acceptance: each scenario drives the planner second
by second (``ManualClock``) the way the durable timer will, and compares the
steps that fired, and when, with complete expected ``Step`` objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.downlink import HELP_COMING, Downlink, command_for
from alerting.lifecycle import (
    Command,
    Transition,
    acknowledge,
    on_scene,
    reopen,
    resolve,
    transition,
)
from alerting.model import Alert, AlertStatus, AlertType, Channel, Outcome, Severity
from alerting.planner import (
    Step,
    StepKey,
    StepKind,
    due_steps,
    fire_step,
    next_step,
    next_step_at,
)
from alerting.policy import (
    CRITICAL,
    MAJOR,
    MINOR,
    SMOKE,
    EscalationPolicy,
    Level,
    PolicyBook,
    PolicySet,
    Role,
)
from alerting.ports import ManualClock
from alerting.rules import EngineEvent, EventKind, Phase, decide

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
PAGE = (Channel.CONSOLE, Channel.MESSAGING, Channel.VOICE)
STAFF = "staff:wang.li"
S = timedelta(seconds=1)
M = timedelta(minutes=1)


def raise_alert(kind: EventKind, device: str = "wb-1", at: datetime = T0) -> Alert:
    event = EngineEvent(uuid.uuid4(), "home-7", device, kind, Phase.PULSE, at, "es-wb1")
    (opened,) = decide(event, {}).transitions
    return opened.after


class Timer:
    """The durable timer as the next session will run it: wake at next_step_at, fire, record."""

    def __init__(self, alert: Alert, policy: EscalationPolicy, clock: ManualClock) -> None:
        self.alert, self.policy, self.clock = alert, policy, clock
        self.fired: dict[StepKey, datetime] = {}
        self.log: list[tuple[timedelta, Step]] = []
        self.changes: list[Transition] = []

    def tick(self) -> None:
        now = self.clock.now()
        for step in due_steps(self.alert, self.policy, self.fired, now):
            assert step.key not in self.fired
            change = fire_step(self.alert, step, now)
            self.alert = change.after
            self.fired[step.key] = now
            self.log.append((now - T0, step))

    def act(self, command: Callable[[], Command]) -> Transition:
        change = transition(self.alert, command(), self.clock.now())
        self.alert = change.after
        self.changes.append(change)
        self.tick()  # the engine plans in the same transaction as the change
        return change

    def run_until(self, offset: timedelta, every: timedelta = S) -> None:
        while self.clock.now() - T0 < offset:
            self.clock.advance(every)
            self.tick()


def step(
    alert: Alert,
    kind: StepKind,
    level: int,
    at: timedelta,
    roles: tuple[Role, ...],
    channels: tuple[Channel, ...],
    until: AlertStatus,
    n: int = 0,
    epoch: int = 0,
) -> Step:
    return Step(StepKey(alert.id, epoch, kind, level, n), T0 + at, roles, channels, until)


ACK = AlertStatus.ACKNOWLEDGED


def test_unacknowledged_sos_climbs_the_ladder_at_0_60s_3min_5min() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.SOS)
    timer = Timer(alert, CRITICAL, clock)
    timer.tick()
    timer.run_until(6 * M)
    assert timer.log == [
        (0 * S, step(alert, StepKind.LEVEL, 0, 0 * S, (Role.DUTY,), PAGE, ACK)),
        (60 * S, step(alert, StepKind.LEVEL, 1, 60 * S, (Role.SUPERVISOR, Role.FAMILY), PAGE, ACK)),
        (3 * M, step(alert, StepKind.LEVEL, 2, 3 * M, (Role.STREET,), PAGE, ACK)),
        (5 * M, step(alert, StepKind.LEVEL, 3, 5 * M, (Role.BUREAU,), (Channel.WEBHOOK,), ACK)),
    ]
    assert timer.alert.level == 3
    # The top rung is paged again every 10 min until someone takes charge.
    assert next_step_at(timer.alert, CRITICAL, timer.fired, clock.now()) == T0 + 15 * M


def test_acknowledged_at_90s_stops_at_level_1_and_tells_the_wristband() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.SOS)
    timer = Timer(alert, CRITICAL, clock)
    timer.tick()
    timer.run_until(90 * S)
    ack = timer.act(lambda: acknowledge(STAFF, Channel.CONSOLE))
    timer.run_until(10 * M)
    assert [(at, s.key.kind, s.level) for at, s in timer.log] == [
        (0 * S, StepKind.LEVEL, 0),
        (60 * S, StepKind.LEVEL, 1),
    ]
    assert timer.alert.level == 1
    assert command_for(ack) == Downlink(
        "home-7",
        "wb-1",
        uuid.uuid5(uuid.UUID("6b1f2f4e-6c1e-4a55-9d0a-0d5e1a7e0002"), f"{alert.id}/0/acknowledge"),
        HELP_COMING,
        alert.id,
    )
    # Next: the first reminder 10 min after the acknowledgement.
    assert next_step_at(timer.alert, CRITICAL, timer.fired, clock.now()) == T0 + 90 * S + 10 * M


def test_smoke_informs_the_bureau_at_once() -> None:
    alert = raise_alert(EventKind.SMOKE, device="sd-1")
    policy = PolicyBook().resolve(["station-3", "street-2", "bureau-1"], alert.type, alert.severity)
    assert policy is SMOKE
    assert due_steps(alert, policy, set(), T0) == (
        step(
            alert,
            StepKind.LEVEL,
            0,
            0 * S,
            (Role.DUTY, Role.BUREAU),
            (*PAGE, Channel.WEBHOOK),
            ACK,
        ),
    )


def test_acknowledged_fall_reminds_at_10_min_and_escalates_at_15_without_on_scene() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.FALL)
    timer = Timer(alert, CRITICAL, clock)
    timer.tick()
    timer.run_until(30 * S)
    timer.act(lambda: acknowledge(STAFF, Channel.MESSAGING))
    timer.run_until(16 * M)
    ack = 30 * S
    remind = (Role.ACKNOWLEDGER,), (Channel.CONSOLE, Channel.MESSAGING)
    assert timer.log == [
        (0 * S, step(alert, StepKind.LEVEL, 0, 0 * S, (Role.DUTY,), PAGE, ACK)),
        (ack + 10 * M, step(alert, StepKind.REMINDER, 0, ack + 10 * M, *remind,
                            AlertStatus.RESOLVED, n=1)),
        # Nobody on scene 15 min after the acknowledgement: one rung up (supervisor, family).
        (ack + 15 * M, step(alert, StepKind.SERVICE_CIRCLE, 1, ack + 15 * M,
                            (Role.SUPERVISOR, Role.FAMILY), PAGE, AlertStatus.ON_SCENE)),
    ]
    assert timer.alert.level == 1
    timer.act(lambda: on_scene(STAFF, Channel.CONSOLE))
    timer.run_until(21 * M)
    assert timer.log[-1] == (
        ack + 20 * M,
        step(alert, StepKind.REMINDER, 0, ack + 20 * M, *remind, AlertStatus.RESOLVED, n=2),
    )
    timer.act(lambda: resolve(STAFF, Channel.CONSOLE, Outcome.SENT_TO_HOSPITAL))
    timer.run_until(60 * M)
    assert len(timer.log) == 4
    assert next_step_at(timer.alert, CRITICAL, timer.fired, clock.now()) is None


def test_on_scene_within_15_min_means_no_service_circle_step() -> None:
    clock = ManualClock(T0)
    timer = Timer(raise_alert(EventKind.SOS), CRITICAL, clock)
    timer.tick()
    timer.run_until(20 * S)
    timer.act(lambda: acknowledge(STAFF, Channel.CONSOLE))
    timer.run_until(14 * M)
    timer.act(lambda: on_scene(STAFF, Channel.CONSOLE))
    timer.run_until(30 * M)
    kinds = [s.kind for _, s in timer.log]
    assert StepKind.SERVICE_CIRCLE not in kinds
    assert kinds == [StepKind.LEVEL, StepKind.REMINDER, StepKind.REMINDER]


def test_major_ladder_is_5_15_30_minutes() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.GEOFENCE_EXIT)
    assert (alert.type, alert.severity) == (AlertType.WANDERING, Severity.MAJOR)
    timer = Timer(alert, MAJOR, clock)
    timer.tick()
    timer.run_until(40 * M, every=10 * S)
    assert [(at, s.level, s.roles) for at, s in timer.log] == [
        (0 * S, 0, (Role.DUTY,)),
        (5 * M, 1, (Role.SUPERVISOR,)),
        (15 * M, 2, (Role.STREET,)),
        (30 * M, 3, (Role.BUREAU,)),
    ]


def test_minor_falls_back_after_2_hours_unresolved_even_if_acknowledged() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.LOW_BATTERY)
    timer = Timer(alert, MINOR, clock)
    timer.tick()
    timer.run_until(10 * M, every=M)
    timer.act(lambda: acknowledge(STAFF, Channel.CONSOLE))
    timer.run_until(3 * 60 * M, every=M)
    assert timer.log == [
        (0 * S, step(alert, StepKind.LEVEL, 0, 0 * S, (Role.DUTY,), (Channel.CONSOLE,),
                     AlertStatus.RESOLVED)),
        (120 * M, step(alert, StepKind.LEVEL, 1, 120 * M, (Role.SUPERVISOR,),
                       (Channel.CONSOLE, Channel.MESSAGING), AlertStatus.RESOLVED)),
    ]


def test_a_late_timer_catches_up_every_missed_rung_once_in_order() -> None:
    alert = raise_alert(EventKind.SOS)
    fired: set[StepKey] = set()
    due = due_steps(alert, CRITICAL, fired, T0 + 4 * M)  # the servers were down for 4 min
    assert [s.level for s in due] == [0, 1, 2]
    fired |= {s.key for s in due}
    assert due_steps(alert, CRITICAL, fired, T0 + 4 * M) == ()
    assert next_step_at(alert, CRITICAL, fired, T0 + 4 * M) == T0 + 5 * M


def test_reopen_restarts_the_ladder_with_new_step_ids() -> None:
    clock = ManualClock(T0)
    alert = raise_alert(EventKind.SOS)
    timer = Timer(alert, CRITICAL, clock)
    timer.tick()
    timer.run_until(10 * S)
    timer.act(lambda: resolve("device:home-7/wb-1", Channel.DEVICE, Outcome.CANCELLED_BY_RESIDENT))
    timer.run_until(20 * S)
    timer.act(lambda: reopen(STAFF, Channel.CONSOLE, "resident did not answer the phone"))
    timer.run_until(90 * S)
    assert [(at, s.key.epoch, s.level) for at, s in timer.log] == [
        (0 * S, 0, 0),
        (20 * S, 1, 0),
        (80 * S, 1, 1),
    ]


def test_unit_overrides_win_over_parents_and_defaults() -> None:
    fast = EscalationPolicy(
        "station-fast",
        (Level(timedelta(0), (Role.DUTY,), PAGE), Level(30 * S, (Role.STREET,), PAGE)),
    )
    street = EscalationPolicy("street", (Level(timedelta(0), (Role.DUTY,), PAGE),))
    book = PolicyBook(
        {
            "station-3": PolicySet(by_type={(AlertType.FALL, Severity.CRITICAL): fast}),
            "street-2": PolicySet(by_severity={Severity.CRITICAL: street}),
        }
    )
    path = ["station-3", "street-2", "bureau-1"]
    assert book.resolve(path, AlertType.FALL, Severity.CRITICAL) is fast
    assert book.resolve(path, AlertType.SOS, Severity.CRITICAL) is street
    assert book.resolve(path, AlertType.SMOKE, Severity.CRITICAL) is street
    assert book.resolve(["station-9", "street-5"], AlertType.SMOKE, Severity.CRITICAL) is SMOKE
    assert book.resolve(path, AlertType.TAMPER, Severity.MINOR) is MINOR


# --- the planner never fires a step twice and never skips one -------------------------

# A unit's policy whose ladder runs until resolved (acknowledging does not stop it),
# with reminders and the service circle as well.
UNTIL_RESOLVED = EscalationPolicy(
    "until-resolved",
    (
        Level(timedelta(0), (Role.DUTY,), PAGE),
        Level(20 * M, (Role.SUPERVISOR,), PAGE),
        Level(60 * M, (Role.STREET,), PAGE),
    ),
    ladder_until=AlertStatus.RESOLVED,
    repeat_top_every=30 * M,
    remind_every=7 * M,
    on_scene_within=15 * M,
)
POLICIES = st.sampled_from([CRITICAL, SMOKE, MAJOR, MINOR, UNTIL_RESOLVED])
SECONDS = st.integers(min_value=0, max_value=3 * 3600)


@settings(max_examples=300, deadline=None)
@given(
    policy=POLICIES,
    ticks=st.lists(SECONDS, min_size=1, max_size=40),
    ack=st.one_of(st.none(), SECONDS),
    scene_after=st.one_of(st.none(), st.integers(min_value=0, max_value=3600)),
    resolve_after=st.one_of(st.none(), st.integers(min_value=0, max_value=7200)),
)
def test_planner_fires_each_wanted_step_once_at_the_first_tick_after_it(
    policy: EscalationPolicy,
    ticks: list[int],
    ack: int | None,
    scene_after: int | None,
    resolve_after: int | None,
) -> None:
    alert = raise_alert(EventKind.SOS)
    events: list[tuple[int, Callable[[], Command]]] = []
    if ack is not None:
        events.append((ack, lambda: acknowledge(STAFF, Channel.CONSOLE)))
        if scene_after is not None:
            events.append((ack + scene_after, lambda: on_scene(STAFF, Channel.CONSOLE)))
        if resolve_after is not None:
            at = ack + (scene_after or 0) + resolve_after
            events.append((at, lambda: resolve(STAFF, Channel.CONSOLE, Outcome.HANDLED)))
    # Events at the same second as a tick are applied first (the order the store sees).
    timeline = sorted(
        [(t, 0, i) for i, (t, _) in enumerate(events)] + [(t, 1, -1) for t in sorted(set(ticks))]
    )
    fired: dict[StepKey, tuple[int, Step]] = {}
    tick_times: list[int] = []
    for t, is_tick, i in timeline:
        now = T0 + t * S
        if not is_tick:
            alert = transition(alert, events[i][1](), now).after
            continue
        tick_times.append(t)
        for s in due_steps(alert, policy, fired, now):
            assert s.key not in fired, "a step fired twice"
            alert = fire_step(alert, s, now).after
            fired[s.key] = (t, s)
        upcoming = next_step_at(alert, policy, fired, now)
        assert upcoming is None or upcoming > now
    final = T0 + tick_times[-1] * S
    wanted = {s.key: s for s in due_steps(alert, policy, set(), final)}
    assert set(fired) == set(wanted), "a wanted step was skipped or an unwanted one fired"
    for t, s in fired.values():
        first_tick = min(x for x in tick_times if T0 + x * S >= s.at)
        assert t == first_tick, "a step fired later than the first tick after its time"


def test_next_step_says_when_which_level_whom_and_through_which_channels() -> None:
    alert = raise_alert(EventKind.SOS)
    fired = {s.key for s in due_steps(alert, CRITICAL, set(), T0 + 70 * S)}
    assert next_step(alert, CRITICAL, fired, T0 + 70 * S) == step(
        alert, StepKind.LEVEL, 2, 3 * M, (Role.STREET,), PAGE, ACK
    )
    # A late timer: the earliest unfired step, already due.
    assert next_step(alert, CRITICAL, set(), T0 + 70 * S) == step(
        alert, StepKind.LEVEL, 0, 0 * S, (Role.DUTY,), PAGE, ACK
    )


def test_the_service_circle_climbs_from_the_rung_reached_when_it_fires() -> None:
    slow = UNTIL_RESOLVED
    alert = transition(
        raise_alert(EventKind.FALL), acknowledge(STAFF, Channel.CONSOLE), T0 + M
    ).after
    circle = [s for s in due_steps(alert, slow, set(), T0 + 16 * M)
              if s.kind is StepKind.SERVICE_CIRCLE]
    # At 16 min only rung 0 had been reached: the circle calls rung 1, not the top.
    assert circle == [step(alert, StepKind.SERVICE_CIRCLE, 1, 16 * M, (Role.SUPERVISOR,), PAGE,
                           AlertStatus.ON_SCENE)]
