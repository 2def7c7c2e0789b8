"""The device downlink in ``server``: publish ``downlink_outbox``, record results in the alert.

Publishing. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (several servers,
no leader) and published as ``CommandPayload`` at QoS 1 on the server's own
MQTT session (``MqttConsumer.publish``: one account, one session). The claim is
held while the PUBACKs are awaited, and ``published_at`` is written only for a
message whose PUBACK came: one without stays in flight in the session, is sent
again (DUP) after a reconnect, and a later pass waits on that same message
instead of sending another. The command id comes from the alert, so whatever
is sent twice anyway (a server dying between PUBACK and commit) is one command
to the edge, which carries out an id once and repeats its recorded result.

Results. Ingest stores ``…/command/result`` in ``command_results``; a trigger
queues each new one in ``command_result_inbox`` in that same transaction. A
worker claims them (``SKIP LOCKED``), holds the alert's row lock, and appends
to the alert's audit chain — ``notified`` (the device confirmed: "help is
coming" reached the elder) or ``delivery_failed`` (refused, unreachable), on
channel ``device``, with the command id — and a change-log row
(``device_confirmed`` / ``device_refused`` / ``device_unreachable``) for the
console. A result is believed only for a command the engine sent to that very
site and device: the alert comes from the outbox, never from the edge's payload.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from alerting.model import AuditAction, AuditEntry, Channel, DetailValue, device_actor
from gateway import metrics
from gateway.alerts.store import PgAlertTransaction, alert_json
from gateway.alerts.workers import ClockSource, engine_now
from gateway.contract.payloads import CommandAction, CommandPayload, dump
from gateway.contract.topics import Channel as TopicChannel
from gateway.contract.topics import DeviceTopic, TopicError
from gateway.db.stall_guard import guarded
from gateway.restarting import run_forever

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5: accepted, but no session holds the topic
REFUSED_RETRY_S = 60  # a command the broker refused (e.g. not authorised) is tried again after

_CLAIM = """
SELECT command_id, alert_id, site_id, device_id, action, args, created_at FROM downlink_outbox
WHERE published_at IS NULL AND not_before <= now()
ORDER BY created_at, command_id LIMIT %s FOR UPDATE SKIP LOCKED
"""
_PUBLISHED = """
UPDATE downlink_outbox SET published_at = now(), attempts = attempts + 1, last_error = %s
WHERE command_id = %s
"""
_NOT_YET = """
UPDATE downlink_outbox SET attempts = attempts + 1, last_error = %s,
    not_before = now() + make_interval(secs => %s)
WHERE command_id = %s
"""
_CLAIM_RESULT = """
SELECT i.id, r.command_id, r.site_id, r.device_id, r.action, r.outcome, r.reason, r.via,
       r.time, o.alert_id, o.site_id AS sent_site, o.device_id AS sent_device,
       o.action AS sent_action
