"""Device events in a lane of their own: an SOS is committed and acknowledged while a
telemetry COPY waits (issue 7's device → alert latency), and the ingest metrics of
issue 9 (batch sizes, arrival → commit lag) count both lanes.

The telemetry write is held by a real table lock in PostgreSQL, not by a fake store:
with one lane the event would sit behind it, and the test fails every run.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import psycopg
from prometheus_client import REGISTRY
from support import scalar, until

from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import IngestStore
from gateway.mqtt.codec import Publish

SITE = "site-a"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(event_id: uuid.UUID) -> bytes:
    return (
        f'{{"v":1,"event_id":"{event_id}","type":"sos","phase":"pulse",'
        f'"time":"{_now()}","profile":"es-cb1","data":{{}}}}'
    ).encode()


def _telemetry() -> bytes:
    return f'{{"v":1,"time":"{_now()}","readings":[{{"metric":"temp","value":21.5}}]}}'.encode()


def _copy_waits_for_lock(dsn: str) -> bool:
    return bool(
        scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            r" AND query ~* 'copy\s+telemetry'",
        )
    )


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_an_event_is_committed_while_a_telemetry_copy_waits(database: str) -> None:
    bulk, alarm = IngestStore(database), IngestStore(database)
    pipeline = IngestPipeline(bulk, alarm_store=alarm)
    writer = asyncio.create_task(pipeline.run())
    batches = _sample("eldersafe_ingest_batch_messages_count")
    lags = _sample("eldersafe_ingest_lag_seconds_count")
    event_id = uuid.uuid4()
    holder = await psycopg.AsyncConnection.connect(database)
    try:
        await holder.execute("LOCK TABLE telemetry IN SHARE MODE")  # COPY must wait for it
        pipeline.on_publish(1, Publish(f"eldersafe/v1/{SITE}/wb-1/telemetry", _telemetry(), 1, 1))
        await until(lambda: _copy_waits_for_lock(database), 20, "the telemetry COPY blocked")
        pipeline.on_publish(1, Publish(f"eldersafe/v1/{SITE}/btn-1/event", _event(event_id), 1, 2))
        await until(lambda: pipeline.acked == 1, 20, "the event acknowledged", interval=0.01)
        stored = scalar(database, "SELECT count(*) FROM device_events WHERE event_id = %s",
                        (event_id,))  # fmt: skip
        assert stored == 1
        assert _copy_waits_for_lock(database), "the telemetry was not held: nothing proven"
        await holder.rollback()  # the lock goes: the telemetry batch commits
        await until(lambda: pipeline.acked == 2, 20, "the telemetry acknowledged", interval=0.01)
        assert scalar(database, "SELECT count(*) FROM telemetry") == 1
    finally:
        await holder.close()
        writer.cancel()
        await bulk.close()
        await alarm.close()
    assert _sample("eldersafe_ingest_batch_messages_count") == batches + 2
    assert _sample("eldersafe_ingest_batch_messages_sum") >= 2
    assert _sample("eldersafe_ingest_lag_seconds_count") == lags + 2
