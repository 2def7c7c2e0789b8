"""An alarm's alert committed in the ingest transaction of its event (gateway/alerts/inline.py),
and the engine's inbox taking over when that cannot be done at once.

Nothing but the real pipeline, the real stores and PostgreSQL: no engine worker runs in
these tests, so an alert can only come from ingest's own transaction, and a lock held
in PostgreSQL forces the fallback on every run.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from support import scalar, until
from test_alert_engine import DISTRICT

from gateway.alerts.district import District, import_district
from gateway.alerts.inline import intake_in_transaction
from gateway.alerts.unit_of_work import intake_batch
from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import AlarmStore, IngestStore
from gateway.mqtt.codec import Publish

TOPIC = "eldersafe/v1/site-a/wb-1/event"
OPENED_WITH_EVENT = """
SELECT c.xmin::text = d.xmin::text FROM device_events d
JOIN alerts a ON a.first_event_id = d.event_id
JOIN alert_changes c ON c.alert_id = a.id AND c.action = 'opened'
WHERE d.event_id = %s
"""


def _sos(event_id: uuid.UUID) -> bytes:
    at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return (
        f'{{"v":1,"event_id":"{event_id}","type":"sos","phase":"pulse",'
        f'"time":"{at}","profile":"es-wb1","data":{{}}}}'
    ).encode()


@pytest.fixture
async def pipeline(database: str):  # type: ignore[no-untyped-def]
    import_district(database, District.model_validate(DISTRICT))
    alarm = AlarmStore(
        database,
        after_events=functools.partial(intake_in_transaction, clock="system", worker="test"),
    )
    bulk = IngestStore(database)
    pipe = IngestPipeline(bulk, alarm_store=alarm)
    writer = asyncio.create_task(pipe.run())
    yield pipe, alarm
    writer.cancel()
    await bulk.close()
    await alarm.close()


async def test_the_alert_commits_in_the_transaction_of_its_event(
    database: str, pipeline: tuple[IngestPipeline, AlarmStore]
) -> None:
    pipe, alarm = pipeline
    event_id = uuid.uuid4()
    pipe.on_publish(1, Publish(TOPIC, _sos(event_id), 1, 1))
    await until(lambda: pipe.acked == 1, 20, "the event acknowledged", interval=0.01)
    # At the acknowledgement the alert is there, written by the event's own transaction,
    # and the inbox row that carried it is gone with it.
    assert scalar(database, OPENED_WITH_EVENT, (event_id,)) is True
    assert scalar(database, "SELECT count(*) FROM engine_inbox") == 0
    assert scalar(database, "SELECT count(*) FROM alerts WHERE type = 'sos'") == 1
    assert alarm.deferred == 0


async def test_a_held_lock_leaves_the_alert_to_the_inbox_and_the_event_commits(
    database: str, pipeline: tuple[IngestPipeline, AlarmStore]
) -> None:
    pipe, alarm = pipeline
    event_id = uuid.uuid4()
    holder = await psycopg.AsyncConnection.connect(database)
    try:
        # Another transaction holds the alerts table: the intake's lock waits past its
        # timeout, its savepoint rolls back, and the event must commit all the same.
        await holder.execute("LOCK TABLE alerts IN EXCLUSIVE MODE")
        pipe.on_publish(1, Publish(TOPIC, _sos(event_id), 1, 1))
        await until(lambda: pipe.acked == 1, 20, "the event acknowledged", interval=0.01)
        assert scalar(database, "SELECT count(*) FROM device_events WHERE event_id = %s",
                      (event_id,)) == 1  # fmt: skip
        assert scalar(database, "SELECT count(*) FROM engine_inbox WHERE event_id = %s",
                      (event_id,)) == 1  # fmt: skip
        assert alarm.deferred == 1
    finally:
        await holder.rollback()
        await holder.close()
    assert scalar(database, "SELECT count(*) FROM alerts") == 0
    # The engine's inbox worker takes it as it takes any committed event.
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        out = await intake_batch(conn, datetime.now(UTC), 50, "worker")
    assert out.events == 1
    assert scalar(database, "SELECT count(*) FROM alerts WHERE type = 'sos'") == 1
    assert scalar(database, "SELECT count(*) FROM engine_inbox") == 0
