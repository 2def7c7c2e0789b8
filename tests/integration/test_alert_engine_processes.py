"""The alert engine inside real ``eldersafe server`` processes: a server killed between an
event's commit and its alert, and two servers sharing inbox and timers (one SIGSTOPped)."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from typing import Any

import psycopg
from support import scalar, wait_for
from test_alert_engine import DISTRICT, T0, ingest, rows

from gateway.alerts.district import District, import_district


def set_clock(dsn: str, at: Any) -> None:
    """Move the servers' engine clock (ELDERSAFE_ENGINE_CLOCK=database) and wake them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO engine_clock (now) VALUES (%s) ON CONFLICT (id) DO UPDATE SET now = %s",
            (at, at),
        )
        conn.execute("NOTIFY engine_timers")


def two_servers(database: str, broker: Any, make_server: Any) -> tuple[Any, Any]:
    """Servers a and b (not started) on the district at T0, on the database's clock,
    each losing a stalled transaction after 1 s."""
    import_district(database, District.model_validate(DISTRICT))
    set_clock(database, T0)
    env = {
        "ELDERSAFE_ENGINE_CLOCK": "database",
        "ELDERSAFE_ENGINE_POLL_S": "0.05",
        "ELDERSAFE_ENGINE_STALLED_S": "1",
    }
    a = make_server(database, broker.port, **env)
    b = make_server(database, broker.port, username="server-2", **env)
    return a, b


def test_server_killed_between_commit_and_alert_raises_it_after_restart(
    database: str, broker: Any, make_server: Any
) -> None:
    import_district(database, District.model_validate(DISTRICT))
    set_clock(database, T0)
    env = {"ELDERSAFE_ENGINE_CLOCK": "database", "ELDERSAFE_ENGINE_POLL_S": "0.05"}
    server = make_server(database, broker.port, **env)
    server.start()
    server.wait_session()
    ingest(database, "site-a", "wb-1", "fall")  # proves the engine runs in the server
    wait_for(lambda: scalar(database, "SELECT count(*) FROM alerts") == 1, 10, "first alert")
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # cannot claim: the event is committed, no alert
    event = ingest(database, "site-a", "wb-1", "sos")
    assert rows(database, "SELECT event_id FROM engine_inbox") == [(event,)]
    server.kill()  # SIGKILL of the stopped process
    assert scalar(database, "SELECT count(*) FROM alerts WHERE type = 'sos'") == 0
    server.start()
    wait_for(
        lambda: scalar(database, "SELECT count(*) FROM alerts WHERE type = 'sos'") == 1,
        15,
        f"the sos alert after restart; log:\n{server.log_tail()}",
    )
    assert scalar(database, "SELECT count(*) FROM engine_inbox") == 0


def test_two_servers_share_inbox_and_timers_each_step_once(
    database: str, broker: Any, make_server: Any
) -> None:
    a, b = two_servers(database, broker, make_server)
    for s in (a, b):
        s.start()
    for s in (a, b):
        s.wait_session()
    devices = [f"wb-{i}" for i in range(20)]
    for d in devices:
        ingest(database, "site-a", d, "sos")
    wait_for(lambda: scalar(database, "SELECT count(*) FROM alerts") == 20, 15, "20 alerts")
    # Server a stops dead in the middle (SIGSTOP): what it holds stays locked until
    # PostgreSQL ends its stalled transaction (ENGINE_STALLED_S), then b does that work
    # too; a resumes before the last rung and finds its transaction gone.
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        for second in (60, 180):
            set_clock(database, T0 + timedelta(seconds=second))
            want = 20 * (2 if second == 60 else 3)
            wait_for(
                lambda want=want: scalar(database, "SELECT count(*) FROM alert_steps") >= want,
                15,
                f"steps at {second} s",
            )
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    set_clock(database, T0 + timedelta(seconds=300))
    wait_for(lambda: scalar(database, "SELECT count(*) FROM alert_steps") >= 80, 15, "level 3")
    set_clock(database, T0 + timedelta(seconds=301))  # one more pass for anything doubled
    set_clock(database, T0 + timedelta(seconds=302))
    wait_for(
        lambda: scalar(database, "SELECT count(*) FROM alerts WHERE level = 3") == 20, 10, "level"
    )
    per_alert = rows(
        database,
        "SELECT a.device_id, array_agg(s.level ORDER BY s.level) FROM alerts a"
        " JOIN alert_steps s ON s.alert_id = a.id GROUP BY 1",
    )
    assert sorted(per_alert) == sorted((d, [0, 1, 2, 3]) for d in devices)
    # Each step's notices once (the outbox key is unique, so count the audit entries too).
    escalated = rows(
        database,
        "SELECT detail->>'step', count(*) FROM alert_audit WHERE action = 'escalated'"
        " GROUP BY 1 HAVING count(*) > 1",
    )
    assert escalated == []
    assert scalar(database, "SELECT count(*) FROM alert_audit WHERE action = 'escalated'") == 80
    assert scalar(database, "SELECT count(DISTINCT fired_by) FROM alert_steps") >= 1


