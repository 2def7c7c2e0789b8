"""Every panel of the four Grafana screens, run against TimescaleDB on a scenario.

Grafana cannot be installed here, so each panel's SQL goes through the same
interpolation Grafana's PostgreSQL datasource applies (grafana/sql_macros.py,
pinned in tests/unit/test_dashboards_model.py), its template variables resolved
by running the dashboard's own variable queries, and must return the shape its
panel draws: a time series a ``time`` column in order plus numbers (and a
``metric`` label in long form), a stat one row of numbers, a table exactly the
columns its "organize" step names. Key panels are checked for their values.

The scenario is written as production writes it: MQTT payloads through ingest's
classifier and store (so the engine's triggers fire), alerts raised, escalated,
acknowledged, on scene and resolved by the real engine with its clock driven
step by step, an electrical early warning and alarm from telemetry thresholds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import create_database
from pydantic import BaseModel

from alerting.lifecycle import Command, acknowledge, on_scene, resolve
from alerting.model import Alert, Channel, Outcome, staff_actor
from gateway.alerts.district import District, import_district
from gateway.alerts.unit_of_work import command, conditions_batch, intake_batch, timers_tick
from gateway.contract.payloads import (
    CommandAction,
    CommandOutcome,
    CommandResultPayload,
    EventPayload,
    EventType,
    GatewayStatusPayload,
    Phase,
    ReadingItem,
    StatusPayload,
    TelemetryPayload,
    dump,
)
from gateway.contract.topics import Channel as TopicChannel
from gateway.contract.topics import DeviceTopic, GatewayStatusTopic
from gateway.ingest.batch import Batch, Classifier
from gateway.ingest.store import IngestStore
from gateway.local.postgres import PostgresInstance

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # grafana/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from grafana import generate  # noqa: E402
from grafana.sql_macros import QueryContext, Variable, interpolate  # noqa: E402

# The scenario runs two hours before now (nothing may be reported from the future),
# on a whole minute so the one-minute buckets are the scenario's own minutes.
T0 = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
STEP = timedelta(seconds=30)
END = timedelta(minutes=25)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


DISTRICT: dict[str, Any] = {
    "organisations": [
        {"id": "bureau", "kind": "bureau", "name": "区民政局",
         "webhook_url": "http://127.0.0.1:9/bureau"},
        {"id": "street-e", "parent": "bureau", "kind": "street", "name": "东城街道"},
        {"id": "street-w", "parent": "bureau", "kind": "street", "name": "西城街道"},
        {"id": "station-e", "parent": "street-e", "kind": "station", "name": "东门社区站"},
        {"id": "station-w", "parent": "street-w", "kind": "station", "name": "西门社区站"},
        {"id": "inst-w", "parent": "street-w", "kind": "institution", "name": "夕阳红养老院"},
    ],
    "sites": [
        {"id": "home-1", "organisation": "station-e", "name": "东门 1 号"},
        {"id": "home-2", "organisation": "station-e", "name": "东门 2 号"},
        {"id": "home-3", "organisation": "station-w", "name": "西门 3 号"},
        {"id": "room-101", "organisation": "inst-w", "kind": "room", "name": "101 室"},
        {"id": "room-102", "organisation": "inst-w", "kind": "room", "name": "102 室"},
    ],
    "residents": [
        {"id": "r-1", "site": "home-1", "name": "王奶奶"},
        {"id": "r-2", "site": "home-2", "name": "李爷爷"},
        {"id": "r-3", "site": "home-3", "name": "赵奶奶"},
        {"id": "r-101", "site": "room-101", "name": "钱爷爷"},
        {"id": "r-102", "site": "room-102", "name": "孙奶奶"},
    ],
    "devices": [
        {"site": "home-1", "id": "wb-1", "profile": "es-wb1", "address": "aa:01",
         "resident": "r-1"},
        {"site": "home-2", "id": "btn-2", "profile": "es-cb1", "address": "00000002"},
        {"site": "home-3", "id": "sd-3", "profile": "es-sd1", "address": "1"},
        {"site": "home-3", "id": "ef-3", "profile": "es-ef1", "address": "2"},
        {"site": "room-101", "id": "wb-101", "profile": "es-wb1", "address": "aa:65",
         "resident": "r-101"},
        {"site": "room-102", "id": "btn-102", "profile": "es-cb1", "address": "00000102"},
    ],
    "staff": [
        {"id": "duty-e", "organisation": "station-e", "name": "周", "role": "duty"},
        {"id": "sup-e", "organisation": "station-e", "name": "吴", "role": "supervisor"},
        {"id": "duty-w", "organisation": "station-w", "name": "郑", "role": "duty"},
        {"id": "sup-w", "organisation": "station-w", "name": "冯", "role": "supervisor"},
        {"id": "duty-i", "organisation": "inst-w", "name": "陈", "role": "duty"},
        {"id": "nurse-night", "organisation": "inst-w", "name": "褚", "role": "duty"},
        {"id": "sup-i", "organisation": "inst-w", "name": "卫", "role": "supervisor"},
        {"id": "street-e-1", "organisation": "street-e", "name": "蒋", "role": "street"},
        {"id": "street-w-1", "organisation": "street-w", "name": "沈", "role": "street"},
    ],
    "shifts": [
        *({"staff": s, "starts_at": (T0 - timedelta(hours=1)).isoformat(),
           "ends_at": (T0 + timedelta(hours=12)).isoformat()}
          for s in ("duty-e", "duty-w", "duty-i")),
        {"staff": "nurse-night", "starts_at": (T0 + timedelta(hours=12)).isoformat(),
         "ends_at": (T0 + timedelta(hours=24)).isoformat()},
    ],
}  # fmt: skip


def event(site: str, device: str, kind: EventType, phase: Phase, when: datetime,
          profile: str) -> tuple[str, BaseModel]:  # fmt: skip
    payload = EventPayload(v=1, event_id=uuid.uuid4(), type=kind, phase=phase, time=when,
                           profile=profile)  # fmt: skip
    return str(DeviceTopic(site, device, TopicChannel.EVENT)), payload


def readings(site: str, device: str, when: datetime, **values: float) -> tuple[str, BaseModel]:
    items = [ReadingItem(metric=m, value=v, unit="") for m, v in values.items()]
    payload = TelemetryPayload(v=1, time=when, readings=items)
    return str(DeviceTopic(site, device, TopicChannel.TELEMETRY)), payload


def status(site: str, device: str, when: datetime, online: bool,
           battery: int | None = None) -> tuple[str, BaseModel]:  # fmt: skip
    payload = StatusPayload(v=1, time=when, online=online, battery=battery)
    return str(DeviceTopic(site, device, TopicChannel.STATUS)), payload


def gateway(site: str, gw: str, when: datetime, drivers: dict[str, str]) -> tuple[str, BaseModel]:
    payload = GatewayStatusPayload(v=1, time=when, online=True, version="0.1.0", drivers=drivers)
    return str(GatewayStatusTopic(site, gw)), payload


_E, _P = EventType, Phase
# What devices and gateways report, minute by minute (ingest's input).
MESSAGES: list[tuple[datetime, tuple[str, BaseModel]]] = [
    # an hour before: a smoke alarm handled then, outside every screen's time range
    (at(-60), event("home-1", "sd-1", _E.SMOKE, _P.RAISE, at(-60), "es-sd1")),
    (at(0), event("home-1", "wb-1", _E.SOS, _P.PULSE, at(0), "es-wb1")),  # A
    (at(0), gateway("home-1", "gw-1", at(0), {"ble-1": "running"})),
    (at(0), gateway("home-3", "gw-3", at(0), {"modbus-1": "running", "serial-1": "backoff"})),
    (at(1), event("home-2", "btn-2", _E.SOS, _P.PULSE, at(1), "es-cb1")),  # B
    (at(1), readings("home-1", "wb-1", at(1), battery_pct=81)),
    (at(1), status("home-1", "wb-1", at(1), True, 81)),
    (at(2), event("home-3", "sd-3", _E.SMOKE, _P.RAISE, at(2), "es-sd1")),  # C
    (at(2), event("home-2", "btn-2", _E.LOW_BATTERY, _P.RAISE, at(2), "es-cb1")),
    (at(2), readings("room-101", "wb-101", at(2), battery_pct=50)),
    (at(2), status("home-2", "btn-2", at(2), True, 15)),
    (at(2), status("home-3", "sd-3", at(2), True)),
    (at(2), status("home-3", "ef-3", at(2), True)),
    # D: residual current climbing to an early warning (240 mA twice) then an alarm
    (at(3), readings("home-3", "ef-3", at(3), residual_current_ma=100, cable_temp_c_1=40,
                     cable_temp_c_2=30)),
    (at(4), readings("home-3", "ef-3", at(4), residual_current_ma=245, cable_temp_c_1=42)),
    (at(5), readings("home-3", "ef-3", at(5), residual_current_ma=250, cable_temp_c_1=44)),
    (at(5), event("room-101", "wb-101", _E.FALL, _P.PULSE, at(5), "es-wb1")),  # E
    (at(6), readings("home-3", "ef-3", at(6), residual_current_ma=310, cable_temp_c_1=46)),
    (at(6), event("room-102", "btn-102", _E.SOS, _P.PULSE, at(6), "es-cb1")),  # F
    (at(7), readings("home-3", "ef-3", at(7), residual_current_ma=320, cable_temp_c_1=63)),
    (at(9), event("room-101", "wb-101", _E.GEOFENCE_EXIT, _P.PULSE, at(9), "es-wb1")),  # G
    (at(10), readings("home-1", "wb-1", at(10), battery_pct=80)),
    (at(10), status("room-101", "wb-101", at(10), False, 50)),
]  # fmt: skip

Make = Callable[[Alert], Command]
ACTIONS: list[tuple[datetime, str, str, Make]] = [  # (when, site, alert type, command)
    (at(-59), "home-1", "smoke", lambda a: acknowledge(staff_actor("duty-e"), Channel.CONSOLE)),
    (at(-50), "home-1", "smoke",
     lambda a: resolve(staff_actor("duty-e"), Channel.CONSOLE, Outcome.HANDLED)),
    (at(0.5), "home-1", "sos", lambda a: acknowledge(staff_actor("duty-e"), Channel.CONSOLE)),
    (at(8), "home-1", "sos", lambda a: on_scene(staff_actor("duty-e"), Channel.CONSOLE)),
    (at(20), "home-1", "sos",
     lambda a: resolve(staff_actor("duty-e"), Channel.CONSOLE, Outcome.HANDLED)),
    (at(1) + timedelta(seconds=200), "home-2", "sos",
     lambda a: acknowledge(staff_actor("duty-e"), Channel.CONSOLE)),
    (at(2.75), "home-3", "smoke", lambda a: acknowledge(staff_actor("duty-w"), Channel.CONSOLE)),
    (at(7), "home-3", "smoke", lambda a: on_scene(staff_actor("duty-w"), Channel.CONSOLE)),
    (at(12), "home-3", "smoke",
     lambda a: resolve(staff_actor("duty-w"), Channel.CONSOLE, Outcome.FALSE_ALARM)),
    (at(8), "home-3", "electrical", lambda a: acknowledge(staff_actor("duty-w"), Channel.CONSOLE)),
    (at(6) + timedelta(seconds=20), "room-102", "sos",
     lambda a: acknowledge(staff_actor("duty-i"), Channel.CONSOLE)),
    (at(23), "room-102", "sos", lambda a: on_scene(staff_actor("duty-i"), Channel.CONSOLE)),
    (at(9.5), "room-101", "wandering",
     lambda a: acknowledge(staff_actor("duty-i"), Channel.CONSOLE)),
    (at(11), "room-101", "wandering",
     lambda a: resolve(staff_actor("duty-i"), Channel.CONSOLE, Outcome.HANDLED)),
]  # fmt: skip


async def write(store: IngestStore, classifier: Classifier, messages: list[tuple[str, bytes]],
                dead_ok: bool = False) -> None:  # fmt: skip
    batch = Batch()
    for topic, payload in messages:
        classifier.add(batch, topic, payload)
    assert dead_ok or not batch.dead, batch.dead
    await store.write(batch)


async def play(dsn: str) -> None:
    """The scenario through ingest and the engine, the engine's clock stepping 30 s
    and stopping at every message and action, as a server's workers would see them."""
    store, classifier = IngestStore(dsn), Classifier()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        steps = {T0 + STEP * k for k in range(int(END / STEP) + 1)}
        steps |= {t for t, _ in MESSAGES} | {t for t, *_ in ACTIONS}
        before = T0 - timedelta(days=1)
        for now in sorted(steps):
            due = [(t, m) for t, m in MESSAGES if before < t <= now]
            if due:
                await write(store, classifier, [(topic, dump(p)) for _, (topic, p) in due])
            while (await intake_batch(conn, now)).events:
                pass
            while (await conditions_batch(conn, now)).events:
                pass
            for when, site, kind, make in ACTIONS:
                if before < when <= now:
                    cur = await conn.execute(
                        "SELECT id FROM alerts WHERE site_id = %s AND type = %s"
                        " AND status <> 'resolved'", (site, kind),
                    )  # fmt: skip
                    (alert_id,) = await cur.fetchone() or (None,)
                    assert alert_id is not None, (site, kind, now)
                    await command(conn, alert_id, make, when)
            await timers_tick(conn, now)
            before = now
        # The edges answer two downlinks: the wristband vibrated; the button's line is down.
        answers = []
        for site, device, action, outcome in (
            ("home-1", "wb-1", CommandAction.ACKNOWLEDGE, CommandOutcome.EXECUTED),
            ("home-2", "btn-2", CommandAction.ALARM_RECEIVED, CommandOutcome.UNREACHABLE),
        ):
            cur = await conn.execute(
                "SELECT command_id, alert_id FROM downlink_outbox"
                " WHERE site_id = %s AND device_id = %s AND action = %s", (site, device, action),
            )  # fmt: skip
            row = await cur.fetchone()
            assert row is not None, (device, action)
            result = CommandResultPayload(v=1, command_id=row[0], action=action, outcome=outcome,
                                          time=at(3), alert_id=row[1])  # fmt: skip
            topic = str(DeviceTopic(site, device, TopicChannel.COMMAND_RESULT))
            answers.append((topic, dump(result)))
        await write(store, classifier, answers)
    # Two messages the server refuses: they become dead letters (received now).
    await write(store, classifier, [("eldersafe/v1/home-1/wb-1/telemetry", b"{not json"),
                                    ("eldersafe/v1/Home 1/wb-1/event", b"{}")], dead_ok=True)
    await store.close()


