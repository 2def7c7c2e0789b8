"""Tenancy walls of the staff API (issue 8's acceptance): a unit's items are another
unit's 404s and appear in none of its lists or counts; a street sees exactly its
units; the bureau sees masked names until an alert escalates to it (the engine's
clock driven through the ladder, as the engine's own tests do)."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import psycopg
from api_support import T0, api_client, login, raise_event, seed_tenants
from support import scalar
from test_alert_engine import drain, rows

from gateway.alerts.unit_of_work import timers_tick


def _seed_readings(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for site, device in (("site-a", "wb-a"), ("site-b", "wb-b"), ("site-c", "wb-c")):
            conn.execute("INSERT INTO telemetry (time, site_id, device_id, metric, value, unit)"
                         " VALUES (%s, %s, %s, 'heart_rate_bpm', 72, 'bpm')", (T0, site, device))


async def _everything_listed(api: httpx.AsyncClient, who: dict[str, str]) -> str:
    """Every list a person can ask for, as one text."""
    paths = ["/api/organisations", "/api/sites", "/api/residents", "/api/devices", "/api/staff",
             "/api/shifts", "/api/policies", "/api/alerts", "/api/staff/on-duty"]
    texts = []
    for path in paths:
        answer = await api.get(path, headers=who, params={"since": (T0 - timedelta(days=1))
                                                          .isoformat()}
                               if path == "/api/shifts" else None)
        assert answer.status_code == 200, (path, answer.text)
        texts.append(answer.text)
    return "\n".join(texts)


async def test_unit_bs_items_are_404_for_unit_a_and_in_none_of_its_lists(database: str) -> None:
    seed_tenants(database)
    _seed_readings(database)
    raise_event(database, "site-b", "wb-b", "fall")
    await drain(database, T0)
    resident_b = scalar(database, "SELECT id FROM residents WHERE external_id = 'r-b'")
    alert_b = scalar(database, "SELECT id::text FROM alerts")
    async with api_client(database) as api:
        duty_a = await login(api, "duty-a")
        sup_a = await login(api, "sup-a")
        telemetry = {"site": "site-b", "device": "wb-b"}
        for who in (duty_a, sup_a):
            for path in (f"/api/residents/{resident_b}", "/api/sites/site-b",
                         "/api/devices/site-b/wb-b", "/api/devices/site-b/wb-b/readings",
                         "/api/devices/site-b/wb-b/commands", "/api/organisations/station-b",
                         "/api/staff/duty-b", f"/api/alerts/{alert_b}"):
                answer = await api.get(path, headers=who)
                assert answer.status_code == 404, (path, answer.text)
                assert "李" not in answer.text and "bb:bb" not in answer.text
            assert (await api.get("/api/telemetry", params=telemetry,
                                  headers=who)).status_code == 404
        # changes aimed at B's items are the same 404s, never 403s
        for method, path, body in (
            ("PATCH", f"/api/residents/{resident_b}", {"name": "x"}),
            ("PATCH", "/api/sites/site-b", {"name": "x"}),
            ("PATCH", "/api/devices/site-b/wb-b", {"description": "x"}),
            ("POST", f"/api/residents/{resident_b}/erase", None),
            ("GET", f"/api/residents/{resident_b}/export", None),
            ("POST", "/api/devices/site-b/wb-b/commands", {"action": "locate",
                                                           "alert_id": alert_b}),
            ("PUT", "/api/policies/station-b/any/minor", {"levels": [
                {"after_s": 0, "roles": ["duty"], "channels": ["console"]}]}),
            ("POST", "/api/staff/duty-b/password", {"password": "0123456789ab"}),
        ):
            answer = await api.request(method, path, headers=sup_a, json=body)
            assert answer.status_code == 404, (method, path, answer.text)
        listed = await _everything_listed(api, duty_a)
        for trace in ("site-b", "wb-b", "station-b", "李桂兰", "duty-b", "陈护工", alert_b):
            assert trace not in listed, trace
        tree = (await api.get("/api/organisations", headers=duty_a)).json()
        assert tree == [{"id": "station-a", "parent_id": None, "kind": "station",
                         "name": "甲社区站", "sites": 1, "residents": 1, "open_alerts": 0}]
        # filters naming B's things narrow to nothing
        for path, params in (("/api/sites", {"unit": "station-b"}),
                             ("/api/residents", {"site": "site-b"}),
                             ("/api/devices", {"site": "site-b"})):
            assert (await api.get(path, params=params, headers=duty_a)).json()["items"] == []


async def test_a_street_sees_exactly_its_units(database: str) -> None:
    seed_tenants(database)
    async with api_client(database) as api:
        street = await login(api, "street-1")
        sites = (await api.get("/api/sites", headers=street)).json()["items"]
        assert sorted(s["id"] for s in sites) == ["site-a", "site-b"]
        devices = (await api.get("/api/devices", headers=street)).json()["items"]
        assert sorted(d["id"] for d in devices) == ["wb-a", "wb-b"]
        residents = (await api.get("/api/residents", headers=street)).json()["items"]
        assert sorted(r["site_id"] for r in residents) == ["site-a", "site-b"]
        units = (await api.get("/api/organisations", headers=street)).json()
        assert sorted(u["id"] for u in units) == ["station-a", "station-b", "street-1"]
        staff = (await api.get("/api/staff", headers=street)).json()
        assert sorted(s["id"] for s in staff) == ["duty-a", "duty-b", "street-1", "sup-a"]
        assert (await api.get("/api/sites/site-c", headers=street)).status_code == 404


async def test_the_bureau_sees_masked_names_until_the_alert_escalates_to_it(
    database: str,
) -> None:
    seed_tenants(database)
    _seed_readings(database)
    raise_event(database, "site-a", "wb-a", "sos")
    await drain(database, T0)
    alert_id = scalar(database, "SELECT id::text FROM alerts")

    with psycopg.connect(database) as conn:
        conn.execute("UPDATE sites SET latitude = 31.2, longitude = 121.4 WHERE id = 'site-a'")

    async def bureau_view(api: httpx.AsyncClient,
                          at_minutes: int) -> tuple[str, float | None, float | None]:
        bureau = await login(api, "bureau-1")
        served = {"alert": alert_id}
        alert = (await api.get(f"/api/alerts/{alert_id}", headers=bureau)).json()
        readings = (await api.get("/api/devices/site-a/wb-a/readings", headers=bureau,
                                  params=served)).json()
        site = (await api.get("/api/sites/site-a", headers=bureau, params=served)).json()
        return alert["resident"]["name"], readings[0]["value"], site["latitude"]

    async with api_client(database) as api:
        assert await bureau_view(api, 0) == ("王**", None, None)
        # the ladder climbs: supervisor at 60 s, street at 3 min — still masked for the bureau
        for minutes in (1, 3):
            await _tick(database, T0 + timedelta(minutes=minutes))
            assert await bureau_view(api, minutes) == ("王**", None, None)
        await _tick(database, T0 + timedelta(minutes=5))  # the bureau's rung
        assert await bureau_view(api, 5) == ("王秀英", 72.0, 31.2)
        # what it did not serve an escalated alert for stays masked
        bureau = await login(api, "bureau-1")
        resident = (await api.get("/api/residents", headers=bureau)).json()["items"]
        assert all(r["masked"] for r in resident)
    assert sorted(r[0] for r in rows(
        database, "SELECT what FROM sensitive_reads WHERE actor = 'staff:bureau-1'"
                  " AND alert_id = %s", (alert_id,))) == ["last_readings", "site_location"]


async def _tick(dsn: str, at: datetime) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE engine_clock SET now = %s", (at,))
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await timers_tick(conn, at)
