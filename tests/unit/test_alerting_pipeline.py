"""The notification pipeline: stages with one signature, recoverable errors, channel fallback.

The notifier channels here are in-memory doubles of the ``NotifierChannel``
port (the real ones — Apprise, the voice provider, the bureau webhook — are
wired and tested against real receivers by the next step of issue 7).
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.model import Alert, AlertStatus, AlertType, AuditAction, AuditEntry, Channel
from alerting.pipeline import (
    Batch,
    Dedup,
    Delivery,
    DeliveryLedger,
    Dropped,
    Escalate,
    Group,
    Mute,
    Notice,
    Notify,
    PlannedStep,
    Recipient,
    RetrySchedule,
    Silence,
    Unstaffed,
    default_stages,
    run_stages,
)
from alerting.planner import Step, due_steps
from alerting.policy import PolicyBook, Role
from alerting.ports import DeliveryError, NotifierChannel, Receipt
from alerting.rules import EngineEvent, EventKind, Phase, decide

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
S = timedelta(seconds=1)

WANG = Recipient(
    "staff:wang.li",
    Role.DUTY,
    {
        Channel.CONSOLE: "wang.li",
        Channel.MESSAGING: "dingtalk://token-wang",
        Channel.VOICE: "+8613800000001",
    },
)
ZHAO = Recipient(
    "staff:zhao.min",
    Role.SUPERVISOR,
    {Channel.CONSOLE: "zhao.min", Channel.MESSAGING: "wecom://token-zhao"},
)
FAMILY = Recipient("family:li.hua", Role.FAMILY, {Channel.VOICE: "+8613900000002"})
BUREAU = Recipient("bureau:district-1", Role.BUREAU, {Channel.WEBHOOK: "https://bureau.invalid/h"})
ROSTER: Mapping[Role, tuple[Recipient, ...]] = {
    Role.DUTY: (WANG,),
    Role.SUPERVISOR: (ZHAO, WANG),  # Wang is also supervisor tonight: one notice, not two
    Role.FAMILY: (FAMILY,),
    Role.BUREAU: (BUREAU,),
}


def alert_of(kind: EventKind, device: str = "wb-1", site: str = "home-7") -> Alert:
    event = EngineEvent(uuid.uuid4(), site, device, kind, Phase.RAISE, T0, "es-wb1")
    return decide(event, {}).alerts[0]


def planned(alert: Alert, at: datetime = T0, level: int | None = None) -> list[PlannedStep]:
    policy = PolicyBook().resolve(["station-1"], alert.type, alert.severity)
    steps: Sequence[Step] = due_steps(alert, policy, set(), at)
    if level is not None:
        steps = [s for s in steps if s.level == level]
    return [PlannedStep(alert, s, ROSTER) for s in steps]


class Scripted:
    """A notifier port double: answers from a script (the last answer repeats)."""

    def __init__(self, *answers: Receipt | Exception) -> None:
        self.answers = answers
        self.sent: list[Notice] = []

    async def send(self, notice: Notice) -> Receipt:
        self.sent.append(notice)
        answer = self.answers[min(len(self.sent), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def drive(
    steps: list[PlannedStep],
    channels: Mapping[Channel, NotifierChannel],
    ledger: DeliveryLedger | None = None,
    horizon: timedelta = timedelta(hours=1),
) -> tuple[list[Delivery], list[Dropped]]:
    """Run the pipeline, then re-run it for the deferred notices as the outbox would."""
    stages = default_stages(ledger or DeliveryLedger(), channels)
    batch = await run_stages(stages, Batch(T0, steps=tuple(steps)))
    deliveries, dropped = list(batch.deliveries), list(batch.dropped)
    while batch.deferred:
        now = min(n.not_before for n in batch.deferred)
        assert now - T0 <= horizon
        batch = await run_stages(stages, Batch(now, pending=batch.deferred))
        deliveries += batch.deliveries
        dropped += batch.dropped
    return deliveries, dropped


def timeline(deliveries: list[Delivery]) -> list[tuple[timedelta, str, Channel, int, bool]]:
    return [
        (d.at - T0, d.notice.person_id, d.notice.channel, d.notice.attempt + 1, d.delivered)
        for d in deliveries
    ]


async def test_escalate_expands_roles_to_people_each_on_their_first_channel() -> None:
    alert = alert_of(EventKind.SOS)
    (step,) = planned(alert, T0 + 60 * S, level=1)
    batch = await Escalate()(Batch(T0 + 60 * S, steps=(step,)))
    common = dict(
        alert_id=alert.id,
        alert_type=AlertType.SOS,
        severity=alert.severity,
        site_id="home-7",
        step_id=f"{alert.id}/0/level/1/0",
        level=1,
        text="【升级】紧急呼叫：home-7 的老人按下了求助按钮，请立即处理。",
        until=AlertStatus.ACKNOWLEDGED,
        not_before=T0 + 60 * S,
        channel_since=T0 + 60 * S,
    )
    assert batch == Batch(
        T0 + 60 * S,
        pending=(
            Notice(
                person_id="staff:zhao.min",
                role=Role.SUPERVISOR,
                channel=Channel.CONSOLE,
                target="zhao.min",
                fallback=((Channel.MESSAGING, "wecom://token-zhao"),),
                **common,  # type: ignore[arg-type]
            ),
            Notice(
                person_id="staff:wang.li",
                role=Role.SUPERVISOR,
                channel=Channel.CONSOLE,
                target="wang.li",
                fallback=(
                    (Channel.MESSAGING, "dingtalk://token-wang"),
                    (Channel.VOICE, "+8613800000001"),
                ),
                **common,  # type: ignore[arg-type]
            ),
            Notice(
                person_id="family:li.hua",
                role=Role.FAMILY,
                channel=Channel.VOICE,
                target="+8613900000002",
                **common,  # type: ignore[arg-type]
            ),
        ),
    )


async def test_smoke_reaches_the_bureau_webhook_at_once() -> None:
    alert = alert_of(EventKind.SMOKE, device="sd-1")
    webhook, console = Scripted(Receipt(True, "bureau-receipt-1")), Scripted(Receipt(True))
    deliveries, _ = await drive(planned(alert), {Channel.WEBHOOK: webhook,
                                                 Channel.CONSOLE: console})
    assert timeline(deliveries) == [
        (0 * S, "staff:wang.li", Channel.CONSOLE, 1, True),
        (0 * S, "bureau:district-1", Channel.WEBHOOK, 1, True),
    ]
    assert webhook.sent[0].text == "火警：home-7 烟感报警，请立即处理。"
    assert deliveries[1].audit() == AuditEntry(
        T0, alert.id, "system:notifier", AuditAction.NOTIFIED, Channel.WEBHOOK,
        {"step": f"{alert.id}/0/level/0/0", "person": "bureau:district-1", "role": "bureau",
         "target": "https://bureau.invalid/h", "attempt": 1, "confirmed": True,
         "reference": "bureau-receipt-1"},
    )


async def test_a_failing_console_falls_back_to_messaging_then_voice_within_30_s() -> None:
    alert = alert_of(EventKind.FALL)
    console = Scripted(DeliveryError("session gone", recoverable=True))
    messaging = Scripted(DeliveryError("dingtalk token revoked", recoverable=False))
    voice = Scripted(Receipt(confirmed=True, reference="call-1"))
    deliveries, dropped = await drive(
        planned(alert, level=0),
        {Channel.CONSOLE: console, Channel.MESSAGING: messaging, Channel.VOICE: voice},
    )
    # Console retried at +2 s and +7 s (the next backoff, 10 s, would pass its 15 s
    # window); messaging fails for good, so voice is called at once.
    assert timeline(deliveries) == [
        (0 * S, "staff:wang.li", Channel.CONSOLE, 1, False),
        (2 * S, "staff:wang.li", Channel.CONSOLE, 2, False),
        (7 * S, "staff:wang.li", Channel.CONSOLE, 3, False),
        (7 * S, "staff:wang.li", Channel.MESSAGING, 1, False),
        (7 * S, "staff:wang.li", Channel.VOICE, 1, True),
    ]
    assert dropped == []
    assert voice.sent[0].text == "跌倒报警：home-7 的老人可能跌倒，请立即处理。"
    assert [d.audit().action for d in deliveries] == [AuditAction.DELIVERY_FAILED] * 4 + [
        AuditAction.NOTIFIED
    ]
    assert deliveries[3].audit().detail["error"] == "dingtalk token revoked"
    assert deliveries[3].audit().detail["recoverable"] is False


async def test_an_unconfirmed_delivery_moves_on_after_the_channels_window() -> None:
    alert = alert_of(EventKind.SOS)
    console, messaging = Scripted(Receipt(confirmed=False)), Scripted(Receipt(confirmed=False))
    voice = Scripted(Receipt(confirmed=True))
    deliveries, _ = await drive(
        planned(alert, level=0),
        {Channel.CONSOLE: console, Channel.MESSAGING: messaging, Channel.VOICE: voice},
    )
    assert timeline(deliveries) == [
        (0 * S, "staff:wang.li", Channel.CONSOLE, 1, True),
        (15 * S, "staff:wang.li", Channel.MESSAGING, 1, True),
        (45 * S, "staff:wang.li", Channel.VOICE, 1, True),
    ]


async def test_the_fallback_is_dropped_once_the_alert_is_acknowledged() -> None:
    alert = alert_of(EventKind.SOS)
    console = Scripted(Receipt(confirmed=False))
    stages = default_stages(DeliveryLedger(), {Channel.CONSOLE: console})
    first = await run_stages(stages, Batch(T0, steps=tuple(planned(alert, level=0))))
    (fallback,) = first.deferred
    assert (fallback.channel, fallback.not_before) == (Channel.MESSAGING, T0 + 15 * S)
    acked = DeliveryLedger(status={alert.id: AlertStatus.ACKNOWLEDGED})
    later = await run_stages(default_stages(acked, {}), Batch(T0 + 15 * S, pending=(fallback,)))
    assert later == Batch(
        T0 + 15 * S, dropped=(Dropped(fallback, "dedup", "alert is acknowledged"),)
    )


async def test_the_bureau_webhook_is_retried_with_backoff_for_as_long_as_it_is_down() -> None:
    alert = alert_of(EventKind.SMOKE, device="sd-1")
    down = DeliveryError("503 from the safety network", recoverable=True)
    webhook = Scripted(down, down, down, down, down, down, down, Receipt(True))
    steps = [p for p in planned(alert) if p.step.level == 0]
    deliveries, dropped = await drive(
        steps, {Channel.WEBHOOK: webhook, Channel.CONSOLE: Scripted(Receipt(True))}
    )
    hook = [d for d in deliveries if d.notice.channel is Channel.WEBHOOK]
    assert [(d.at - T0, d.delivered) for d in hook] == [
        (0 * S, False), (1 * S, False), (3 * S, False), (8 * S, False), (18 * S, False),
        (48 * S, False), (108 * S, False), (168 * S, True),
    ]
    assert dropped == []


async def test_a_last_channel_failing_for_good_is_dropped_with_its_reason() -> None:
    alert = alert_of(EventKind.FALL)
    only_voice = Recipient("family:li.hua", Role.DUTY, {Channel.VOICE: "+86139"})
    steps = [PlannedStep(alert, s.step, {Role.DUTY: (only_voice,)}) for s in planned(alert)]
    bad_number = DeliveryError("number does not exist", recoverable=False)
    deliveries, dropped = await drive(steps, {Channel.VOICE: Scripted(bad_number)})
    assert [(d.notice.channel, d.delivered) for d in deliveries] == [(Channel.VOICE, False)]
    assert dropped == [
        Dropped(deliveries[0].notice, "retry",
                "unrecoverable on the last channel: number does not exist")
    ]


async def test_a_notifier_bug_or_a_missing_notifier_never_loses_the_notice() -> None:
    alert = alert_of(EventKind.SOS)
    crashing = Scripted(RuntimeError("bug in the console"))
    deliveries, _ = await drive(
        planned(alert, level=0),
        {Channel.CONSOLE: crashing, Channel.VOICE: Scripted(Receipt(True))},
    )
    assert [(d.notice.channel, d.error) for d in deliveries] == [
        (Channel.CONSOLE, "RuntimeError: bug in the console"),
        (Channel.CONSOLE, "RuntimeError: bug in the console"),
        (Channel.CONSOLE, "RuntimeError: bug in the console"),
        (Channel.MESSAGING, "no notifier for this channel"),
        (Channel.VOICE, None),
    ]


async def test_dedup_drops_what_was_delivered_confirmed_or_repeated_in_the_batch() -> None:
    alert = alert_of(EventKind.SOS)
    batch = await Escalate()(Batch(T0, steps=tuple(planned(alert, level=0))))
    (notice,) = batch.pending
    twice = Batch(T0, pending=(notice, notice))
    assert (await Dedup(DeliveryLedger())(twice)).dropped == (
        Dropped(notice, "dedup", "already delivered"),
    )
    delivered = DeliveryLedger(delivered=frozenset({notice.key}))
    assert (await Dedup(delivered)(batch)).pending == ()
    confirmed = DeliveryLedger(confirmed=frozenset({(notice.step_id, notice.person_id)}))
    assert (await Dedup(confirmed)(batch)).dropped == (
        Dropped(notice, "dedup", "the person confirmed this step"),
    )


async def test_a_silence_mutes_maintenance_alerts_but_never_sos_fall_or_smoke() -> None:
    window = Silence("home-7", frozenset(AlertType), T0 - 60 * S, T0 + 3600 * S,
                     "detectors being replaced")
    offline = alert_of(EventKind.DEVICE_OFFLINE, device="sd-1")
    smoke = alert_of(EventKind.SMOKE, device="sd-1")
    batch = await Escalate()(Batch(T0, steps=(*planned(offline), *planned(smoke))))
    muted = await Mute((window,))(batch)
    assert [n.alert_type for n in muted.pending] == [AlertType.SMOKE, AlertType.SMOKE]
    assert [(d.notice.alert_type, d.reason) for d in muted.dropped] == [
        (AlertType.DEVICE_OFFLINE, "silenced: detectors being replaced")
    ]


async def test_minor_notices_to_one_person_are_summarised_critical_ones_never() -> None:
    minors = [
        alert_of(EventKind.DEVICE_OFFLINE, device="sd-1"),
        alert_of(EventKind.LOW_BATTERY, device="wb-1"),
        alert_of(EventKind.TAMPER, device="cb-1"),
    ]
    sos = alert_of(EventKind.SOS)
    steps = [p for a in [*minors, sos] for p in planned(a)]
    batch = await Group()(await Escalate()(Batch(T0, steps=tuple(steps))))
    summaries = [n for n in batch.pending if n.members]
    assert [n.alert_type for n in batch.pending if not n.members] == [AlertType.SOS]
    (summary,) = summaries
    assert summary.text == "home-7：3 条设备提醒（device_offline、low_battery、tamper）。"
    assert len(summary.members) == 3 and summary.person_id == "staff:wang.li"


async def test_the_notify_stage_keeps_order_per_alert_and_target() -> None:
    alert = alert_of(EventKind.SMOKE, device="sd-1")
    first = (await Escalate()(Batch(T0, steps=tuple(planned(alert))))).pending
    hook = next(n for n in first if n.channel is Channel.WEBHOOK)
    later = dataclasses.replace(hook, step_id="later")
    webhook = Scripted(Receipt(True))
    out = await Notify({Channel.WEBHOOK: webhook})(Batch(T0, pending=(hook, later)))
    assert [n.step_id for n in webhook.sent] == [hook.step_id, "later"]
    assert [d.notice.step_id for d in out.deliveries] == [hook.step_id, "later"]


def test_retry_schedules_are_data() -> None:
    schedule = RetrySchedule((S, 2 * S), max_attempts=4)
    assert [schedule.delay(n) for n in range(6)] == [None, S, 2 * S, 2 * S, None, None]


async def test_a_role_that_reaches_nobody_is_recorded_not_silent() -> None:
    alert = alert_of(EventKind.SOS)
    (step,) = [p.step for p in planned(alert, T0 + 60 * S, level=1)]
    nobody_home = {Role.SUPERVISOR: (ZHAO,)}  # no family contact on file
    batch = await Escalate()(Batch(T0 + 60 * S, steps=(PlannedStep(alert, step, nobody_home),)))
    assert [n.person_id for n in batch.pending] == ["staff:zhao.min"]
    assert batch.unstaffed == (Unstaffed(alert.id, step.key.id, Role.FAMILY, T0 + 60 * S),)
    assert batch.unstaffed[0].audit() == AuditEntry(
        T0 + 60 * S, alert.id, "system:notifier", AuditAction.NOTED, Channel.SYSTEM,
        {"step": step.key.id, "role": "family", "note": "nobody reachable in this role"},
    )


# --- nothing lost, nothing doubled, every switch within its window ---------------------

ANSWERS = st.sampled_from(["confirmed", "unconfirmed", "recoverable", "unrecoverable", "crash"])


def answer(name: str) -> Receipt | Exception:
    answers: dict[str, Receipt | Exception] = {
        "confirmed": Receipt(confirmed=True),
        "unconfirmed": Receipt(confirmed=False),
        "recoverable": DeliveryError("timeout", recoverable=True),
        "unrecoverable": DeliveryError("bad target", recoverable=False),
        "crash": RuntimeError("bug"),
    }
    return answers[name]


@settings(max_examples=150, deadline=None)
@given(
    console=st.lists(ANSWERS, min_size=1, max_size=8),
    messaging=st.lists(ANSWERS, min_size=1, max_size=8),
    voice=st.lists(ANSWERS, min_size=1, max_size=8),
)
async def test_every_notice_ends_delivered_or_dropped_with_a_reason_never_twice(
    console: list[str], messaging: list[str], voice: list[str]
) -> None:
    alert = alert_of(EventKind.SOS)
    channels = {
        Channel.CONSOLE: Scripted(*map(answer, console)),
        Channel.MESSAGING: Scripted(*map(answer, messaging)),
        Channel.VOICE: Scripted(*map(answer, voice)),
    }
    deliveries, dropped = await drive(planned(alert, level=0), channels)
    ok = [d for d in deliveries if d.delivered]
    assert len({d.notice.key for d in ok}) == len(ok), "one channel delivered twice"
    last = deliveries[-1]
    # The chain ends on a confirmed delivery, on the last channel, or with a reason.
    if last.delivered and (last.confirmed or not last.notice.fallback):
        assert dropped == []
    else:
        assert [(x.notice, x.stage) for x in dropped] == [(last.notice, "retry")]
    # Each channel is left within its window of 15 s (console) / 30 s (others).
    for before, after in itertools.pairwise(deliveries):
        if after.notice.channel is not before.notice.channel:
            window = 15 * S if before.notice.channel is Channel.CONSOLE else 30 * S
            assert after.at - before.notice.channel_since <= window