@dataclass(frozen=True)
class Scenario:
    dsn: str
    time_to: datetime

    def context(self) -> QueryContext:
        return QueryContext(T0 - timedelta(minutes=30), self.time_to, timedelta(minutes=1))


@pytest.fixture(scope="module")
def scenario(pg_cluster: PostgresInstance) -> Iterator[Scenario]:
    dsn = create_database(pg_cluster)
    import_district(dsn, District.model_validate(DISTRICT))
    asyncio.run(play(dsn))
    yield Scenario(dsn, datetime.now(UTC))


# --- running panels as Grafana would ----------------------------------------------------------

NUMERIC = {20, 21, 23, 700, 701, 1700}  # int8, int2, int4, float4, float8, numeric
TIMESTAMPTZ = 1184
TEXT = {25, 1043}


@dataclass(frozen=True)
class Result:
    columns: list[tuple[str, int]]
    rows: list[tuple[Any, ...]]

    def dicts(self) -> list[dict[str, Any]]:
        """Rows by column name; numerics as floats (Grafana plots both alike)."""
        names = [c for c, _ in self.columns]
        return [
            {n: float(v) if isinstance(v, Decimal) else v for n, v in zip(names, r, strict=True)}
            for r in self.rows
        ]


def dashboard(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((generate.DASHBOARDS_DIR / name).read_text("utf-8"))
    return doc


def run(dsn: str, sql: str, ctx: QueryContext) -> Result:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(interpolate(sql, ctx).encode())  # bytes: no client-side % placeholders
        assert cur.description is not None
        return Result([(c.name, c.type_code) for c in cur.description], cur.fetchall())


Chosen = dict[str, tuple[str, ...]]


def resolve_variables(
    dsn: str, doc: dict[str, Any], ctx: QueryContext, chosen: Chosen | None = None
) -> QueryContext:
    """The variables in order, each from its own query (All, unless ``chosen``)."""
    for var in doc["templating"]["list"]:
        result = run(dsn, var["query"], ctx)
        names = [c for c, _ in result.columns]
        assert names == ["__value", "__text"], names
        values = tuple(str(r[0]) for r in result.rows)
        assert values, f"variable {var['name']} has no options"
        picked = (chosen or {}).get(var["name"], values)
        assert set(picked) <= set(values)
        variable = Variable(picked, multi=var["multi"], include_all=var["includeAll"])
        ctx = replace(ctx, variables={**ctx.variables, var["name"]: variable})
    return ctx


def declared_columns(panel: dict[str, Any]) -> list[str] | None:
    for t in panel.get("transformations", []):
        if t["id"] == "organize":
            index: dict[str, int] = t["options"]["indexByName"]
            return sorted(index, key=index.__getitem__)
    return None


def shape_problems(panel: dict[str, Any], result: Result) -> list[str]:
    """What keeps ``result`` from drawing as ``panel`` (empty: nothing)."""
    out: list[str] = []
    kind, fmt = panel["type"], panel["targets"][0]["format"]
    names = [c for c, _ in result.columns]
    declared = declared_columns(panel)
    if declared is not None and names != declared:
        out.append(f"columns {names}, the panel names {declared}")
    if kind == "timeseries":
        if fmt != "time_series":
            out.append(f"a time series panel fed {fmt}")
        if not names or names[0] != "time" or result.columns[0][1] != TIMESTAMPTZ:
            out.append(f"first column {result.columns[:1]}, not a timestamptz 'time'")
        labels = [n for n, t in result.columns[1:] if t in TEXT]
        values = [n for n, t in result.columns[1:] if t in NUMERIC]
        if labels not in ([], ["metric"]) or len(labels) + len(values) != len(names) - 1:
            out.append(f"columns {result.columns}: numbers and at most a 'metric' label")
        if declared is None and labels != ["metric"]:
            out.append("long form without a 'metric' column")
        times = [r[0] for r in result.rows]
        if times != sorted(times):
            out.append("rows not in time order")
    elif kind == "stat":
        if [t for _, t in result.columns if t not in NUMERIC]:
            out.append(f"a stat with non-numeric columns {result.columns}")
        if len(result.rows) != 1:
            out.append(f"a stat of {len(result.rows)} rows")
    elif kind == "table":
        if declared is None:
            out.append("a table that names no columns")
    else:
        out.append(f"panel type {kind} has no shape rule here")
    if not result.rows:
        out.append("no rows on the scenario: the query touches nothing")
    return out


def run_dashboard(s: Scenario, name: str, chosen: Chosen | None = None) -> dict[str, Result]:
    doc = dashboard(name)
    ctx = resolve_variables(s.dsn, doc, s.context(), chosen)
    return {p["title"]: run(s.dsn, p["targets"][0]["rawSql"], ctx) for p in doc["panels"]}


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(generate.DASHBOARDS))
def test_every_panel_runs_and_returns_its_panels_shape(scenario: Scenario, name: str) -> None:
    doc = dashboard(name)
    ctx = resolve_variables(scenario.dsn, doc, scenario.context())
    problems = {}
    for panel in doc["panels"]:
        assert len(panel["targets"]) == 1, panel["title"]
        result = run(scenario.dsn, panel["targets"][0]["rawSql"], ctx)
        if found := shape_problems(panel, result):
            problems[panel["title"]] = found
    assert problems == {}