def test_sos_published_over_mqtt_becomes_one_alert_with_its_first_rung(
    database: str, broker: Any, make_server: Any
) -> None:
    """End to end through the real ingest: QoS 1 publish twice (a redelivery) → one alert."""
    import uuid

    from support import GATEWAY_PASSWORDS, publish_all

    from gateway.contract.payloads import EventPayload, EventType, Phase, dump, now_utc

    import_district(database, District.model_validate(DISTRICT))
    with psycopg.connect(database) as conn:  # this test runs on the real clock: on duty now
        # the district's own shifts are fixed times around T0: at some hours of the day
        # another person would be on duty too; only duty-1 is, whatever the hour
        conn.execute("DELETE FROM shifts")
        conn.execute(
            "INSERT INTO shifts (staff_id, starts_at, ends_at)"
            " VALUES ('duty-1', now() - interval '1 hour', now() + interval '1 hour')"
        )
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    payload = dump(
        EventPayload(v=1, event_id=uuid.uuid4(), type=EventType.SOS, phase=Phase.PULSE,
                     time=now_utc(), profile="es-wb1")
    )  # fmt: skip
    topic = "eldersafe/v1/site-a/wb-1/event"
    rcs = publish_all(
        broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], [(topic, payload, 1)] * 2
    )
    assert rcs == [0, 0]
    wait_for(
        lambda: scalar(database, "SELECT count(*) FROM notifications") == 1,
        15,
        f"the first rung; log:\n{server.log_tail()}",
    )
    assert rows(database, "SELECT type, status, count FROM alerts") == [("sos", "open", 1)]
    assert scalar(database, "SELECT count(*) FROM engine_inbox") == 0


def _blocked_by(dsn: str, holder: int) -> list[tuple[int, str]]:
    return rows(
        dsn,
        "SELECT pid, application_name FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
        (holder,),
    )


def _state(dsn: str, pid: int) -> tuple[str, str] | None:
    found = rows(dsn, "SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,))
    return (found[0][0], found[0][1]) if found else None


def test_a_server_stopped_inside_its_transaction_loses_its_claim_to_the_other(
    database: str, broker: Any, make_server: Any
) -> None:
    """The interleaving is forced: server a claims a due alert and its step's insert waits
    on a table lock the test holds; a is stopped (SIGSTOP) and the lock released, so a's
    session holds the alert's row lock waiting for a client that cannot answer. Server b's
    stall guard ends that session (ENGINE_STALLED_S), and b fires the step once."""
    a, b = two_servers(database, broker, make_server)
    a.start()
    a.wait_session()
    ingest(database, "site-a", "wb-1", "sos")
    wait_for(lambda: scalar(database, "SELECT count(*) FROM alert_steps") == 1, 10, "level 0")
    with psycopg.connect(database) as holder:
        holder.execute("LOCK TABLE alert_steps IN EXCLUSIVE MODE")
        set_clock(database, T0 + timedelta(seconds=60))
        pid = holder.info.backend_pid
        wait_for(lambda: _blocked_by(database, pid), 10, "a's step waiting on the lock")
        ((a_session, name),) = _blocked_by(database, pid)
        assert name.endswith(" server"), name
        os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        # a's session runs on to the end of what a sent, then waits for a, in its
        # transaction, with the alert's row locked
        waiting_for_a = [("idle in transaction", "ClientRead"), ("active", "ClientRead")]
        wait_for(
            lambda: _state(database, a_session) in waiting_for_a, 10, "a's session waiting for a"
        )
        assert scalar(database, "SELECT count(*) FROM alert_steps") == 1
        b.start()
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM alert_steps") == 2,
            15,
            f"b firing the step; b's log:\n{b.log_tail()}",
        )
        assert _state(database, a_session) is None
        assert "ended stalled database session" in b.log_tail()
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    set_clock(database, T0 + timedelta(seconds=61))  # a resumed: a pass for anything doubled
    wait_for(lambda: "retrying" in a.log_tail(), 10, f"a reconnecting; a's log:\n{a.log_tail()}")
    set_clock(database, T0 + timedelta(seconds=62))
    assert rows(database, "SELECT level, count(*) FROM alert_steps GROUP BY 1 ORDER BY 1") == [
        (0, 1),
        (1, 1),
    ]
    assert scalar(database, "SELECT count(*) FROM alert_audit WHERE action = 'escalated'") == 2
