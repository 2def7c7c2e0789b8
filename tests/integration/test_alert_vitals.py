"""The vital-sign sweep over real PostgreSQL with an injected clock: a resident's own
heart-rate range held past the hold raises one major vital_signs alert that climbs the
major ladder, one reading does not, back in range clears it, and two workers never
judge one wristband's check twice (the row lock held by the test)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from support import until

from gateway.alerts.district import District, import_district
from gateway.alerts.unit_of_work import timers_tick
from gateway.alerts.vitals import CHECK_EVERY, vitals_sweep
from gateway.alerts.workers import EngineWorkers

T0 = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)

DISTRICT: dict[str, Any] = {
    "organisations": [
        {"id": "bureau", "kind": "bureau", "name": "区民政局"},
        {"id": "street-1", "parent": "bureau", "kind": "street", "name": "街道中心"},
        {"id": "station-1", "parent": "street-1", "kind": "station", "name": "社区站"},
    ],
    "sites": [{"id": "site-a", "organisation": "station-1", "name": "家 A"}],
    # Her own maximum (100) lies below the default (120): 105 bpm is hers alone.
    "residents": [{"id": "r-a", "site": "site-a", "name": "王奶奶", "heart_rate_max": 100}],
    "devices": [
        {"site": "site-a", "id": "wb-1", "profile": "es-wb1", "address": "aa", "resident": "r-a"},
        {"site": "site-a", "id": "btn-1", "profile": "es-cb1", "address": "01", "resident": "r-a"},
    ],
    "staff": [
        {"id": "duty-1", "organisation": "station-1", "name": "李", "role": "duty"},
        {"id": "sup-1", "organisation": "station-1", "name": "张", "role": "supervisor"},
    ],
    "shifts": [{"staff": "duty-1", "starts_at": (T0 - timedelta(hours=1)).isoformat(),
                "ends_at": (T0 + timedelta(hours=12)).isoformat()}],
}  # fmt: skip


def rows(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def readings(dsn: str, metric: str, series: list[tuple[int, float]], device: str = "wb-1") -> None:
    """As ingest writes telemetry: (seconds after T0, value)."""
    with psycopg.connect(dsn) as conn:
        for sec, value in series:
            conn.execute(
                "INSERT INTO telemetry (time, site_id, device_id, metric, value)"
                " VALUES (%s, 'site-a', %s, %s, %s)",
                (T0 + timedelta(seconds=sec), device, metric, value),
            )


@pytest.fixture
def district(database: str) -> str:
    import_district(database, District.model_validate(DISTRICT))
    return database


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


def at(sec: int) -> datetime:
    return T0 + timedelta(seconds=sec)


async def test_only_the_residents_wristband_is_watched(district: str) -> None:
    assert rows(district, "SELECT device_id FROM condition_state WHERE metric = 'vital_signs'") == [
        ("wb-1",)
    ]


async def test_heart_rate_above_her_own_maximum_past_the_hold_raises_one_major_alert(
    district: str,
) -> None:
    dsn = district
    readings(dsn, "heart_rate_bpm", [(s, 105.0) for s in range(0, 181, 30)])
    readings(dsn, "spo2_pct", [(s, 97.0) for s in range(0, 181, 30)])
    async with await connect(dsn) as conn:
        assert (await vitals_sweep(conn, at(90))).events == 1
        assert rows(dsn, "SELECT count(*) FROM alerts") == [(0,)], "90 s is inside the hold"
        assert (await vitals_sweep(conn, at(100))).events == 0, "not due again before 30 s"
        await vitals_sweep(conn, at(125))  # 105 bpm from 0 s to 120 s: the 2 min hold
        assert rows(dsn, "SELECT type, severity, status, device_id, opened_at FROM alerts") == [
            ("vital_signs", "major", "open", "wb-1", at(120))
        ]
        for sec in (160, 200):  # still high: the same alert, never a second one
            await vitals_sweep(conn, at(sec))
        assert rows(dsn, "SELECT count(*), max(count) FROM alerts") == [(1, 1)]
        # The major ladder (ARCHITECTURE §5): duty at once by messaging, supervisor at 5 min.
        assert rows(dsn, "SELECT level, person_id FROM notifications ORDER BY id") == [
            (0, "staff:duty-1")
        ]
        for sec in (120 + 299, 120 + 300, 120 + 301):
            await timers_tick(conn, at(sec))
        assert rows(dsn, "SELECT kind, level FROM alert_steps ORDER BY level") == [
            ("level", 0),
            ("level", 1),
        ]
        assert rows(dsn, "SELECT level, person_id FROM notifications ORDER BY id") == [
            (0, "staff:duty-1"),
            (1, "staff:sup-1"),
        ]
        # Back in her range: held 2 min inside, the alert clears by itself.
        readings(dsn, "heart_rate_bpm", [(s, 82.0) for s in range(210, 400, 30)])
        await vitals_sweep(conn, at(300))  # 210 … 300: 90 s inside, not yet
        assert rows(dsn, "SELECT status FROM alerts") == [("open",)]
        await vitals_sweep(conn, at(400))
    assert rows(dsn, "SELECT status, outcome, count(*) OVER () FROM alerts") == [
        ("resolved", "cleared", 1)
    ]
    actions = [a for (a,) in rows(dsn, "SELECT action FROM alert_audit ORDER BY seq")]
    assert actions[0] == "opened" and actions[-1] == "resolved"


async def test_a_single_out_of_range_reading_raises_nothing(district: str) -> None:
    dsn = district
    readings(dsn, "heart_rate_bpm", [(0, 80.0), (30, 150.0), (60, 80.0), (90, 82.0)])
    readings(dsn, "spo2_pct", [(0, 97.0), (30, 84.0), (60, 97.0), (300, 96.0)])
    async with await connect(dsn) as conn:
        for sec in (45, 100, 200, 400):
            await vitals_sweep(conn, at(sec))
    assert rows(dsn, "SELECT count(*) FROM alerts") == [(0,)]


async def test_a_non_finite_reading_is_refused_and_counted_and_blocks_nothing(
    district: str,
) -> None:
    dsn = district
    refused = "eldersafe_vitals_refused_readings_total"
    before = REGISTRY.get_sample_value(refused) or 0.0
    series = [(s, 130.0) for s in range(0, 181, 30)]
    readings(dsn, "heart_rate_bpm", [*series[:3], (75, float("nan")), *series[3:]])
    async with await connect(dsn) as conn:
        assert (await vitals_sweep(conn, at(185))).dead == 1
    assert REGISTRY.get_sample_value(refused) == before + 1
    assert rows(dsn, "SELECT type, opened_at FROM alerts") == [("vital_signs", at(120))]


async def test_two_high_readings_with_a_gap_between_are_not_a_held_condition(
    district: str,
) -> None:
    """Off the wrist for ten minutes: 130 bpm before and after is not ten minutes of it."""
    dsn = district
    readings(dsn, "heart_rate_bpm", [(0, 130.0), (600, 130.0), (660, 130.0)])
    async with await connect(dsn) as conn:
        for sec in (30, 700):
            await vitals_sweep(conn, at(sec))
        assert rows(dsn, "SELECT count(*) FROM alerts") == [(0,)]
        readings(dsn, "heart_rate_bpm", [(720, 130.0)])  # 600 … 720: held 2 min now
        await vitals_sweep(conn, at(730))
    assert rows(dsn, "SELECT type, opened_at FROM alerts") == [("vital_signs", at(720))]


async def test_two_workers_never_judge_one_check_twice(district: str) -> None:
    """Forced interleaving: the test holds the watch row; a worker skips it, never waits
    for it nor judges it; released, two workers at once judge it once between them."""
    dsn = district
    readings(dsn, "heart_rate_bpm", [(s, 130.0) for s in range(0, 181, 30)])
    async with await connect(dsn) as a, await connect(dsn) as b, await connect(dsn) as hold:
        async with hold.transaction():
            await hold.execute("SELECT * FROM condition_state WHERE metric = 'vital_signs'"
                               " FOR UPDATE")  # fmt: skip
            # (a worker that waits instead of skipping fails here, not hangs)
            skipped = await asyncio.wait_for(vitals_sweep(b, at(185), worker="b"), 5)
            assert skipped.events == 0
        assert rows(dsn, "SELECT count(*) FROM alerts") == [(0,)]
        done = await asyncio.gather(
            vitals_sweep(a, at(185), worker="a"), vitals_sweep(b, at(185), worker="b")
        )
        assert sorted(o.events for o in done) == [0, 1]
    assert rows(dsn, "SELECT count(*), max(count) FROM alerts") == [(1, 1)]
    assert rows(dsn, "SELECT count(*) FROM alert_steps") == [(1,)]


async def test_a_thousand_watched_wristbands_are_swept_well_within_the_period(
    database: str,
) -> None:
    n, high = 1000, 50
    doc = {
        **DISTRICT,
        "sites": [{"id": f"home-{i}", "organisation": "station-1", "name": f"家 {i}"}
                  for i in range(n)],
        "residents": [{"id": f"r-{i}", "site": f"home-{i}", "name": f"老人 {i}"}
                      for i in range(n)],
        "devices": [{"site": f"home-{i}", "id": "wb-1", "profile": "es-wb1",
                     "address": f"{i:04x}", "resident": f"r-{i}"} for i in range(n)],
    }  # fmt: skip
    import_district(database, District.model_validate(doc))
    copy = "COPY telemetry (time, site_id, device_id, metric, value) FROM STDIN"
    with psycopg.connect(database) as conn, conn.cursor() as cur, cur.copy(copy) as cp:
        for i in range(n):
            bpm = 140.0 if i < high else 75.0
            for sec in range(0, 151, 30):
                cp.write_row((at(sec), f"home-{i}", "wb-1", "heart_rate_bpm", bpm))
                cp.write_row((at(sec), f"home-{i}", "wb-1", "spo2_pct", 97.0))
    async with await connect(database) as conn:
        started = time.perf_counter()
        checked = 0
        while (out := await vitals_sweep(conn, at(160))).events:
            checked += out.events
        took = time.perf_counter() - started
    print(f"\nvital-sign sweep of {n} wristbands ({12 * n} readings, {high} alerts): "
          f"{took:.2f} s; period {CHECK_EVERY.total_seconds():.0f} s")  # fmt: skip
    assert checked == n
    assert rows(database, "SELECT count(*) FROM alerts WHERE type = 'vital_signs'") == [(high,)]


@pytest.mark.parametrize(
    "thresholds",
    [{"heart_rate_min": 110, "heart_rate_max": 100}, {"heart_rate_max": 400},
     {"spo2_min": 101}, {"spo2_min": 0}],
)  # fmt: skip
def test_a_district_file_with_impossible_thresholds_is_refused(thresholds: dict[str, int]) -> None:
    resident = {"id": "r-x", "site": "site-a", "name": "x", **thresholds}
    with pytest.raises(ValueError, match=r"heart_rate|spo2"):
        District.model_validate({"residents": [resident]})


async def test_the_servers_engine_workers_run_the_sweep(district: str) -> None:
    """The timer loop of ``server`` sweeps too: with the test's clock in engine_clock."""
    dsn = district
    readings(dsn, "heart_rate_bpm", [(s, 130.0) for s in range(0, 181, 30)])
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO engine_clock (now) VALUES (%s)", (at(185),))
    crashes = "eldersafe_engine_loop_restarts_total"
    crashes_before = REGISTRY.get_sample_value(crashes)
    workers = asyncio.create_task(EngineWorkers(dsn, "a", clock="database", poll_s=0.05).run())
    try:
        await until(
            lambda: workers.done() or rows(dsn, "SELECT count(*) FROM alerts") != [(0,)],
            10,
            "the workers' vital_signs alert",
        )
        assert not workers.done(), workers
    finally:
        workers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await workers
    assert rows(dsn, "SELECT type, status FROM alerts") == [("vital_signs", "open")]
    assert REGISTRY.get_sample_value(crashes) == crashes_before, "a worker loop crashed"
