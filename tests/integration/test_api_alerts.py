"""The staff API on alerts: log in, list, act, double taps, and the tenancy walls."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import psycopg
import psycopg.types.json
from api_support import T0, api_client, login, raise_event, seed_tenants
from support import scalar, until
from test_alert_engine import drain


async def test_duty_acknowledges_and_the_audit_names_them(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    await drain(database, T0)
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        page = (await api.get("/api/alerts", headers=duty)).json()
        assert [a["type"] for a in page["items"]] == ["fall"]
        alert = page["items"][0]
        assert alert["resident"]["name"] == "王秀英" and not alert["masked"]
        acked = await api.post(f"/api/alerts/{alert['id']}/acknowledge", headers=duty)
        assert acked.status_code == 200, acked.text
        assert acked.json()["status"] == "acknowledged"
        again = await api.post(f"/api/alerts/{alert['id']}/acknowledge", headers=duty)
        assert again.status_code == 409
        detail = (await api.get(f"/api/alerts/{alert['id']}", headers=duty)).json()
        ack = [e for e in detail["timeline"] if e["action"] == "acknowledged"]
        assert [(e["actor"], e["actor_name"]) for e in ack] == [("staff:duty-a", "刘护工")]
    assert scalar(database, "SELECT acknowledged_by FROM alerts") == "staff:duty-a"


async def test_another_units_alert_is_404_and_absent_from_lists(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "sos")
    raise_event(database, "site-b", "wb-b", "fall")
    raise_event(database, "site-c", "wb-c", "sos")
    await drain(database, T0)
    with psycopg.connect(database) as conn:
        ids = dict(conn.execute("SELECT site_id, id::text FROM alerts").fetchall())
    async with api_client(database) as api:
        duty_a = await login(api, "duty-a")
        mine = (await api.get("/api/alerts", headers=duty_a)).json()["items"]
        assert [a["site"]["id"] for a in mine] == ["site-a"]
        for path in (f"/api/alerts/{ids['site-b']}", f"/api/alerts/{ids['site-b']}/acknowledge"):
            answer = await (api.get(path, headers=duty_a) if "ack" not in path
                            else api.post(path, headers=duty_a))
            assert answer.status_code == 404 and ids["site-b"] in answer.text
            assert "李" not in answer.text and "station-b" not in answer.text
        # B's alert acknowledged by B: A's acknowledge is still a 404, never the 409 that
        # would tell A the alert exists and what state it is in
        duty_b = await login(api, "duty-b")
        taken = await api.post(f"/api/alerts/{ids['site-b']}/acknowledge", headers=duty_b)
        assert taken.status_code == 200
        late = await api.post(f"/api/alerts/{ids['site-b']}/acknowledge", headers=duty_a)
        assert late.status_code == 404 and "acknowledged" not in late.text
        missing = await api.get(f"/api/alerts/{uuid.uuid4()}", headers=duty_a)
        assert missing.status_code == 404
        # the other unit's id as a filter: an empty list, as for a unit that does not exist
        other = await api.get("/api/alerts", params={"unit": "station-b"}, headers=duty_a)
        assert other.json()["items"] == []
        street = await login(api, "street-1")
        seen = (await api.get("/api/alerts", headers=street)).json()["items"]
        assert sorted(a["site"]["id"] for a in seen) == ["site-a", "site-b"]
        # above the responsible unit, before any escalation: masked
        assert all(a["masked"] for a in seen)
        assert {a["resident"]["name"] for a in seen} == {"王**", "李**"}
        assert all("*" in a["resident"]["phone"] for a in seen)
        bureau = await login(api, "bureau-1")
        everything = (await api.get("/api/alerts", headers=bureau)).json()["items"]
        assert len(everything) == 3 and all(a["masked"] for a in everything)


async def test_double_tap_with_one_idempotency_key_is_one_acknowledgement(database: str) -> None:
    """Forced: the first tap holds the key's lock while it waits for the alert's row (held
    here), and the second arrives then and waits for the key. Once the row is free, the
    first acknowledges and the second replays its answer: one acknowledgement, never a
    409 for the second tap (what a lookup before the lock, or none, would give)."""
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    await drain(database, T0)
    alert_id = scalar(database, "SELECT id::text FROM alerts")
    async with (
        api_client(database) as api,
        await psycopg.AsyncConnection.connect(database, autocommit=True) as watch,
        await psycopg.AsyncConnection.connect(database) as held,
    ):
        duty = await login(api, "duty-a")
        headers = {**duty, "Idempotency-Key": "tap-1"}
        path = f"/api/alerts/{alert_id}/acknowledge"
        await held.execute("SELECT 1 FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))

        async def waiting(kind: str) -> bool:
            cur = await watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = ANY(%s)",
                (["transactionid", "tuple"] if kind == "row" else ["advisory"],))
            row = await cur.fetchone()
            return bool(row and row[0])

        first = asyncio.create_task(api.post(path, headers=headers))
        await until(lambda: waiting("row"), 10, "the first tap to wait for the alert's row")
        second = asyncio.create_task(api.post(path, headers=headers))
        await until(lambda: waiting("key"), 10, "the second tap to wait for the first's key")
        await held.rollback()
        answers = await asyncio.gather(first, second)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert answers[0].json() == answers[1].json()
        assert answers[0].json()["status"] == "acknowledged"
        assert answers[1].headers.get("Idempotent-Replayed") == "true"
        reused = await api.post(f"/api/alerts/{alert_id}/on-scene", headers=headers)
        assert reused.status_code == 422
    assert scalar(database, "SELECT count(*) FROM alert_audit WHERE action = 'acknowledged'") == 1


async def test_an_actions_answer_is_the_alert_as_read_after_it(database: str) -> None:
    """The answer to acknowledge, on scene and resolve is built from the view read with the
    command and the state the command wrote: it equals the alert read afterwards."""
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    await drain(database, T0)
    alert_id = scalar(database, "SELECT id::text FROM alerts")
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        for action, body in (("acknowledge", None), ("on-scene", None),
                             ("resolve", {"outcome": "handled", "note": "fine"})):
            answer = await api.post(f"/api/alerts/{alert_id}/{action}", json=body,
                                    headers={**duty, "Idempotency-Key": action})
            assert answer.status_code == 200, answer.text
            read = (await api.get(f"/api/alerts/{alert_id}", headers=duty)).json()
            del read["timeline"]
            assert answer.json() == read, action
        assert read["status"] == "resolved" and read["outcome"] == "handled"


async def test_an_acknowledgement_follows_the_policy_of_the_alerts_own_unit(database: str) -> None:
    """The command reads its alert's unit path by the alert's id (with the lock): station A's
    override (remind after 2 min) times A's acknowledged fall; B's override (5 min) does
    not, and B's fall keeps its own."""
    seed_tenants(database)
    ladder = [{"after_s": 0, "roles": ["duty"], "channels": ["console"]},
              {"after_s": 60, "roles": ["supervisor"], "channels": ["console"]}]
    with psycopg.connect(database, autocommit=True) as conn:
        for unit, remind in (("station-a", 120), ("station-b", 300)):
            conn.execute(
                "INSERT INTO escalation_policies (unit_id, alert_type, severity, policy)"
                " VALUES (%s, 'fall', 'critical', %s)",
                (unit, psycopg.types.json.Jsonb({"name": unit, "levels": ladder,
                                                 "remind_every_s": remind})))
    raise_event(database, "site-a", "wb-a", "fall")
    raise_event(database, "site-b", "wb-b", "fall")
    await drain(database, T0)
    with psycopg.connect(database) as conn:
        ids = dict(conn.execute("SELECT site_id, id::text FROM alerts").fetchall())
    async with api_client(database) as api:
        for site, user, remind in (("site-a", "duty-a", 120), ("site-b", "duty-b", 300)):
            acked = await api.post(f"/api/alerts/{ids[site]}/acknowledge",
                                   headers={**await login(api, user), "Idempotency-Key": site})
            assert acked.status_code == 200, acked.text
            body = acked.json()
            assert (datetime.fromisoformat(body["next_escalation_at"])
                    - datetime.fromisoformat(body["acknowledged_at"])) == timedelta(seconds=remind)


