"""What one runner pass makes of claimed rows (``outbox.settle``): pure, no database.

The channels here are plain objects answering as a receiver would; the stages are
alerting.pipeline's own (as the runner builds them).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from alerting.model import AlertStatus, AlertType, AuditAction, Channel, Severity
from alerting.pipeline import Batch, Notice, run_stages
from alerting.policy import Role
from alerting.ports import DeliveryError, Receipt
from gateway.notify.outbox import OutboxRow, RowUpdate, settle
from gateway.notify.runner import Timings, stages_for

AT = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


class Answering:
    def __init__(self, error: DeliveryError | None = None) -> None:
        self.error = error
        self.sent: list[str] = []

    async def send(self, notice: Notice) -> Receipt:
        self.sent.append(notice.key)
        if self.error:
            raise self.error
        return Receipt(confirmed=False, reference="ok")


def row(
    channel: Channel = Channel.CONSOLE,
    fallback: tuple[tuple[Channel, str], ...] = ((Channel.MESSAGING, "json://x"),),
    status: AlertStatus = AlertStatus.OPEN,
    delivered: bool = False,
) -> OutboxRow:
    n = Notice(
        alert_id=uuid.UUID(int=7), alert_type=AlertType.FALL, severity=Severity.CRITICAL,
        site_id="site-1", step_id="s/0/level/0/0", level=0, person_id="staff:d1",
        role=Role.DUTY, channel=channel, target="d1", text="跌倒", until=AlertStatus.ACKNOWLEDGED,
        not_before=AT, channel_since=AT, fallback=fallback,
    )  # fmt: skip
    return OutboxRow(1, n.key, n, None, "123456", frozenset(), delivered, False, status)


async def one_pass(
    r: OutboxRow, channel: Answering
) -> tuple[RowUpdate, list[AuditAction]]:
    channels = {c: channel for c in Channel}
    batch = await run_stages(stages_for([r], channels, Timings()), Batch(AT, pending=(r.notice,)))
    updates, audit, lost = settle([r], batch)
    assert lost == [] and len(updates) == 1
    return updates[0], [e.action for e in audit]


async def test_console_delivered_unconfirmed_moves_to_messaging_when_its_window_ends() -> None:
    update, audit = await one_pass(row(), Answering())
    assert update.status == "pending" and update.delivered_channel == "console"
    assert update.notice.channel is Channel.MESSAGING and update.notice.target == "json://x"
    assert update.notice.not_before == AT + timedelta(seconds=15)
    assert update.attempts == 1 and audit == [AuditAction.NOTIFIED]


async def test_recoverable_failure_retries_on_the_same_channel_within_its_window() -> None:
    update, audit = await one_pass(row(), Answering(DeliveryError("HTTP 503", recoverable=True)))
    assert update.status == "pending" and update.notice.channel is Channel.CONSOLE
    assert update.notice.attempt == 1 and update.notice.not_before == AT + timedelta(seconds=2)
    assert update.error == "HTTP 503" and audit == [AuditAction.DELIVERY_FAILED]


async def test_unrecoverable_failure_on_the_last_channel_closes_the_row_as_failed() -> None:
    r = row(Channel.WEBHOOK, fallback=())
    update, audit = await one_pass(r, Answering(DeliveryError("HTTP 400", recoverable=False)))
    assert update.status == "failed" and "HTTP 400" in (update.closed_reason or "")
    assert audit == [AuditAction.DELIVERY_FAILED, AuditAction.NOTED]


async def test_webhook_2xx_ends_the_row_as_sent() -> None:
    update, audit = await one_pass(row(Channel.WEBHOOK, fallback=()), Answering())
    assert (update.status, update.delivered_channel) == ("sent", "webhook")
    assert audit == [AuditAction.NOTIFIED]


async def test_an_acknowledged_alert_closes_the_row_recorded_never_silent() -> None:
    sent_before = row(status=AlertStatus.ACKNOWLEDGED, delivered=True)
    channel = Answering()
    update, audit = await one_pass(sent_before, channel)
    assert channel.sent == [] and update.status == "sent"
    assert update.closed_reason == "alert is acknowledged" and audit == [AuditAction.NOTED]
    never_sent = row(status=AlertStatus.ACKNOWLEDGED)
    update, _ = await one_pass(never_sent, channel)
    assert update.status == "dropped"


async def test_a_group_summary_settles_every_row_it_stands_for() -> None:
    import dataclasses

    first = row()
    rows = []
    for i, kind in enumerate((AlertType.LOW_BATTERY, AlertType.DEVICE_OFFLINE)):
        n = dataclasses.replace(first.notice, alert_id=uuid.UUID(int=10 + i), alert_type=kind,
                                severity=Severity.MINOR, step_id=f"s{i}/0/level/0/0",
                                fallback=())  # fmt: skip
        rows.append(dataclasses.replace(first, id=i + 1, key=n.key, notice=n))
    channel = Answering()
    channels = {c: channel for c in Channel}
    batch = await run_stages(stages_for(rows, channels, Timings()),
                             Batch(AT, pending=tuple(r.notice for r in rows)))  # fmt: skip
    updates, audit, lost = settle(rows, batch)
    assert len(channel.sent) == 1, "one summary for the person's two minor notices"
    assert lost == [] and [u.status for u in updates] == ["sent", "sent"]
    assert sorted(e.alert_id.int for e in audit) == [10, 11], "each alert's chain has it"
