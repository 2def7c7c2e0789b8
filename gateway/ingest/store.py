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
import time

import psycopg

from gateway import metrics
from gateway.ingest.batch import TELEMETRY_COLUMNS, Batch, DeadLetter

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
        self._registered: frozenset[str] = frozenset()
        self._registered_at = -1e9  # monotonic time of the last look-up
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
        """Sites of the batch not in ``sites``; the registry is read again only on a miss."""
        now = time.monotonic()
        stale = now - self._registered_at
        missing = [s for s in sites if s not in self._registered]
        if (missing and stale >= SITES_REFRESH_S) or stale >= SITES_MAX_AGE_S:
            cur.execute("SELECT id FROM sites")
            self._registered = frozenset(str(r[0]) for r in cur.fetchall())
            self._registered_at = now
            missing = [s for s in sites if s not in self._registered]
        # in site order: two lanes' transactions then lock shared rows in one order
        return [(s, sites[s]) for s in sorted(missing)]

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
            if batch.events:
                cur.executemany(
                    _EVENT,
                    [(e[0], e[1], e[1], e[2], e[3], e[4], e[5], e[6], e[7]) for e in batch.events],
                )
            if batch.statuses:
                cur.executemany(_STATUS, list(batch.statuses.values()))
            if batch.command_results:
                cur.executemany(_COMMAND_RESULT, batch.command_results)
            if batch.dead:
                cur.executemany(_DEAD, [dead_letter_row(d) for d in batch.dead])
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
