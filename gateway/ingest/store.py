"""The ingest store: one transaction per batch, idempotent so a retry or a redelivery adds nothing.

Telemetry is copied (binary COPY, the buffer the classifier built) straight into
the hypertable. Only when that collides with a row already there (a redelivery
after a crash, a repeated message: a unique violation) is the transaction
rolled back and run again with the telemetry copied into a per-connection
staging table and moved with ON CONFLICT DO NOTHING on the natural key. Either
way a batch is one transaction, so its messages are acknowledged all or none;
events pass through the event
ledger, so one event id is one row however often it arrives; a command result
is one row per command id. Dead letters keep a bounded prefix of the payload
with its full length and a digest of topic and payload: the digest is unique,
so a dead letter redelivered after a crash (MQTT DUP flag set) adds nothing,
and a fresh repeat of the same bytes only counts an occurrence.

Messages of a site that is not registered are stored as usual ("kept and
flagged": an SOS is never dropped over an administrative lapse) and the site
is recorded in ``unregistered_sources``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from gateway import metrics
from gateway.db.pipelined import pipelined_transaction
from gateway.ingest.batch import TELEMETRY_COLUMNS, Batch, Classifier, DeadLetter

log = logging.getLogger(__name__)

DEAD_PAYLOAD_PREFIX = 4096  # bytes of a dead letter's payload kept (the length is kept in full)
DEAD_TOPIC_PREFIX = 1024  # characters of a dead letter's topic kept
SITES_REFRESH_S = 5.0  # at most one look-up of registered sites per this many seconds on a miss
SITES_MAX_AGE_S = 60.0  # and one in any case after this long (a site may be removed)

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS telemetry_in (
    time timestamptz, site_id text, device_id text, metric text,
    value double precision, unit text
) ON COMMIT DELETE ROWS
"""
_COPY_DIRECT = f"COPY telemetry ({TELEMETRY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_COPY_STAGING = f"COPY telemetry_in ({TELEMETRY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_MOVE = "INSERT INTO telemetry SELECT * FROM telemetry_in ON CONFLICT DO NOTHING"
# binary COPY framing: signature, flags, header extension length; trailer: field count -1
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"

_EVENT = """
WITH fresh AS (
    INSERT INTO event_ledger (event_id, time) VALUES (%s, %s)
    ON CONFLICT (event_id) DO NOTHING RETURNING event_id
)
INSERT INTO device_events (event_id, time, site_id, device_id, type, phase, profile, data)
SELECT event_id, %s, %s, %s, %s, %s, %s, %s::jsonb FROM fresh
"""

_STATUS = """
INSERT INTO device_status (site_id, device_id, online, battery, rssi, detail, time)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (site_id, device_id) DO UPDATE SET
    online = excluded.online, battery = excluded.battery, rssi = excluded.rssi,
    detail = excluded.detail, time = excluded.time, updated_at = now()
WHERE device_status.time <= excluded.time
"""

_COMMAND_RESULT = """
INSERT INTO command_results
    (command_id, site_id, device_id, action, outcome, reason, via, alert_id, time)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (command_id) DO NOTHING
"""

_DEAD = """
INSERT INTO dead_letters
    (topic, payload, reason, reason_class, payload_length, digest, last_received_at)
VALUES (%s, %s, %s, %s, %s, %s, now())
ON CONFLICT (digest) DO UPDATE SET
    occurrences = dead_letters.occurrences + %s, last_received_at = now()
"""

_UNREGISTERED = """
INSERT INTO unregistered_sources (site_id, messages) VALUES (%s, %s)
ON CONFLICT (site_id) DO UPDATE SET
    messages = unregistered_sources.messages + excluded.messages, last_seen = now()
"""


def _storable(text: str, limit: int) -> str:
    """Text PostgreSQL can hold: bounded, no NUL, valid UTF-8 (no lone surrogates)."""
    text = text[:limit].replace("\x00", "\\x00")
    return text.encode("utf-8", "replace").decode("utf-8")


def dead_letter_row(d: DeadLetter) -> tuple[object, ...]:
    """The row of one dead letter: whatever the message held, this row can be written."""
    digest = hashlib.sha256(d.topic.encode("utf-8", "surrogatepass") + b"\x00" + d.payload).digest()
    return (
        _storable(d.topic, DEAD_TOPIC_PREFIX),
        d.payload[:DEAD_PAYLOAD_PREFIX],
        _storable(d.reason, 1000),
        d.kind.value,
        len(d.payload),
        digest,
        0 if d.dup else 1,
    )


def _row_statements(batch: Batch) -> list[tuple[str, Sequence[Sequence[object]]]]:
    """The batch's writes other than telemetry, each statement with its rows."""
    out: list[tuple[str, Sequence[Sequence[object]]]] = []
    if batch.events:
        out.append(
            (_EVENT, [(e[0], e[1], e[1], e[2], e[3], e[4], e[5], e[6], e[7]) for e in batch.events])
        )
    if batch.statuses:
        out.append((_STATUS, list(batch.statuses.values())))
    if batch.command_results:
        out.append((_COMMAND_RESULT, batch.command_results))
    if batch.dead:
        out.append((_DEAD, [dead_letter_row(d) for d in batch.dead]))
    return out


class _SiteRegistry:
    """The registered sites as last read, to flag messages of unregistered ones."""

    def __init__(self) -> None:
        self.ids: frozenset[str] = frozenset()
        self.read_at = -1e9  # monotonic time of the last look-up

    def stale(self, sites: dict[str, int]) -> bool:
        """Whether to read the registry again before judging ``sites``."""
        age = time.monotonic() - self.read_at
        missing = any(s not in self.ids for s in sites)
        return (missing and age >= SITES_REFRESH_S) or age >= SITES_MAX_AGE_S

    def refresh(self, ids: Iterable[str]) -> None:
        self.ids = frozenset(ids)
        self.read_at = time.monotonic()

    def missing(self, sites: dict[str, int]) -> list[tuple[str, int]]:
        # in site order: two lanes' transactions then lock shared rows in one order
        return [(s, sites[s]) for s in sorted(sites) if s not in self.ids]


class BatchStore(Protocol):
    """What the pipeline needs of a store: a batch durable (committed) or an error."""

    async def write(self, batch: Batch) -> None: ...

    async def close(self) -> None: ...


class IngestStore:
    """Writes batches on a connection of its own, in a worker thread.

    The event loop's thread parses the next messages while a batch is written:
    a batch's round trips to PostgreSQL (COPY, the other statements, COMMIT)
    then wait on the network and the database, not on the loop's turn between
    two socket reads of a busy MQTT session, and the GIL is free meanwhile.
    Only one batch is written at a time (the pipeline awaits each write).
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._sites = _SiteRegistry()
        self.collisions = 0  # batches that took the deduplicating path

    async def write(self, batch: Batch) -> None:
        """Make the batch durable (committed) or raise; safe to call again with the same batch."""
        unregistered = await asyncio.to_thread(self._write, batch)
        if unregistered:
            metrics.INGEST_UNREGISTERED.inc(unregistered)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    # -- in the worker thread -------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.Connection.connect(self.dsn, connect_timeout=5)
            conn.execute(_STAGING)
            conn.commit()
            self._conn = conn
        return self._conn

    def _unregistered(
        self, cur: psycopg.Cursor[tuple[object, ...]], sites: dict[str, int]
    ) -> list[tuple[str, int]]:
        """Sites of the batch not in the registry; it is read again only on a miss."""
        if self._sites.stale(sites):
            cur.execute("SELECT id FROM sites")
            self._sites.refresh(str(r[0]) for r in cur.fetchall())
        return self._sites.missing(sites)

    def _write(self, batch: Batch) -> int:
        """One transaction; returns the messages of unregistered sites it stored."""
        conn = self._connection()
        try:
            try:
                return self._transaction(conn, batch, direct=True)
            except psycopg.errors.UniqueViolation:
                # a row of the batch is stored already (a redelivery after a crash, a
                # repeated message): the same transaction again, deduplicating
                self.collisions += 1
                return self._transaction(conn, batch, direct=False)
        except BaseException:
            self._close()
            raise

    def _transaction(
        self, conn: psycopg.Connection[tuple[object, ...]], batch: Batch, *, direct: bool
    ) -> int:
        # Without a COPY (which pipeline mode cannot carry) the batch goes in pipeline
        # mode: BEGIN, the statements and COMMIT in one round trip. That is the event
        # lane's usual batch: each round trip of this thread also waits for the GIL.
        pipelined = conn.pipeline() if not batch.telemetry_rows else contextlib.nullcontext()
        with pipelined, conn.transaction(), conn.cursor() as cur:
            if batch.telemetry_rows:
                # COPY straight into the hypertable: no staging table, no ON CONFLICT
                self._copy(cur, _COPY_DIRECT if direct else _COPY_STAGING, batch.copy)
                if not direct:
                    cur.execute(_MOVE)
            for statement, rows in _row_statements(batch):
                cur.executemany(statement, rows)
            unregistered = self._unregistered(cur, batch.sites) if batch.sites else []
            if unregistered:
                cur.executemany(_UNREGISTERED, unregistered)
        return sum(n for _, n in unregistered)

    @staticmethod
    def _copy(cur: psycopg.Cursor[tuple[object, ...]], statement: str, rows: bytearray) -> None:
        with cur.copy(statement) as copy:
            copy.write(_COPY_HEADER)
            copy.write(rows)
            copy.write(_COPY_TRAILER)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self._conn.close()
            self._conn = None


class AfterEvents(Protocol):
    """What runs after an alarm batch's rows, in its transaction (the engine's intake);
    ``counted=False`` for a rehearsal, whose work is rolled back."""

    def __call__(
        self, conn: psycopg.AsyncConnection[Any], *, counted: bool = True
    ) -> Awaitable[None]: ...


class _Rehearsed(Exception):
    """Ends a rehearsal's transaction: rolled back like any failure."""


_INBOX_WAITING = "SELECT EXISTS (SELECT 1 FROM engine_inbox)"
# The device a rehearsal raises its made-up SOS for: a registered one with a resident if
# there is one, so that the intake takes the path of a real alarm (the resident, the
# unit, who is on duty); else a made-up call button of a registered site.
_REHEARSAL_DEVICE = """
(SELECT site_id, id, profile FROM devices ORDER BY resident_id IS NULL, site_id, id LIMIT 1)
UNION ALL (SELECT id, 'rehearsal', 'es-cb1' FROM sites ORDER BY id LIMIT 1)
LIMIT 1
"""


class AlarmStore:
    """Device events (the alarm path) on an async connection on the server's loop, and
    the engine's intake of them in the same transaction.

    Why no worker thread: an alarm batch has no COPY, so it is a single round trip in
    pipeline mode; a thread only adds two hand-overs of the GIL. Why the intake inside:
    the event's alert is then committed with the event itself, one transaction instead of
    two and no wake-up between them (issue 7 allows alert creation in the ingest
    transaction). The events, ``after_events`` and the COMMIT are one pipelined
    transaction (``pipelined_transaction``), which waits for PostgreSQL only where the
    intake reads (its claim, its locks) and at the COMMIT: each wait is a turn of the
    server's loop behind the telemetry it also serves. Whatever it fails with (a refused
    row, a lock held by another server past its timeout, a check refused at COMMIT, a
    bug), the transaction is rolled back whole and the events are written again alone,
    with their ``engine_inbox`` rows, which the engine's workers take as before; an
    event that fails again is the batch's own error. So the inbox stays the guarantee;
    this is only the fast way through it.

    Only a batch of at most ``inline_max`` events (the alarm as it comes, one or a few)
    runs the intake inside: a burst or a backlog is committed and acknowledged at once
    and left to the workers, who take the inbox in batches of 50, as before.

    A batch with telemetry never comes here (only event topics do); if one ever did,
    the thread store writes it, so nothing is refused for being in the wrong lane.
    """

    def __init__(
        self, dsn: str, after_events: AfterEvents | None = None, inline_max: int = 10
    ) -> None:
        self.dsn = dsn
        self.after_events = after_events
        self.inline_max = inline_max
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._sites = _SiteRegistry()
        self._bulk = IngestStore(dsn)
        self.deferred = 0  # batches written again without after_events (left to the inbox)

    async def write(self, batch: Batch) -> None:
        if batch.telemetry_rows:
            await self._bulk.write(batch)
            return
        inline = self.after_events is not None and 0 < len(batch.events) <= self.inline_max
        try:
            conn = await self._connection()
            try:
                unregistered = await self._transaction(
                    conn, batch, self.after_events if inline else None
                )
            except psycopg.Error as exc:
                if conn.broken or not inline:
                    raise
                # The events must not pay for the intake: again without it (an event
                # refused again is the batch's own error, and raises).
                unregistered = await self._transaction(conn, batch, None)
                self._defer(exc)
        except BaseException:
            await self._close()
            raise
        if unregistered:
            metrics.INGEST_UNREGISTERED.inc(unregistered)

    async def rehearse(self, times: int = 2) -> bool:
        """Open the lane's connection and run its whole transaction for a made-up SOS
        of a registered device, rolled back, ``times`` times, before the first alarm.

        Why: the first alarm after a start took ≈ 60 ms more than the next ones: this
        process's first use of the intake's code and of psycopg's array adaptation,
        and a new session's first catalog look-ups and trigger compilations (the
        chunks it writes into are created ahead: ``create_chunks_ahead``). psycopg's
        prepared statements are not kept: a ROLLBACK clears them. Nothing of it is kept,
        notified (NOTIFY is sent at COMMIT) or counted. False when it did not run (no
        site registered yet, a backlog in the engine's inbox, the database unreachable):
        the first alarm is then only slower, never refused."""
        if self.after_events is None:
            return False
        after_events = self.after_events

        async def rehearsed(conn: psycopg.AsyncConnection[Any], *, counted: bool = True) -> None:
            await after_events(conn, counted=False)
            raise _Rehearsed

        try:
            conn = await self._connection()
            # The intake also takes other free inbox rows: with a backlog waiting (a
            # crash left some), each rehearsal would apply all of it for nothing.
            waiting = await (await conn.execute(_INBOX_WAITING)).fetchone()
            device = await (await conn.execute(_REHEARSAL_DEVICE)).fetchone()
            if device is None or (waiting is not None and waiting[0]):
                return False
            site_id, device_id, profile = (str(v) for v in device)
            for _ in range(times):
                batch = rehearsal_batch(site_id, device_id, profile)
                with contextlib.suppress(_Rehearsed):
                    await self._transaction(conn, batch, rehearsed)
        except Exception as exc:  # the lane works without it: reconnect at the first alarm
            log.warning("alarm lane not rehearsed: %s: %s", type(exc).__name__, exc)
            await self._close()
            return False
        return True

    async def close(self) -> None:
        await self._close()
        await self._bulk.close()

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=5, autocommit=True
            )
        return self._conn

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                await self._conn.close()
            self._conn = None

    async def _transaction(
        self,
        conn: psycopg.AsyncConnection[tuple[object, ...]],
        batch: Batch,
        after_events: AfterEvents | None,
    ) -> int:
        async with pipelined_transaction(conn), conn.cursor() as cur:
            for statement, rows in _row_statements(batch):
                await cur.executemany(statement, rows)
            unregistered: list[tuple[str, int]] = []
            if batch.sites:
                if self._sites.stale(batch.sites):
                    await cur.execute("SELECT id FROM sites")
                    self._sites.refresh(str(r[0]) for r in await cur.fetchall())
                unregistered = self._sites.missing(batch.sites)
            if unregistered:
                await cur.executemany(_UNREGISTERED, unregistered)
            if after_events is not None:
                await after_events(conn)
        return sum(n for _, n in unregistered)

    def _defer(self, exc: BaseException) -> None:
        self.deferred += 1
        metrics.INGEST_ALERTS_DEFERRED.inc()
        log.warning(
            "events committed, their alerts left to the engine's inbox: %s: %s",
            type(exc).__name__, exc,
        )  # fmt: skip


def rehearsal_batch(site_id: str, device_id: str, profile: str) -> Batch:
    """A made-up SOS of one device, classified as ingest classifies one from the broker."""
    at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = {"v": 1, "event_id": str(uuid.uuid4()), "type": "sos", "phase": "pulse",
             "time": at, "profile": profile, "data": {}}  # fmt: skip
    payload = json.dumps(event)
    batch = Batch()
    Classifier().add(batch, f"eldersafe/v1/{site_id}/{device_id}/event", payload.encode(), False)
    if not batch.events:
        raise ValueError(f"the rehearsal's event was refused: {batch.dead}")
    return batch