def test_the_shape_check_refuses_what_a_panel_cannot_draw(scenario: Scenario) -> None:
    panel = next(p for p in dashboard("district.json")["panels"] if p["type"] == "timeseries")
    ctx = resolve_variables(scenario.dsn, dashboard("district.json"), scenario.context())
    swapped = "SELECT 1::bigint AS critical, now() AS time"
    assert shape_problems(panel, run(scenario.dsn, swapped, ctx))
    unordered = ("SELECT * FROM (VALUES (now(), 1::bigint, 0::bigint, 0::bigint),"
                 " (now() - interval '1 h', 1, 0, 0)) v(time, critical, major, minor)")
    assert shape_problems(panel, run(scenario.dsn, unordered, ctx)) == ["rows not in time order"]
    stat = next(p for p in dashboard("district.json")["panels"] if p["type"] == "stat")
    assert shape_problems(stat, run(scenario.dsn, "SELECT 'x' AS critical", ctx))


def test_district_screen_counts_open_alerts_response_times_and_escalations(
    scenario: Scenario,
) -> None:
    r = run_dashboard(scenario, "district.json")
    # Open now: B (sos, acknowledged) and the low battery at station-e; D (electrical) at
    # station-w; E (fall, never acknowledged) and F (sos, on scene) at the institution.
    assert r["未结警情 Open alerts"].dicts() == [
        {"critical": 3, "major": 1, "minor": 1, "total": 5}
    ]
    by_unit = {(d["street"], d["unit"]): d for d in r[
        "按街道和单位的未结警情 Open alerts by street and unit"].dicts()}  # fmt: skip
    assert {k: (d["critical"], d["major"], d["minor"], d["total"]) for k, d in by_unit.items()} == {
        ("东城街道", "东门社区站"): (1, 0, 1, 2),
        ("西城街道", "西门社区站"): (0, 1, 0, 1),
        ("西城街道", "夕阳红养老院"): (2, 0, 0, 2),
    }
    waited = (scenario.time_to - at(1)).total_seconds()  # B, the oldest at station-e
    assert by_unit[("东城街道", "东门社区站")]["oldest_s"] == pytest.approx(waited, abs=0.01)
    # Critical alerts acknowledged after 30 s (A), 200 s (B), 45 s (C), 20 s (F); E never:
    # p50 37.5 s, p90 153.5 s; 3 of 5 within 60 s (E counts as missed).
    (ack,) = r["危急警情接警用时 Time to acknowledge (critical)"].dicts()
    assert ack == pytest.approx({"p50_s": 37.5, "p90_s": 153.5, "within_target_pct": 60.0})
    # On scene after 480 s (A), 300 s (C), 1020 s (F); B and E never: 2 of 5 within 15 min.
    (scene,) = r["危急警情到场用时 Time to on scene (critical)"].dicts()
    assert scene == pytest.approx({"p50_s": 480.0, "p90_s": 912.0, "within_target_pct": 40.0})
    # B climbed to the street (levels 1, 2) before its acknowledgement at 200 s; E to the
    # bureau; B and F were acknowledged with nobody on scene within 15 minutes.
    assert r["升级 Escalations"].dicts() == [
        {"level_1": 2, "level_2": 2, "level_3": 1, "service_circle": 2}
    ]
    assert r["设备在线 Devices online"].dicts() == [
        {"online": 4, "offline": 1, "never_seen": 1, "online_pct": pytest.approx(400 / 6)}
    ]
    fire = r["火灾与电气事件 Fire and electrical incidents"].dicts()
    assert [(d["type"], d["site"], d["status"], d["outcome"]) for d in fire] == [
        ("electrical", "西门 3 号", "acknowledged", None),
        ("smoke", "西门 3 号", "resolved", "false_alarm"),
    ]
    assert fire[1]["ack_s"] == 45.0 and fire[1]["resolved_at"] == at(12)
    assert r["火灾与电气闭环 Fire and electrical closure"].dicts() == [
        {"opened": 2, "closed": 1, "still_open": 1, "closed_pct": 50.0}
    ]
    trend = r["警情趋势 Alerts over time"].dicts()
    assert sum(d["critical"] for d in trend) == 5 and sum(d["minor"] for d in trend) == 1
    assert {d["time"]: d["critical"] for d in trend}[at(1)] == 1  # B, in its own minute
    slowest = {d["time"]: d["slowest_s"] for d in r[
        "接警用时趋势 Time to acknowledge over time"].dicts()}  # fmt: skip
    assert slowest == {at(0): 30.0, at(1): 200.0, at(2): 45.0, at(6): 20.0}


