"""The engine's intake run inside ingest's alarm transaction (``AlarmStore.after_events``).

An event's alert is then committed with the event: no commit, notification and claim
between them, which was most of the device → alert latency (bench/alert_latency.py).
The inbox is still the guarantee: ``intake_within`` claims the batch's own inbox rows
(visible to its transaction, to nobody else before the commit) with the same site lock,
dedup-key locks and exactly-once step records as the workers, as statements of the
lane's own pipelined transaction. What it cannot take (a site another server is working
on, a lock held past ``LOCK_TIMEOUT``, any failure) fails that transaction; the lane
writes the events again without it, and the workers raise their alerts after the
commit, woken by the inbox trigger.
"""

from __future__ import annotations

from typing import Any

import psycopg

from gateway.alerts.unit_of_work import intake_within
from gateway.alerts.workers import ClockSource, count_outcome, engine_now

# Ingest must not wait behind another server's alert: past this, the lane writes the
# events without their alerts and the workers take them (they may wait; ingest's
# acknowledgements may not).
LOCK_TIMEOUT = "20ms"
STATEMENT_TIMEOUT = "2s"


async def intake_in_transaction(
    conn: psycopg.AsyncConnection[Any],
    clock: ClockSource,
    worker: str,
    batch: int = 50,
    *,
    counted: bool = True,
) -> None:
    """Apply the inbox rows the caller's transaction wrote (and any other free ones);
    ``counted=False``: a rehearsal, rolled back, kept out of the engine's counters."""
    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    await conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
    now = await engine_now(conn, clock)
    while True:
        out = await intake_within(conn, now, batch, worker)
        if counted:
            count_outcome(out)
        if out.events < batch:
            break
    # The COMMIT that follows numbers the change log under a lock (migration 0007): it
    # waits as long as it must, and a timeout there would roll the events back.
    await conn.execute("SET LOCAL lock_timeout TO DEFAULT")
    await conn.execute("SET LOCAL statement_timeout TO DEFAULT")
