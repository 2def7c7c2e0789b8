"""Nothing lost, nothing doubled: a database outage and a killed server while events flow."""

from __future__ import annotations

import psycopg
from support import GATEWAY_PASSWORDS, EventStream, scalar, wait_for


def stored(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM device_events"))


def assert_exactly_once(dsn: str, sent: list[str]) -> None:
    def all_there() -> bool:
        return scalar(dsn, "SELECT count(*) FROM device_events") >= len(sent)

    wait_for(all_there, 60, f"{len(sent)} events in the database")
    with psycopg.connect(dsn) as conn:
        stored = [str(r[0]) for r in conn.execute("SELECT event_id FROM device_events")]
        ledger = conn.execute("SELECT count(*) FROM event_ledger").fetchone()
    assert len(stored) == len(set(stored)), "an event id was stored twice"
    assert sorted(stored) == sorted(sent), "events lost or invented"
    assert ledger == (len(sent),)


def test_database_outage_of_20s_loses_and_doubles_nothing(
    broker, pg_cluster, database, make_server
) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    stream = EventStream(
        broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], "site-a", 200
    ).start()
    # the phases are counted in events sent (200/s), not slept: 20 s of outage is
    # 4,000 events published while PostgreSQL is down
    wait_for(lambda: stored(database) >= 300, 30, "events flowing into the database")
    pg_cluster.stop("fast")
    try:
        down_at = len(stream.ids)
        wait_for(lambda: len(stream.ids) >= down_at + 4000, 60, "4,000 events during the outage")
    finally:
        pg_cluster.start()
    up_at = len(stream.ids)
    wait_for(lambda: len(stream.ids) >= up_at + 600, 30, "600 more events after the outage")
    sent = stream.stop()
    assert len(sent) > 200 * 24
    assert_exactly_once(database, sent)
    assert server.proc is not None and server.proc.poll() is None
    assert b"ingest store unavailable" in server.log_path.read_bytes()


def test_server_killed_with_sigkill_loses_and_doubles_nothing(
    broker, database, make_server
) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    stream = EventStream(
        broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], "site-a", 200
    ).start()
    wait_for(lambda: stored(database) >= 600, 30, "events flowing into the database")
    server.kill()
    killed_at = len(stream.ids)
    # events keep coming; the broker queues them for the persistent session
    wait_for(lambda: len(stream.ids) >= killed_at + 600, 30, "600 events queued at the broker")
    before = stored(database)
    server.start()
    wait_for(lambda: stored(database) >= before + 100, 30, "the backlog draining")
    server.kill()  # a second crash, right after the backlog started draining
    server.start()
    restarted_at = len(stream.ids)
    wait_for(lambda: len(stream.ids) >= restarted_at + 600, 30, "600 more events")
    sent = stream.stop()
    assert_exactly_once(database, sent)