def test_the_street_and_unit_variables_narrow_the_district_screen(scenario: Scenario) -> None:
    east = run_dashboard(scenario, "district.json", {"street": ("street-e",)})
    assert east["未结警情 Open alerts"].dicts() == [
        {"critical": 1, "major": 0, "minor": 1, "total": 2}
    ]
    assert [(d["street"], d["unit"]) for d in east[
        "按街道和单位的未结警情 Open alerts by street and unit"].dicts()] == [
        ("东城街道", "东门社区站")
    ]  # fmt: skip
    assert east["设备在线 Devices online"].dicts()[0]["online_pct"] == 100.0
    home = run_dashboard(scenario, "district.json", {"street": ("street-w",), "unit": ("inst-w",)})
    assert home["未结警情 Open alerts"].dicts()[0]["critical"] == 2
    assert home["火灾与电气闭环 Fire and electrical closure"].dicts()[0]["opened"] == 0


def test_institution_screen(scenario: Scenario) -> None:
    r = run_dashboard(scenario, "institution.json")
    assert r["未结警情 Open alerts"].dicts() == [
        {"critical": 2, "major": 0, "minor": 0, "total": 2}
    ]
    rooms = r["未结警情列表 Open alerts by room"].dicts()
    assert [(d["room"], d["type"], d["status"], d["acknowledged_by"]) for d in rooms] == [
        ("101 室", "fall", "open", None), ("102 室", "sos", "on_scene", "staff:duty-i"),
    ]  # fmt: skip
    assert rooms[0]["waiting_s"] == pytest.approx((scenario.time_to - at(5)).total_seconds())
    # the night nurse's shift starts at T0 + 12 h: only the day duty is on at the range's end
    assert r["在院与值班 Residents and staff on duty"].dicts() == [
        {"residents": 2, "staff_on_duty": 1}
    ]
    by_type = {(d["time"], d["metric"]): d["alerts"] for d in r[
        "按类型的警情 Alerts by type"].dicts()}  # fmt: skip
    assert by_type == {(at(5), "fall"): 1, (at(6), "sos"): 1, (at(9), "wandering"): 1}
    (wandering,) = r["看护警情 Welfare, vital signs and wandering"].dicts()
    assert (wandering["type"], wandering["ack_s"], wandering["outcome"]) == (
        "wandering", 30.0, "handled")


