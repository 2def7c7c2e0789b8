"""The ingest store: one transaction per batch, idempotent so a retry or a redelivery adds nothing.

Telemetry is copied (binary COPY) into a per-connection staging table and moved
with ON CONFLICT DO NOTHING on its natural key; events pass through the event
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

import contextlib
import hashlib
import time

import psycopg

from gateway import metrics
from gateway.ingest.batch import Batch, DeadLetter

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
_COPY = (
    "COPY telemetry_in (time, site_id, device_id, metric, value, unit) FROM STDIN (FORMAT BINARY)"
)
_MOVE = "INSERT INTO telemetry SELECT * FROM telemetry_in ON CONFLICT DO NOTHING"
_TYPES = ["timestamptz", "text", "text", "text", "float8", "text"]

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
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._registered: frozenset[str] = frozenset()
        self._registered_at = -1e9  # monotonic time of the last look-up

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=5)
            await conn.execute(_STAGING)
            await conn.commit()
            self._conn = conn
        return self._conn

    async def _unregistered(
        self, cur: psycopg.AsyncCursor[tuple[object, ...]], sites: dict[str, int]
    ) -> list[tuple[str, int]]:
        """Sites of the batch not in ``sites``; the registry is read again only on a miss."""
        now = time.monotonic()
        stale = now - self._registered_at
        missing = [s for s in sites if s not in self._registered]
        if (missing and stale >= SITES_REFRESH_S) or stale >= SITES_MAX_AGE_S:
            await cur.execute("SELECT id FROM sites")
            self._registered = frozenset(str(r[0]) for r in await cur.fetchall())
            self._registered_at = now
            missing = [s for s in sites if s not in self._registered]
        return [(s, sites[s]) for s in missing]

    async def write(self, batch: Batch) -> None:
        """Make the batch durable (committed) or raise; safe to call again with the same batch."""
        conn = await self._connection()
        try:
            async with conn.transaction(), conn.cursor() as cur:
                if batch.telemetry:
                    async with cur.copy(_COPY) as copy:
                        copy.set_types(_TYPES)
                        for row in batch.telemetry:
                            await copy.write_row(row)
                    await cur.execute(_MOVE)
                if batch.events:
                    await cur.executemany(
                        _EVENT,
                        [
                            (e[0], e[1], e[1], e[2], e[3], e[4], e[5], e[6], e[7])
                            for e in batch.events
                        ],
                    )
                if batch.statuses:
                    await cur.executemany(_STATUS, list(batch.statuses.values()))
                if batch.command_results:
                    await cur.executemany(_COMMAND_RESULT, batch.command_results)
                if batch.dead:
                    await cur.executemany(_DEAD, [dead_letter_row(d) for d in batch.dead])
                unregistered = await self._unregistered(cur, batch.sites) if batch.sites else []
                if unregistered:
                    await cur.executemany(_UNREGISTERED, unregistered)
        except BaseException:
            await self.close()
            raise
        if unregistered:
            metrics.INGEST_UNREGISTERED.inc(sum(n for _, n in unregistered))

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                await self._conn.close()
            self._conn = None