async def test_an_acknowledgement_tells_each_device_that_can_take_it(database: str) -> None:
    """The acknowledge reads its alert's device with the alert's lock: a wristband is told
    "help is coming", a smoke detector (no such command) is not, and a device the registry
    does not know is sent it (its edge answers what became of it)."""
    seed_tenants(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (site_id, id, profile, address)"
                     " VALUES ('site-a', 'sd-a', 'es-sd1', 'sd:aa')")
    for device in ("wb-a", "sd-a", "ghost-a"):
        raise_event(database, "site-a", device, "sos")
    await drain(database, T0)
    with psycopg.connect(database) as conn:
        ids = dict(conn.execute("SELECT device_id, id::text FROM alerts").fetchall())
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        for device, alert_id in ids.items():
            acked = await api.post(f"/api/alerts/{alert_id}/acknowledge",
                                   headers={**duty, "Idempotency-Key": device})
            assert acked.status_code == 200, acked.text
    with psycopg.connect(database) as conn:
        told = conn.execute("SELECT device_id FROM downlink_outbox WHERE action = 'acknowledge'"
                            " ORDER BY device_id").fetchall()
    assert told == [("ghost-a",), ("wb-a",)]


async def test_a_revoked_token_acts_on_nothing_and_gets_no_replay(database: str) -> None:
    """The token's person is checked in the acknowledge's first round trip, before the
    Idempotency-Key's stored answer could be replayed: after the person's token_version
    changes (a password reset, a disabled account), the old token gets 401 for a retry
    of an answered tap and for a new tap, and nothing changes."""
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    raise_event(database, "site-a", "wb-a", "sos")
    await drain(database, T0)
    with psycopg.connect(database) as conn:
        ids = dict(conn.execute("SELECT type, id::text FROM alerts").fetchall())
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        tap = {**duty, "Idempotency-Key": "tap-1"}
        fall = f"/api/alerts/{ids['fall']}/acknowledge"
        assert (await api.post(fall, headers=tap)).status_code == 200
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("UPDATE staff SET token_version = token_version + 1 WHERE id = 'duty-a'")
        retried = await api.post(fall, headers=tap)
        assert retried.status_code == 401 and "log in again" in retried.text
        late = await api.post(f"/api/alerts/{ids['sos']}/acknowledge",
                              headers={**duty, "Idempotency-Key": "tap-2"})
        assert late.status_code == 401
        bare = await api.post(f"/api/alerts/{ids['sos']}/on-scene", headers=duty)
        assert bare.status_code == 401
    assert scalar(database, "SELECT status FROM alerts WHERE type = 'sos'") == "open"


async def test_bad_requests_are_4xx_with_a_reason(database: str) -> None:
    seed_tenants(database)
    async with api_client(database) as api:
        assert (await api.get("/api/alerts")).status_code == 401
        bad = await api.get("/api/alerts", headers={"Authorization": "Bearer nonsense"})
        assert bad.status_code == 401 and "invalid token" in bad.text
        wrong = await api.post("/api/auth/login", json={"username": "duty-a", "password": "x"})
        assert wrong.status_code == 401
        duty = await login(api, "duty-a")
        for params in ({"cursor": "@@@"}, {"since": "2026-01-01T00:00:00"}, {"limit": "0"},
                       {"status": "burning"}):
            answer = await api.get("/api/alerts", params=params, headers=duty)
            assert 400 <= answer.status_code < 500, (params, answer.text)
        assert (await api.get("/api/alerts/not-a-uuid", headers=duty)).status_code == 422