def test_device_health_screen(scenario: Scenario) -> None:
    r = run_dashboard(scenario, "device-health.json")
    (offline,) = r["离线设备 Offline devices"].dicts()
    assert (offline["device"], offline["last_status"], offline["battery"]) == (
        "wb-101", at(10), 50)
    assert offline["offline_s"] == pytest.approx((scenario.time_to - at(10)).total_seconds())
    assert [(d["device"], d["battery"]) for d in r["低电量 Low batteries"].dicts()] == [
        ("btn-2", 15)
    ]
    gateways = {d["gateway"]: d for d in r["网关与驱动 Gateways and drivers"].dicts()}
    assert {g: (d["online"], d["drivers"], d["not_running"], d["troubled"])
            for g, d in gateways.items()} == {
        "gw-1": (True, 1, 0, None), "gw-3": (True, 2, 1, "serial-1=backoff"),
    }  # fmt: skip
    assert r["下行指令 Downlink commands"].dicts() == [
        {"executed": 1, "refused": 0, "unreachable": 1}
    ]
    dead = r["无效报文 Rejected messages"].dicts()
    assert sorted(d["metric"] for d in dead) == ["json", "topic"]
    assert [(d["device"], d["type"]) for d in r["设备类警情 Device alerts"].dicts()] == [
        ("btn-2", "low_battery")
    ]
    lowest = {(d["time"], d["metric"]): d["battery_pct"] for d in r[
        "最低电量 Lowest battery by device profile"].dicts()}  # fmt: skip
    assert lowest == {(at(1), "es-wb1"): 81.0, (at(2), "es-wb1"): 50.0,
                      (at(10), "es-wb1"): 80.0}  # fmt: skip


