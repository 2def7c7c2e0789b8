"""The live console (issue 8, point 4): the page in real headless Chromium against a real
``eldersafe server`` and a simulated wristband under a real edge; and the district view's
figures per unit."""

from __future__ import annotations

from datetime import timedelta

import psycopg
from api_support import T0, api_client, login, raise_event, seed_tenants
from test_alert_engine import drain

from alerting.lifecycle import acknowledge, on_scene
from alerting.model import Channel, staff_actor
from gateway.alerts.unit_of_work import command


async def test_district_view_counts_each_unit_of_the_caller_and_no_other(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    raise_event(database, "site-b", "wb-b", "sos")
    raise_event(database, "site-c", "wb-c", "sos")
    await drain(database, T0)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        (alert_a,) = await (await conn.execute(
            "SELECT id FROM alerts WHERE site_id = 'site-a'")).fetchone()  # fmt: skip
        ack = acknowledge(staff_actor("duty-a"), Channel.CONSOLE)
        await command(conn, alert_a, lambda _a: ack, T0 + timedelta(seconds=40))
        there = on_scene(staff_actor("duty-a"), Channel.CONSOLE)
        await command(conn, alert_a, lambda _a: there, T0 + timedelta(minutes=20))
    async with api_client(database) as api:
        street = await login(api, "street-1")
        answer = await api.get("/api/stats/units", headers=street)
        assert answer.status_code == 200, answer.text
        units = {u["id"]: u for u in answer.json()["units"]}
        assert set(units) == {"street-1", "station-a", "station-b"}
        a, b = units["station-a"], units["station-b"]
        assert (a["open"], a["unacknowledged"], a["raised"]) == (1, 0, 1)
        assert (a["acknowledged_in_target"], a["ack_p50_s"]) == (1, 40.0)
        assert (a["on_scene"], a["on_scene_in_target"], a["scene_p50_s"]) == (1, 0, 1200.0)
        assert (b["open"], b["unacknowledged"], b["acknowledged"]) == (1, 1, 0)
        duty = await login(api, "duty-a")
        mine = (await api.get("/api/stats/units", headers=duty)).json()["units"]
        assert [u["id"] for u in mine] == ["station-a"]
        bad = await api.get("/api/stats/units", params={"hours": 0}, headers=duty)
        assert bad.status_code == 422