FROM command_result_inbox i
JOIN command_results r USING (command_id)
LEFT JOIN downlink_outbox o USING (command_id)
ORDER BY i.id LIMIT 1 FOR UPDATE OF i SKIP LOCKED
"""
_CHANGE = """
INSERT INTO alert_changes (alert_id, seq, time, action, alert)
SELECT %s, seq, %s, %s, %s FROM alert_audit_heads WHERE alert_id = %s
"""

# What the console's change log calls each outcome.
CHANGE_ACTIONS = {
    "executed": "device_confirmed",
    "refused": "device_refused",
    "unreachable": "device_unreachable",
}


class Session(Protocol):
    """The part of ``MqttConsumer`` the publisher uses."""

    connected: asyncio.Event

    def publish(self, topic: str, payload: bytes, key: Hashable) -> asyncio.Future[int]: ...


def command_message(row: dict[str, Any]) -> tuple[str, bytes]:
    """The topic and payload of an outbox row; ValueError if it cannot be a command."""
    topic = DeviceTopic(row["site_id"], row["device_id"], TopicChannel.COMMAND)
    payload = CommandPayload(
        v=1,
        command_id=row["command_id"],
        action=CommandAction(row["action"]),
        time=row["created_at"],  # fixed at insert: a re-send is the same bytes
        args=row["args"] if isinstance(row["args"], dict) else {},
        alert_id=row["alert_id"],
    )
    return str(topic), dump(payload)


async def publish_pending(
    conn: psycopg.AsyncConnection[Any], session: Session, limit: int, puback_wait_s: float
) -> int:
    """One pass: claim pending rows, publish, wait for PUBACKs, record them; rows claimed."""
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_CLAIM, (limit,))
            rows = await cur.fetchall()
        if not rows:
            return 0
        sent: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        for row in rows:
            try:
                topic, payload = command_message(row)
            except (ValueError, ValidationError, TopicError) as exc:
                reason = f"not a valid command: {exc}"[:1000]
                log.error("downlink %s closed: %s", row["command_id"], reason)
                metrics.DOWNLINK_PUBLISHES.labels("invalid").inc()
                await conn.execute(
                    "UPDATE downlink_outbox SET last_error = %s, not_before = 'infinity'"
                    " WHERE command_id = %s",
                    (reason, row["command_id"]),
                )
                continue
            sent.append((row, session.publish(topic, payload, key=row["command_id"])))
        if sent:
            await asyncio.wait([f for _, f in sent], timeout=puback_wait_s)
        for row, done in sent:
            await _record(conn, row["command_id"], done, puback_wait_s)
    return len(rows)


async def _record(
    conn: psycopg.AsyncConnection[Any],
    command_id: uuid.UUID,
    done: asyncio.Future[int],
    puback_wait_s: float,
) -> None:
    if not done.done():
        # Still in flight in the session (sent again after a reconnect); the next pass
        # waits on that same message. Nothing is marked: a lost message is never assumed sent.
        metrics.DOWNLINK_PUBLISHES.labels("no_puback").inc()
        await conn.execute(
            _NOT_YET, (f"no PUBACK within {puback_wait_s} s (kept in flight)", 0, command_id)
        )
        return
    reason = done.result()
    if reason == NO_MATCHING_SUBSCRIBERS:
        log.warning("downlink %s published, but no edge session holds its topic", command_id)
        metrics.DOWNLINK_PUBLISHES.labels("no_subscribers").inc()
        await conn.execute(_PUBLISHED, ("no matching subscribers (PUBACK 0x10)", command_id))
    elif reason < 0x80:
        metrics.DOWNLINK_PUBLISHES.labels("published").inc()
        await conn.execute(_PUBLISHED, (None, command_id))
    else:
        log.error("downlink %s refused by the broker (PUBACK 0x%02x)", command_id, reason)
        metrics.DOWNLINK_PUBLISHES.labels("refused").inc()
        await conn.execute(
            _NOT_YET,
            (f"refused by the broker (PUBACK 0x{reason:02x})", REFUSED_RETRY_S, command_id),
        )


async def record_result(conn: psycopg.AsyncConnection[Any], now: datetime, worker: str) -> bool:
    """Record one queued command result in its alert; False when the inbox is empty."""
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_CLAIM_RESULT)
            r = await cur.fetchone()
        if r is None:
            return False
        await conn.execute("DELETE FROM command_result_inbox WHERE id = %s", (r["id"],))
        if r["alert_id"] is None:
            log.info("command result %s is not for an alert command; not recorded", r["command_id"])
            metrics.DOWNLINK_RESULTS.labels("unmatched").inc()
            return True
        sent = (r["sent_site"], r["sent_device"], r["sent_action"])
        if (r["site_id"], r["device_id"], r["action"]) != sent:
            log.error(
                "command result %s came from %s/%s for %s, but the command went to %s/%s for %s;"
                " not recorded", r["command_id"], r["site_id"], r["device_id"], r["action"], *sent,
            )  # fmt: skip
            metrics.DOWNLINK_RESULTS.labels("mismatch").inc()
            return True
        tx = PgAlertTransaction(conn, worker)
        alert = await tx.lock_alert(r["alert_id"])
        if alert is None:  # the outbox refers to alerts: cannot happen short of a manual delete
            log.error("command result %s: alert %s is gone", r["command_id"], r["alert_id"])
            metrics.DOWNLINK_RESULTS.labels("unmatched").inc()
            return True
        change = CHANGE_ACTIONS[r["outcome"]]
        detail: dict[str, DetailValue] = {
            "command_id": str(r["command_id"]),
            "action": r["action"],
            "outcome": r["outcome"],
            "result": change,
            "confirmed": r["outcome"] == "executed",
            "device_time": r["time"].isoformat(),
        }
        if r["via"] is not None:
            detail["via"] = r["via"]
        if r["reason"] is not None:
            detail["reason"] = r["reason"]
        action = AuditAction.NOTIFIED if r["outcome"] == "executed" else AuditAction.DELIVERY_FAILED
        actor = device_actor(r["site_id"], r["device_id"])
        await tx.audit([AuditEntry(now, alert.id, actor, action, Channel.DEVICE, detail)])
        shown = alert_json(alert) | {"device_command": dict(detail)}
        await conn.execute(_CHANGE, (alert.id, now, change, Jsonb(shown), alert.id))
        metrics.DOWNLINK_RESULTS.labels(r["outcome"]).inc()
    return True


async def _wait(listen: psycopg.AsyncConnection[Any], seconds: float) -> None:
    async for _ in listen.notifies(timeout=max(seconds, 0.0), stop_after=1):
        pass


class DownlinkWorkers:
    """The publisher and the result recorder of one server process."""

    def __init__(
        self,
        dsn: str,
        session: Session,
        name: str,
        clock: ClockSource = "system",
        poll_s: float = 1.0,
        batch: int = 16,
        puback_wait_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.session = session
        self.name = name
        self.clock = clock
        self.poll_s = poll_s
        self.batch = batch
        self.puback_wait_s = puback_wait_s
        # A server stopped while it holds claims (SIGSTOP) loses them after this long
        # (gateway/db/stall_guard.py), so another server publishes; longer than a pass's
        # wait for its PUBACKs.
        self.work_dsn = guarded(dsn, f"{name} downlink", puback_wait_s + 5)

    async def run(self) -> None:
        await asyncio.gather(self._forever(self._publish), self._forever(self._results))

    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        await run_forever(
            f"downlink {loop.__name__}",
            loop,
            log=log,
            transient=(psycopg.Error, OSError),
            crashes=metrics.ENGINE_CRASHES,
        )

    async def _connections(self, channel: str) -> tuple[Any, Any]:
        listen = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        work = await psycopg.AsyncConnection.connect(self.work_dsn, autocommit=True)
        await listen.execute(f"LISTEN {channel}")
        return listen, work

    async def _publish(self) -> None:
        listen, work = await self._connections("downlink_outbox")
        async with listen, work:
            while True:
                await self.session.connected.wait()
                claimed = await publish_pending(work, self.session, self.batch, self.puback_wait_s)
                if claimed < self.batch:
                    await _wait(listen, 0 if claimed else self.poll_s)

    async def _results(self) -> None:
        listen, work = await self._connections("command_results")
        async with listen, work:
            while True:
                now = await engine_now(work, self.clock)
                if not await record_result(work, now, self.name):
                    await _wait(listen, self.poll_s)
