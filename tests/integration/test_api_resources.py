"""The staff API's other resources on the real database: the organisation tree, sites,
residents, devices (registration, readings, commands and their results), staff and
shifts, escalation policies, bucketed telemetry, escalation by hand, the provider's
acknowledge-code callback."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta

import psycopg
from api_support import PASSWORD, T0, api_client, login, raise_event, seed_tenants
from support import scalar
from test_alert_engine import drain, rows

from gateway.alerts.directory import load_policy_book
from gateway.alerts.downlink import record_result
from gateway.api.security import api_key_digest, new_api_key


async def test_the_tree_within_scope_with_counts_of_each_node(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-b", "wb-b", "sos")
    await drain(database, T0)
    async with api_client(database) as api:
        street = (await api.get("/api/organisations",
                                headers=await login(api, "street-1"))).json()
        assert [o["id"] for o in street] == ["street-1", "station-a", "station-b"]
        assert street[0]["parent_id"] is None  # the bureau above is not theirs to see
        b = next(o for o in street if o["id"] == "station-b")
        assert (b["parent_id"], b["sites"], b["residents"], b["open_alerts"]) == \
            ("street-1", 1, 1, 1)
        admin = (await api.get("/api/organisations", headers=await login(api, "admin"))).json()
        assert len(admin) == 6 and admin[0]["id"] == "bureau"
        duty = await login(api, "duty-a")
        assert (await api.get("/api/organisations/station-a", headers=duty)).status_code == 200
        assert (await api.get("/api/organisations/station-b", headers=duty)).status_code == 404


async def test_a_supervisor_registers_a_site_a_resident_and_a_wristband(database: str) -> None:
    seed_tenants(database)
    async with api_client(database) as api:
        sup = await login(api, "sup-a")
        duty = await login(api, "duty-a")
        site = {"id": "site-a2", "organisation_id": "station-a", "name": "张家",
                "address": "甲路9号", "latitude": 31.2, "longitude": 121.4}
        assert (await api.post("/api/sites", json=site, headers=duty)).status_code == 403
        other = await api.post("/api/sites", json=site | {"organisation_id": "station-b"},
                               headers=sup)
        assert other.status_code == 404 and "station-b" in other.text
        made = await api.post("/api/sites", json=site, headers=sup)
        assert made.status_code == 201, made.text
        assert (await api.post("/api/sites", json=site, headers=sup)).status_code == 409
        resident = {"site_id": "site-a2", "name": "张玉兰", "birth_year": 1940,
                    "phone": "13900000001", "heart_rate_min": 50, "heart_rate_max": 110,
                    "conditions": "高血压", "family": [{"name": "张伟", "phone": "13900000002"}]}
        bad = await api.post("/api/residents", json=resident | {"heart_rate_min": 120},
                             headers=sup)
        assert bad.status_code == 422 and "must lie below" in bad.text
        created = await api.post("/api/residents", json=resident, headers=sup)
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        assert created.json()["family"] == [{"name": "张伟", "phone": "13900000002", "rank": 0}]
        patched = await api.patch(f"/api/residents/{rid}", headers=sup,
                                  json={"spo2_min": 92, "family": []})
        assert patched.json()["spo2_min"] == 92 and patched.json()["family"] == []
        band = {"site_id": "site-a2", "id": "wb-z", "profile": "es-wb1",
                "address": "AA:BB:CC:DD:EE:01", "resident_id": rid}
        unknown = await api.post("/api/devices", json=band | {"profile": "es-zz9"}, headers=sup)
        assert unknown.status_code == 422 and "unknown device profile" in unknown.text
        registered = await api.post("/api/devices", json=band, headers=sup)
        assert registered.status_code == 201, registered.text
        # the vital-sign sweep now watches the band given to a resident
        assert scalar(database, "SELECT count(*) FROM condition_state WHERE device_id = 'wb-z'"
                      " AND metric = 'vital_signs'") == 1
        listed = (await api.get("/api/residents", params={"site": "site-a2"},
                                headers=duty)).json()
        assert [r["name"] for r in listed["items"]] == ["张玉兰"]
        street = await login(api, "street-1")
        seen = (await api.get(f"/api/residents/{rid}", headers=street)).json()
        assert seen["masked"] and seen["name"] == "张**" and seen["conditions"] is None
        assert seen["phone"] == "139****0001" and seen["heart_rate_min"] is None
        site_seen = (await api.get("/api/sites/site-a2", headers=street)).json()
        assert site_seen["latitude"] is None and site_seen["address"] != "甲路9号"


async def test_lists_page_with_cursors_and_every_item_once(database: str) -> None:
    seed_tenants(database)
    with psycopg.connect(database) as conn:
        for i in range(7):
            # pairs share a creation time: the cursor's tie-break on the id is exercised
            at = T0 + timedelta(seconds=i // 2)
            conn.execute("INSERT INTO sites (id, organisation_id, kind, name, created_at)"
                         " VALUES (%s, 'station-a', 'home', %s, %s)", (f"s-{i}", f"s{i}", at))
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
            page = (await api.get("/api/sites", params=params, headers=duty)).json()
            seen += [s["id"] for s in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted([f"s-{i}" for i in range(7)] + ["site-a"])
        assert len(seen) == len(set(seen))


async def test_readings_are_recorded_as_sensitive_reads_and_masked_above(database: str) -> None:
    seed_tenants(database)
    with psycopg.connect(database) as conn:
        for i in range(6):
            conn.execute("INSERT INTO telemetry (time, site_id, device_id, metric, value, unit)"
                         " VALUES (%s, 'site-a', 'wb-a', 'heart_rate_bpm', %s, 'bpm')",
                         (T0 - timedelta(minutes=10 * i), 70 + i))
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        last = (await api.get("/api/devices/site-a/wb-a/readings", headers=duty)).json()
        assert [(r["metric"], r["value"], r["masked"]) for r in last] == \
            [("heart_rate_bpm", 70.0, False)]
        series = (await api.get("/api/telemetry", headers=duty, params={
            "site": "site-a", "device": "wb-a", "since": (T0 - timedelta(hours=1)).isoformat(),
            "until": (T0 + timedelta(minutes=1)).isoformat(), "bucket": "1800"})).json()
        points = series["series"][0]["points"]
        assert sum(p["count"] for p in points) == 6
        assert min(p["min"] for p in points) == 70 and max(p["max"] for p in points) == 75
        street = await login(api, "street-1")
        masked = (await api.get("/api/devices/site-a/wb-a/readings", headers=street)).json()
        assert masked[0]["masked"] and masked[0]["value"] is None
        too_wide = await api.get("/api/telemetry", headers=duty, params={
            "site": "site-a", "device": "wb-a", "bucket": "1",
            "since": (T0 - timedelta(days=30)).isoformat(), "until": T0.isoformat()})
        assert too_wide.status_code == 422 and "buckets" in too_wide.text
    reads = rows(database, "SELECT actor, what, resident_id IS NOT NULL, site_id"
                           " FROM sensitive_reads ORDER BY id")
    # the duty worker's two reads; the street user's masked one showed nothing to record
    assert reads == [("staff:duty-a", "last_readings", True, "site-a"),
                     ("staff:duty-a", "telemetry", True, "site-a")]


async def test_a_command_is_queued_for_the_downlink_and_its_result_shown(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    await drain(database, T0)
    alert_id = scalar(database, "SELECT id FROM alerts")
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        path = "/api/devices/site-a/wb-a/commands"
        refused = await api.post(path, headers=duty, json={"action": "hush",
                                                           "alert_id": str(alert_id)})
        assert refused.status_code == 422 and "cannot hush" in refused.text
        other = await api.post("/api/devices/site-b/wb-b/commands", headers=duty,
                               json={"action": "locate", "alert_id": str(alert_id)})
        assert other.status_code == 404
        sent = await api.post(path, headers={**duty, "Idempotency-Key": "loc-1"},
                              json={"action": "locate", "alert_id": str(alert_id)})
        assert sent.status_code == 202, sent.text
        again = await api.post(path, headers={**duty, "Idempotency-Key": "loc-1"},
                               json={"action": "locate", "alert_id": str(alert_id)})
        assert again.json() == sent.json()
        command_id = sent.json()["command_id"]
        assert rows(database, "SELECT action, alert_id, published_at FROM downlink_outbox"
                              " WHERE command_id = %s", (command_id,)) == \
            [("locate", alert_id, None)]
        with psycopg.connect(database) as conn:  # the edge's answer, as ingest stores it
            conn.execute("INSERT INTO command_results (command_id, site_id, device_id, action,"
                         " outcome, via, alert_id, time) VALUES (%s, 'site-a', 'wb-a', 'locate',"
                         " 'executed', 'ble', %s, %s)", (command_id, alert_id, T0))
        shown = (await api.get(f"{path}/{command_id}", headers=duty)).json()
        assert shown["result"]["outcome"] == "executed"
        async with await psycopg.AsyncConnection.connect(database) as conn:
            assert await record_result(conn, T0, "test")  # the server's result recorder
        timeline = (await api.get(f"/api/alerts/{alert_id}", headers=duty)).json()["timeline"]
        notes = [e for e in timeline if e["action"] == "noted" and e["actor"] == "staff:duty-a"]
        assert len(notes) == 1 and command_id in notes[0]["detail"]["note"]
        # who sent it, then the device's answer, in the alert's own audit chain
        answer = [e for e in timeline if e["detail"].get("command_id") == command_id]
        assert [(e["actor"], e["action"]) for e in answer] == [("device:site-a/wb-a",
                                                                "notified")]
        assert answer[0]["seq"] > notes[0]["seq"]


async def test_staff_passwords_end_old_tokens_and_who_is_on_duty(database: str) -> None:
    seed_tenants(database)
    async with api_client(database) as api:
        sup = await login(api, "sup-a")
        duty = await login(api, "duty-a")
        on_duty = (await api.get("/api/staff/on-duty", headers=sup)).json()
        assert [s["id"] for s in on_duty] == ["duty-a"]
        made = await api.post("/api/staff", headers=sup, json={
            "id": "duty-a2", "organisation_id": "station-a", "name": "新护工", "role": "duty",
            "password": "a long enough secret"})
        assert made.status_code == 201, made.text
        too_high = await api.post("/api/staff", headers=sup, json={
            "id": "x", "organisation_id": "station-a", "name": "x", "role": "admin"})
        assert too_high.status_code == 403
        shift = await api.post("/api/shifts", headers=sup, json={
            "staff_id": "duty-a2", "starts_at": (T0 - timedelta(hours=2)).isoformat(),
            "ends_at": (T0 + timedelta(hours=6)).isoformat()})
        assert shift.status_code == 201, shift.text
        on_duty = (await api.get("/api/staff/on-duty", headers=sup)).json()
        assert [s["id"] for s in on_duty] == ["duty-a", "duty-a2"]
        changed = await api.post("/api/staff/duty-a/password", headers=sup,
                                 json={"password": "another long secret"})
        assert changed.status_code == 204
        assert (await api.get("/api/auth/me", headers=duty)).status_code == 401
        old = await api.post("/api/auth/login", json={"username": "duty-a",
                                                      "password": PASSWORD})
        assert old.status_code == 401
        assert (await api.post("/api/auth/login", json={
            "username": "duty-a", "password": "another long secret"})).status_code == 200
        duty_b = await login(api, "duty-b")
        assert (await api.get("/api/staff/duty-a", headers=duty_b)).status_code == 404


async def test_a_policy_override_is_what_the_engine_reads(database: str) -> None:
    seed_tenants(database)
    doc = {"name": "fast", "levels": [
        {"after_s": 0, "roles": ["duty"], "channels": ["console"]},
        {"after_s": 30, "roles": ["supervisor"], "channels": ["console", "voice"]}]}
    async with api_client(database) as api:
        sup = await login(api, "sup-a")
        bad = await api.put("/api/policies/station-a/any/critical", headers=sup,
                            json=doc | {"levels": list(reversed(doc["levels"]))})
        assert bad.status_code == 422 and "ascend" in bad.text
        other = await api.put("/api/policies/station-b/any/critical", headers=sup, json=doc)
        assert other.status_code == 404
        put = await api.put("/api/policies/station-a/fall/critical", headers=sup, json=doc)
        assert put.status_code == 200, put.text
        listed = (await api.get("/api/policies", headers=sup)).json()
        assert [(p["unit_id"], p["alert_type"]) for p in listed if p["unit_id"]] == \
            [("station-a", "fall")]
    async with await psycopg.AsyncConnection.connect(database) as conn:
        book = await load_policy_book(conn)
    assert book.overrides["station-a"].by_type
    assert [lv.after.total_seconds() for lv in
            next(iter(book.overrides["station-a"].by_type.values())).levels] == [0, 30]


async def test_escalate_by_hand_fires_the_supervisor_rung_now(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "sos")
    await drain(database, T0)
    alert_id = scalar(database, "SELECT id::text FROM alerts")
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        path = f"/api/alerts/{alert_id}/escalate"
        assert (await api.post(path, headers=duty, json={"reason": ""})).status_code == 422
        answer = await api.post(path, headers=duty, json={"reason": "我走不开"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["level"] == 1
        other = await login(api, "duty-b")
        assert (await api.post(path, headers=other, json={"reason": "x"})).status_code == 404
    audit = rows(database, "SELECT actor, action, detail->>'level' FROM alert_audit"
                           " WHERE action = 'escalated' ORDER BY seq")
    # the first rung at opening, the person's call, then the rung it made due at once
    assert audit == [("system:escalation", "escalated", "0"), ("staff:duty-a", "escalated", "1"),
                     ("system:escalation", "escalated", "1")]
    # the rung's notices went out at once (engine clock T0: 60 s early)
    assert scalar(database, "SELECT count(*) FROM notifications WHERE level = 1"
                            " AND role = 'supervisor'") >= 1


async def test_the_providers_ack_code_confirms_and_acknowledges(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "sos")
    await drain(database, T0)
    key = new_api_key()
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO api_keys (id, name, organisation_id, role, key_sha256)"
                     " VALUES ('voice', 'voice provider', 'bureau', 'admin', %s)",
                     (api_key_digest(key),))
    notice, code = rows(database, "SELECT key, ack_code FROM notifications"
                                  " WHERE person_id = 'staff:duty-a' LIMIT 1")[0]
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        body = {"notification": notice, "digits": code}
        assert (await api.post("/api/notify/ack-code", headers=duty,
                               json=body)).status_code == 403
        provider = {"X-API-Key": key}
        wrong = await api.post("/api/notify/ack-code", headers=provider,
                               json=body | {"digits": "9" * 7})
        assert wrong.json() == {"confirmed": False, "acknowledged": False}
        unknown = await api.post("/api/notify/ack-code", headers=provider,
                                 json={"notification": str(uuid.uuid4()), "digits": "1"})
        assert unknown.status_code == 404
        retried = {**provider, "Idempotency-Key": "call-7/dtmf-1"}
        right = await api.post("/api/notify/ack-code", headers=retried, json=body)
        assert right.json() == {"confirmed": True, "acknowledged": True}
        again = await api.post("/api/notify/ack-code", headers=retried, json=body)
        assert again.json() == right.json()  # the provider's retry: the first answer
    assert scalar(database, "SELECT acknowledged_by FROM alerts") == "staff:duty-a"
    # the wrong code, the right one, the acknowledgement it made: the retry added nothing
    assert rows(database, "SELECT action, detail->>'confirmed' FROM alert_audit WHERE actor ="
                          " 'staff:duty-a' ORDER BY seq") == [
        ("noted", "false"), ("noted", "true"), ("acknowledged", None)]


def _cli(dsn: str, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], input=stdin, capture_output=True,
        text=True, timeout=60, check=False,
        env=os.environ | {"ELDERSAFE_DATABASE_URL": dsn, "ELDERSAFE_ENVIRONMENT": "test"} | env)


async def test_cli_sets_a_password_and_adds_an_api_key_shown_once(database: str) -> None:
    seed_tenants(database)
    async with api_client(database) as api:
        old_token = await login(api, "duty-a")
        short = _cli(database, "staff-password", "duty-a", stdin="short\n")
        assert short.returncode == 1 and "at least 10" in short.stderr
        nobody = _cli(database, "staff-password", "nobody", stdin="long enough pass\n")
        assert nobody.returncode == 1 and "no staff member" in nobody.stderr
        done = _cli(database, "staff-password", "duty-a", "--password-env", "NEW_PW",
                    NEW_PW="a brand new secret")
        assert done.returncode == 0, done.stderr
        assert "a brand new secret" not in done.stdout
        assert (await api.get("/api/auth/me", headers=old_token)).status_code == 401
        assert (await api.post("/api/auth/login", json={
            "username": "duty-a", "password": "a brand new secret"})).status_code == 200
        added = _cli(database, "api-key-add", "--id", "dispatch", "--org", "street-1",
                     "--role", "street")
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip()
        me = (await api.get("/api/auth/me", headers={"X-API-Key": key})).json()
        assert me["units"] == ["station-a", "station-b", "street-1"]
        assert key.encode() not in bytes(scalar(database, "SELECT key_sha256 FROM api_keys"))
        unknown_org = _cli(database, "api-key-add", "--id", "x", "--org", "nowhere",
                           "--role", "duty")
        assert unknown_org.returncode == 1 and "refused" in unknown_org.stderr


async def test_hostile_input_is_a_4xx_never_a_500(database: str) -> None:
    """JSON may carry a lone surrogate, which no UTF-8 answer can echo; huge, early and
    late values; ids beyond bigint. Each is a 4xx with a reason."""
    seed_tenants(database)
    async with api_client(database) as api:
        admin = await login(api, "admin") | {"Content-Type": "application/json"}
        for path, body in (
            ("/api/sites", '{"id": "x1", "organisation_id": "station-a", "name": "\\ud800"}'),
            ("/api/residents", '{"site_id": "site-a", "name": "a", "timezone": "\\ud800"}'),
            ("/api/residents", '{"site_id": "site-a", "name": "a", "birth_year": 1e400}'),
            ("/api/devices/site-a/wb-a/commands",
             '{"action": "locate", "alert_id": "00000000-0000-0000-0000-000000000000",'
             ' "args": {"n": 99999999999999999999999}}'),
        ):
            answer = await api.post(path, content=body, headers=admin)
            assert 400 <= answer.status_code < 500, (path, answer.text)
        for params in ({"until": "0001-01-01T00:00:00Z"},
                       {"until": "9999-12-31T23:59:59-23:59", "bucket": "86400"},
                       {"since": "2026-01-01T00:00:00Z", "until": "2025-01-01T00:00:00Z"}):
            answer = await api.get("/api/telemetry", headers=admin,
                                   params={"site": "site-a", "device": "wb-a"} | params)
            assert answer.status_code in (200, 422), (params, answer.text)
        for path in ("/api/residents/99999999999999999999", "/api/shifts/0",
                     "/api/residents?cursor=MjAyNi0wMS0wMVQwMDowMDowMCswMDowMHw5OTk5OTk5OTk5"
                     "OTk5OTk5OTk5OTk5"):
            answer = await api.get(path, headers=admin)
            assert 400 <= answer.status_code < 500, (path, answer.text)
