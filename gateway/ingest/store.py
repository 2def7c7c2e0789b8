"""The ingest store: one transaction per batch, idempotent so a retry or a redelivery adds nothing.

Telemetry is copied (binary COPY) into a per-connection staging table and moved
with ON CONFLICT DO NOTHING on its natural key; events pass through the event
ledger, so one event id is one row however often it arrives.
"""

from __future__ import annotations

import contextlib

import psycopg

from gateway.ingest.batch import Batch

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

_DEAD = "INSERT INTO dead_letters (topic, payload, reason) VALUES (%s, %s, %s)"


class IngestStore:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=5)
            await conn.execute(_STAGING)
            await conn.commit()
            self._conn = conn
        return self._conn

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
                if batch.dead:
                    await cur.executemany(_DEAD, batch.dead)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                await self._conn.close()
            self._conn = None