def test_electrical_risk_screen(scenario: Scenario) -> None:
    r = run_dashboard(scenario, "electrical-risk.json")
    residual = {(d["time"], d["metric"]): d["residual_current_ma"] for d in r[
        "剩余电流 Residual current per circuit"].dicts()}  # fmt: skip
    assert residual == {(at(m), "西门 3 号 / ef-3"): v
                        for m, v in ((3, 100.0), (4, 245.0), (5, 250.0), (6, 310.0), (7, 320.0))}
    cable = {(d["time"], d["metric"]) for d in r[
        "线缆温度 Cable temperature per circuit"].dicts()}  # fmt: skip
    assert (at(3), "西门 3 号 / ef-3 / T2") in cable and (at(7), "西门 3 号 / ef-3 / T1") in cable
    (circuit,) = r["线路现状 Circuits now"].dicts()
    assert (circuit["residual_current_ma"], circuit["cable_temp_c"]) == (320.0, 63.0)
    assert circuit["of_limit_pct"] == pytest.approx(320 / 3)
    # the early warning (two readings at 240 mA or more) opened the alert; the alarm raised it
    (alert,) = r["电气预警与告警 Electrical early warnings and alarms"].dicts()
    assert (alert["opened_at"], alert["severity"], alert["status"]) == (
        at(5), "major", "acknowledged")
    assert "ef-3/residual_current_ma" in alert["sources"]
    assert r["电气风险 Electrical risk now"].dicts() == [{"early_warnings": 0, "alarms": 1}]
