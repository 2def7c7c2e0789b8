"""The alert engine over real PostgreSQL: intake exactly once, dedup, escalation with a
controlled clock, and two workers that never fire a step twice (forced interleavings)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
import yaml
from support import until

from alerting.conditions import THRESHOLD_RULES
from alerting.lifecycle import acknowledge
from alerting.model import Channel, staff_actor
from alerting.ports import ManualClock
from gateway.alerts.district import District, import_district
from gateway.alerts.feed import changes_after
from gateway.alerts.store import PgAlertTransaction
from gateway.alerts.unit_of_work import (
    SITE_LOCK_SPACE,
    command,
    conditions_batch,
    inactivity_sweep,
    intake_batch,
    timers_tick,
)
from gateway.alerts.workers import EngineWorkers

T0 = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai: waking hours

DISTRICT: dict[str, Any] = {
    "organisations": [
        {"id": "bureau", "kind": "bureau", "name": "区民政局",
         "webhook_url": "http://127.0.0.1:9/bureau"},
        {"id": "street-1", "parent": "bureau", "kind": "street", "name": "街道中心"},
        {"id": "station-1", "parent": "street-1", "kind": "station", "name": "社区站"},
    ],
    "sites": [
        {"id": "site-a", "organisation": "station-1", "name": "家 A"},
        {"id": "site-b", "organisation": "station-1", "name": "家 B"},
    ],
    "residents": [
        {"id": "r-a", "site": "site-a", "name": "王奶奶", "lives_alone": True,
         "family": [{"name": "王小明", "phone": "+8613800000001"}]},
    ],
    "devices": [{"site": "site-a", "id": "wb-1", "profile": "es-wb1", "address": "aa",
                 "resident": "r-a"}],
    "staff": [
        {"id": "duty-1", "organisation": "station-1", "name": "李", "role": "duty",
         "phone": "+8613900000001", "apprise_url": "json://127.0.0.1:9/duty-1"},
        {"id": "duty-off", "organisation": "station-1", "name": "赵", "role": "duty"},
        {"id": "sup-1", "organisation": "station-1", "name": "张", "role": "supervisor"},
        {"id": "street-a", "organisation": "street-1", "name": "陈", "role": "street"},
    ],
    "shifts": [
        {"staff": "duty-1", "starts_at": (T0 - timedelta(hours=1)).isoformat(),
         "ends_at": (T0 + timedelta(hours=12)).isoformat()},
        {"staff": "duty-off", "starts_at": (T0 + timedelta(hours=12)).isoformat(),
         "ends_at": (T0 + timedelta(hours=24)).isoformat()},
    ],
}  # fmt: skip

# As ingest writes an event (gateway/ingest/store.py): the ledger makes the id unique.
INGEST_EVENT = """
WITH fresh AS (
    INSERT INTO event_ledger (event_id, time) VALUES (%s, %s)
    ON CONFLICT (event_id) DO NOTHING RETURNING event_id
)
INSERT INTO device_events (event_id, time, site_id, device_id, type, phase, profile, data)
SELECT event_id, %s, %s, %s, %s, %s, %s, %s::jsonb FROM fresh
"""


def ingest(
    dsn: str,
    site: str,
    device: str,
    kind: str,
    phase: str = "pulse",
    at: datetime = T0,
    event_id: uuid.UUID | None = None,
) -> uuid.UUID:
    event_id = event_id or uuid.uuid4()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            INGEST_EVENT, (event_id, at, at, site, device, kind, phase, "es-wb1", json.dumps({}))
        )
    return event_id


def rows(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def district(database: str) -> str:
    import_district(database, District.model_validate(DISTRICT))
    return database


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def drain(dsn: str, now: datetime) -> int:
    async with await connect(dsn) as conn:
        total = 0
        while (out := await intake_batch(conn, now)).events:
            total += out.events
        return total


async def test_a_button_press_is_answered_alarm_received_and_a_band_is_not(district: str) -> None:
    """Downlinks follow the device's profile: a button's LED blinks "alarm received";
    a wristband has no such command, so none is queued for it."""
    dsn = district
    rows(dsn, "INSERT INTO devices (site_id, id, profile, address) VALUES"
              " ('site-b', 'btn-1', 'es-cb1', '00012345') RETURNING id")  # fmt: skip
    ingest(dsn, "site-b", "btn-1", "sos")
    ingest(dsn, "site-a", "wb-1", "fall")
    assert await drain(dsn, T0) == 2
    assert rows(dsn, "SELECT device_id, action FROM downlink_outbox") == [
        ("btn-1", "alarm_received")
    ]


async def test_event_becomes_exactly_one_alert_and_redelivery_adds_nothing(district: str) -> None:
    dsn = district
    e1 = ingest(dsn, "site-a", "wb-1", "sos")
    assert rows(dsn, "SELECT event_id FROM engine_inbox") == [(e1,)], "trigger wrote the inbox"
    assert await drain(dsn, T0) == 1
    alerts = rows(dsn, "SELECT type, status, count, first_event_id FROM alerts")
    assert alerts == [("sos", "open", 1, e1)]
    # Redelivered through ingest: the ledger stops it before device_events.
    ingest(dsn, "site-a", "wb-1", "sos", event_id=e1)
    # Written again behind the ledger's back (another time): the engine itself refuses it.
    ingest_again = "INSERT INTO device_events (event_id, time, site_id, device_id, type, phase,"
    ingest_again += " profile) VALUES (%s, %s, 'site-a', 'wb-1', 'sos', 'pulse', 'es-wb1')"
    with psycopg.connect(dsn) as conn:
        conn.execute(ingest_again, (e1, T0 + timedelta(seconds=1)))
    assert await drain(dsn, T0) == 1
    assert rows(dsn, "SELECT count(*), max(count) FROM alerts") == [(1, 1)]
    assert rows(dsn, "SELECT count(*) FROM engine_inbox") == [(0,)]
    # The first rung went out at once. "Alarm received" is a button's LED command:
    # the wristband's profile lacks it, so nothing is queued for the band yet.
    assert rows(dsn, "SELECT step_id FROM alert_steps") != []
    assert rows(dsn, "SELECT action FROM downlink_outbox") == []


async def test_one_press_two_receivers_and_repeats_is_one_alert(district: str) -> None:
    dsn = district
    press = uuid.uuid4()
    ingest(dsn, "site-a", "wb-1", "sos", event_id=press)  # receiver 1
    ingest(dsn, "site-a", "wb-1", "sos", event_id=press)  # receiver 2: same event id
    for i in range(3):  # the button repeats its press with new ids
        ingest(dsn, "site-a", "wb-1", "sos", at=T0 + timedelta(seconds=i + 1))
    assert await drain(dsn, T0 + timedelta(seconds=5)) == 4
    assert rows(dsn, "SELECT type, count FROM alerts") == [("sos", 4)]


async def test_two_smoke_detectors_one_incident_and_site_offline_one_alert(district: str) -> None:
    dsn = district
    ingest(dsn, "site-a", "smoke-1", "smoke", "raise")
    ingest(dsn, "site-a", "smoke-2", "smoke", "raise", at=T0 + timedelta(seconds=2))
    for i in range(20):
        ingest(dsn, "site-b", f"dev-{i}", "device_offline", "raise")
    assert await drain(dsn, T0 + timedelta(seconds=3)) == 22
    got = rows(dsn, "SELECT type, site_id, device_id, cardinality(sources) FROM alerts ORDER BY 1")
    assert got == [("device_offline", "site-b", None, 20), ("smoke", "site-a", None, 2)]
    # Smoke informs the bureau at once.
    assert ("bureau:bureau", "webhook") in rows(
        dsn, "SELECT person_id, channel FROM notifications n JOIN alerts a ON a.id = n.alert_id"
        " WHERE a.type = 'smoke' AND n.level = 0"
    )


def steps(dsn: str) -> list[tuple[str, int]]:
    return rows(dsn, "SELECT kind, level FROM alert_steps ORDER BY due_at, kind, level")


def notices(dsn: str) -> list[tuple[int, str, str]]:
    return rows(dsn, "SELECT level, person_id, channel FROM notifications ORDER BY id")


async def test_unacknowledged_sos_climbs_the_ladder_each_step_once(district: str) -> None:
    dsn = district
    clock = ManualClock(T0)
    ingest(dsn, "site-a", "wb-1", "sos")
    await drain(dsn, clock.now())
    assert steps(dsn) == [("level", 0)]
    assert notices(dsn) == [(0, "staff:duty-1", "console")], "on-duty staff only, at once"
    async with await connect(dsn) as conn:
        for second in (1, 30, 59, 60, 60, 61, 120, 179, 180, 181, 299, 300, 300, 301):
            clock.set(T0 + timedelta(seconds=second))
            await timers_tick(conn, clock.now())
            await timers_tick(conn, clock.now())  # a second pass at one instant adds nothing
            want = [("level", n) for n, at in enumerate((0, 60, 180, 300)) if at <= second]
            assert steps(dsn) == want, f"at {second} s"
    assert notices(dsn) == [
        (0, "staff:duty-1", "console"),
        (1, "staff:sup-1", "console"),
        (1, "family:1:王小明", "voice"),
        (2, "staff:street-a", "console"),
        (3, "bureau:bureau", "webhook"),
    ]
    assert rows(dsn, "SELECT level, next_step_at FROM alerts") == [
        (3, T0 + timedelta(minutes=15))  # the top rung repeats every 10 min until acknowledged
    ]


async def test_acknowledged_at_90_s_stops_at_level_1_and_tells_the_wristband(
    district: str,
) -> None:
    dsn = district
    clock = ManualClock(T0)
    ingest(dsn, "site-a", "wb-1", "sos")
    await drain(dsn, clock.now())
    (alert_id,) = rows(dsn, "SELECT id FROM alerts")[0]
    async with await connect(dsn) as conn:
        clock.set(T0 + timedelta(seconds=60))
        await timers_tick(conn, clock.now())
        clock.set(T0 + timedelta(seconds=90))
        await command(
            conn, alert_id, lambda a: acknowledge(staff_actor("duty-1"), Channel.CONSOLE),
            clock.now(),
        )  # fmt: skip
        for second in (180, 300, 600):
            clock.set(T0 + timedelta(seconds=second))
            await timers_tick(conn, clock.now())
    assert steps(dsn) == [("level", 0), ("level", 1)]
    assert rows(dsn, "SELECT status, level FROM alerts") == [("acknowledged", 1)]
    downlinks = "SELECT site_id, device_id, action FROM downlink_outbox ORDER BY created_at"
    assert rows(dsn, downlinks) == [("site-a", "wb-1", "acknowledge")]
    # The next wake-up is the 10-minute reminder, not a rung.
    assert rows(dsn, "SELECT next_step_at FROM alerts") == [(T0 + timedelta(seconds=690),)]


async def test_two_workers_never_fire_a_step_twice(district: str) -> None:
    """Force the interleavings: a row lock held by the test, then both workers at once."""
    dsn = district
    ingest(dsn, "site-a", "wb-1", "sos")
    async with await connect(dsn) as a, await connect(dsn) as b, await connect(dsn) as hold:
        # Inbox: the test holds the row; a worker skips it rather than waiting or taking it.
        async with hold.transaction():
            await hold.execute("SELECT * FROM engine_inbox FOR UPDATE")
            # (a worker that waits instead of skipping fails here, not hangs)
            skipped = await asyncio.wait_for(intake_batch(b, T0, worker="b"), 5)
            assert skipped.events == 0
        done = await asyncio.gather(
            intake_batch(a, T0, worker="a"), intake_batch(b, T0, worker="b")
        )
        assert sum(o.events for o in done) == 1
        assert rows(dsn, "SELECT count(*) FROM alerts") == [(1,)]
        # Timers: the test holds the alert; a worker at 60 s skips it and fires nothing.
        at = T0 + timedelta(seconds=60)
        async with hold.transaction():
            await hold.execute("SELECT * FROM alerts FOR UPDATE")
            skipped = await asyncio.wait_for(timers_tick(b, at, worker="b"), 5)
            assert skipped.steps == 0
        done = await asyncio.gather(timers_tick(a, at, worker="a"), timers_tick(b, at, worker="b"))
        assert sum(o.steps for o in done) == 1
        # And when a stale worker's view slips past the lock, the step key refuses it.
        later = await asyncio.gather(*(timers_tick(c, at) for c in (a, b)))
        assert sum(o.steps for o in later) == 0
    assert steps(dsn) == [("level", 0), ("level", 1)]
    assert rows(dsn, "SELECT count(*), count(DISTINCT key) FROM notifications") == [(3, 3)]


async def test_a_poison_event_is_kept_with_its_reason_and_blocks_nothing(district: str) -> None:
    dsn = district
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO device_events (event_id, time, site_id, device_id, type, phase, profile)"
            " VALUES (%s, %s, 'site-a', 'wb-1', 'no-such-type', 'pulse', 'x')",
            (uuid.uuid4(), T0),
        )
    ingest(dsn, "site-a", "wb-1", "fall")
    assert await drain(dsn, T0) == 2
    assert rows(dsn, "SELECT type FROM alerts") == [("fall",)]
    (reason,) = rows(dsn, "SELECT reason FROM engine_dead_letters")[0]
    assert "no-such-type" in reason


def eldersafe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


async def test_audit_verify_names_edited_inserted_and_deleted_rows(district: str) -> None:
    dsn = district
    for device in ("wb-1", "wb-2", "wb-3", "wb-4"):
        ingest(dsn, "site-a", device, "sos")
    await drain(dsn, T0)
    async with await connect(dsn) as conn:
        await timers_tick(conn, T0 + timedelta(seconds=60))  # each chain: opened, level 0, 1
    ok = eldersafe("audit", "verify", "--database-url", dsn)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact: 12 rows" in ok.stdout
    ids = {d: a for a, d in rows(dsn, "SELECT id, device_id FROM alerts")}
    with psycopg.connect(dsn) as conn:
        conn.execute(  # edited: a level changed after the fact
            "UPDATE alert_audit SET detail = jsonb_set(detail, '{level}', '2') "
            "WHERE alert_id = %s AND seq = 2", (ids["wb-1"],),
        )  # fmt: skip
        conn.execute(  # inserted: a forged acknowledgement between two real rows
            "INSERT INTO alert_audit (time, alert_id, seq, actor, action, channel, detail, hash)"
            " SELECT time + interval '1 ms', alert_id, 2, 'staff:duty-1', 'acknowledged',"
            " 'console', '{}', hash"
            " FROM alert_audit WHERE alert_id = %s AND seq = 1", (ids["wb-2"],),
        )  # fmt: skip
        conn.execute(  # deleted: the newest row
            "DELETE FROM alert_audit WHERE alert_id = %s AND seq = 3", (ids["wb-3"],)
        )
    bad = eldersafe("audit", "verify", "--database-url", dsn)
    assert bad.returncode == 1, bad.stdout
    lines = [ln for ln in bad.stdout.splitlines() if ln.endswith(")") or "row:" in ln]
    named = {ln.split(": ")[1].split(" ")[1]: ln for ln in lines if "row:" in ln}
    assert named.keys() == {str(ids[d]) for d in ("wb-1", "wb-2", "wb-3")}, bad.stdout
    assert named[str(ids["wb-1"])].startswith("edited row") and "seq 2" in named[str(ids["wb-1"])]
    assert named[str(ids["wb-2"])].startswith("inserted row") and "seq 2" in named[str(ids["wb-2"])]
    assert named[str(ids["wb-3"])].startswith("deleted row") and "seq 3" in named[str(ids["wb-3"])]


async def test_a_sites_events_are_applied_in_order_by_one_worker_at_a_time(
    district: str,
) -> None:
    """A worker holding site-a's rows (its site lock) keeps another off site-a's later rows,
    so a smoke clear is never applied before the raise it follows."""
    dsn = district
    ingest(dsn, "site-a", "smoke-1", "smoke", "raise")
    async with await connect(dsn) as a, await connect(dsn) as b, a.transaction():
        # worker a: mid-batch, holds site-a's raise
        cur = await a.execute(
            "SELECT id FROM engine_inbox WHERE pg_try_advisory_xact_lock(%s, hashtext(site_id))"
            " FOR UPDATE SKIP LOCKED", (SITE_LOCK_SPACE,),
        )  # fmt: skip
        assert len(await cur.fetchall()) == 1
        ingest(dsn, "site-a", "smoke-1", "smoke", "clear", at=T0 + timedelta(seconds=1))
        ingest(dsn, "site-b", "smoke-9", "smoke", "raise")
        out = await intake_batch(b, T0, worker="b")
        assert out.events == 1, "b takes site-b only, not site-a's clear"
        assert rows(dsn, "SELECT site_id FROM alerts") == [("site-b",)]
    assert await drain(dsn, T0 + timedelta(seconds=2)) == 2
    assert rows(dsn, "SELECT site_id, status, condition_cleared_at IS NOT NULL FROM alerts"
                " ORDER BY 1") == [("site-a", "open", True), ("site-b", "open", False)]


async def test_acknowledged_fall_reminds_at_10_min_and_escalates_at_15_min(district: str) -> None:
    """The 15-minute service circle: acknowledged, nobody on scene."""
    dsn = district
    ingest(dsn, "site-a", "wb-1", "fall")
    await drain(dsn, T0)
    (alert_id,) = rows(dsn, "SELECT id FROM alerts")[0]
    async with await connect(dsn) as conn:
        await command(
            conn, alert_id, lambda a: acknowledge(staff_actor("duty-1"), Channel.CONSOLE),
            T0 + timedelta(seconds=30),
        )  # fmt: skip
        for minute in (5, 10.5, 10.5, 14, 15.5, 15.5):
            await timers_tick(conn, T0 + timedelta(seconds=30 + minute * 60))
    assert steps(dsn) == [("level", 0), ("reminder", 0), ("service_circle", 1)]
    got = rows(dsn, "SELECT s.kind, n.person_id FROM notifications n"
               " JOIN alert_steps s USING (step_id) WHERE s.kind <> 'level' ORDER BY n.id")
    assert got == [
        ("reminder", "staff:duty-1"),  # whoever acknowledged
        ("service_circle", "staff:sup-1"),
        ("service_circle", "family:1:王小明"),
    ]


def test_district_import_is_idempotent_and_all_or_nothing(
    database: str, tmp_path: pathlib.Path
) -> None:
    env = {"ELDERSAFE_DATABASE_URL": database, "ELDERSAFE_ENVIRONMENT": "test"}
    path = tmp_path / "district.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(DISTRICT)), allow_unicode=True))
    tables = ("organisations", "sites", "residents", "family_contacts", "devices", "staff",
              "shifts")  # fmt: skip
    counts = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in tables)
    first = eldersafe("district-import", str(path), env=env)
    assert first.returncode == 0, first.stderr
    once = rows(database, counts)
    assert once == [(3, 2, 1, 1, 1, 4, 2)]
    again = eldersafe("district-import", str(path), env=env)
    assert again.returncode == 0, again.stderr
    assert rows(database, counts) == once
    broken = dict(DISTRICT, staff=[*DISTRICT["staff"], {"id": "x", "organisation": "nowhere",
                                                         "name": "x", "role": "duty"}])
    path.write_text(yaml.safe_dump(json.loads(json.dumps(broken)), allow_unicode=True))
    refused = eldersafe("district-import", str(path), env=env)
    assert refused.returncode == 1 and "nowhere" in refused.stderr, refused.stderr
    assert rows(database, counts) == once


async def test_change_feed_never_passes_a_change_an_open_transaction_commits_later(
    district: str,
) -> None:
    """A writer that took its xid first and inserts its change after a later writer committed
    (and one that inserted first and commits last): the feed shows the later commits at
    once and misses neither of the slow ones, because positions follow commit order."""
    dsn = district
    forged = (
        "INSERT INTO alert_changes (alert_id, seq, time, action, alert)"
        " VALUES (gen_random_uuid(), 1, now(), 'opened', '{}') RETURNING position"
    )
    seen: list[int] = []

    async def read(reader: psycopg.AsyncConnection[Any]) -> None:
        while batch := await changes_after(reader, seen[-1] if seen else None):
            seen.extend(c.position for c in batch)

    async with await connect(dsn) as early, await connect(dsn) as slow, await connect(dsn) as r:
        async with early.transaction(), slow.transaction():
            await early.execute("SELECT pg_current_xact_id()")  # xid now, change row later
            await slow.execute(forged)  # inserted first, committed last
            ingest(dsn, "site-a", "wb-1", "sos")
            await drain(dsn, T0)
            await read(r)
            drained = list(seen)
            assert drained, "a committed change is shown while older transactions are open"
            await early.execute(forged)
        await read(r)
    every = [p for (p,) in rows(dsn, "SELECT commit_seq FROM alert_changes")]
    assert sorted(seen) == sorted(every) and len(seen) == len(set(seen))
    assert len(seen) == len(drained) + 2 and min(seen[len(drained):]) > max(drained)


async def test_residual_current_warns_at_240_alarms_at_300_twice_clears_below_the_band(
    district: str,
) -> None:
    dsn = district
    series = [200, 245, 250, 290, 305, 310, 280, 260, 250, 210, 200]
    with psycopg.connect(dsn) as conn:
        for i, value in enumerate(series):  # as ingest writes telemetry
            conn.execute(
                "INSERT INTO telemetry (time, site_id, device_id, metric, value, unit)"
                " VALUES (%s, 'site-a', 'ef-1', 'residual_current_ma', %s, 'mA')",
                (T0 + timedelta(seconds=10 * i), value),
            )
        conn.execute(  # any other metric is not queued
            "INSERT INTO telemetry (time, site_id, device_id, metric, value)"
            " VALUES (%s, 'site-a', 'wb-1', 'heart_rate', 70)", (T0,),
        )  # fmt: skip
    assert rows(dsn, "SELECT count(*) FROM condition_inbox") == [(len(series),)]
    later = T0 + timedelta(minutes=2)  # the engine's clock, after the readings
    async with await connect(dsn) as conn:
        assert (await conditions_batch(conn, later, limit=3)).events == 3  # 200, 245, 250
        assert rows(dsn, "SELECT type, severity, status FROM alerts") == [
            ("electrical", "minor", "open")  # the early warning: two readings >= 240
        ]
        await conditions_batch(conn, later, limit=3)  # 290, 305, 310
        assert rows(dsn, "SELECT severity, status FROM alerts") == [("major", "open")]
        await conditions_batch(conn, later, limit=3)  # 280, 260, 250: eased to a warning
        assert rows(dsn, "SELECT status FROM alerts") == [("open",)]
        await conditions_batch(conn, later, limit=3)  # 210, 200: below 216 twice
    assert rows(dsn, "SELECT status, outcome, count(*) OVER () FROM alerts") == [
        ("resolved", "cleared", 1)
    ]
    assert rows(dsn, "SELECT count(*) FROM condition_inbox") == [(0,)]
    actions = [a for (a,) in rows(dsn, "SELECT action FROM alert_audit ORDER BY seq")]
    assert actions[:2] == ["opened", "escalated"]
    assert "severity_raised" in actions and actions[-1] == "resolved"


async def test_threshold_metrics_of_the_trigger_are_the_rules_metrics(database: str) -> None:
    """The trigger's WHEN list is SQL; it must name exactly the rules' metrics."""
    (definition,) = rows(
        database, "SELECT pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE tgname = 'telemetry_condition_inbox'",
    )[0]  # fmt: skip
    named = set(re.findall(r"'([a-z0-9_]+)'::text", definition))
    assert named == set().union(*(r.metrics for r in THRESHOLD_RULES))


def activity(dsn: str, at: datetime, value: float = 5.0) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO telemetry (time, site_id, device_id, metric, value)"
            " VALUES (%s, 'site-a', 'wb-1', 'activity', %s)", (at, value),
        )  # fmt: skip


async def test_elder_living_alone_without_movement_raises_inactivity_outside_night_hours(
    district: str,
) -> None:
    dsn = district
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE residents SET inactivity_window_min = 120")
    local = ZoneInfo("Asia/Shanghai")
    evening = datetime(2026, 11, 23, 21, 0, tzinfo=local)  # 1 h awake, then night from 22:00
    activity(dsn, evening)
    activity(dsn, evening + timedelta(minutes=5), value=0.0)  # worn, no movement
    async with await connect(dsn) as conn:
        assert (await inactivity_sweep(conn, evening + timedelta(minutes=10))).events == 1
        for at in (datetime(2026, 11, 23, 23, 30, tzinfo=local),  # 2.5 h, but asleep
                   datetime(2026, 11, 24, 7, 29, tzinfo=local)):  # fmt: skip
            await inactivity_sweep(conn, at)
            assert rows(dsn, "SELECT count(*) FROM alerts") == [(0,)], at
        (check_at,) = rows(dsn, "SELECT check_at FROM inactivity_watch")[0]
        assert check_at == datetime(2026, 11, 24, 7, 30, tzinfo=local)  # 1 h + 1 h after 06:30
        await inactivity_sweep(conn, check_at)
        assert rows(dsn, "SELECT type, severity, status, device_id FROM alerts") == [
            ("inactivity", "major", "open", "wb-1")
        ]
        await inactivity_sweep(conn, check_at + timedelta(minutes=1))  # still nothing: no change
        activity(dsn, check_at + timedelta(minutes=1, seconds=30))
        await inactivity_sweep(conn, check_at + timedelta(minutes=2))
    assert rows(dsn, "SELECT status, outcome, count(*) OVER () FROM alerts") == [
        ("resolved", "cleared", 1)
    ]


async def test_a_worker_stalled_inside_its_transaction_loses_it_and_another_carries_on(
    district: str,
) -> None:
    """SIGSTOP-like: a worker claims the alert and stops talking; PostgreSQL ends its session
    after ENGINE_STALLED_S, its claim rolls back, and the other worker fires the step once."""
    dsn = district
    ingest(dsn, "site-a", "wb-1", "sos")
    await drain(dsn, T0)
    work_dsn = EngineWorkers(dsn, "a", stalled_s=0.5).work_dsn
    at = T0 + timedelta(seconds=60)
    async with await connect(work_dsn) as stalled, await connect(dsn) as b:
        await stalled.execute("BEGIN")
        claimed = await PgAlertTransaction(stalled, "a").claim_due(at, 10)
        assert len(claimed) == 1
        assert (await asyncio.wait_for(timers_tick(b, at, worker="b"), 5)).steps == 0
        async def b_fires() -> bool:
            return (await timers_tick(b, at, worker="b")).steps > 0

        await until(b_fires, 10, "b to fire the step the stalled claim held")
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            await stalled.execute("COMMIT")
    assert steps(dsn) == [("level", 0), ("level", 1)]
    assert rows(dsn, "SELECT fired_by FROM alert_steps WHERE level = 1") == [("b",)]
