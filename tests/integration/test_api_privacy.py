"""PIPL (issue 8, point 6): reads of health readings and locations are recorded with the
alert they served; raw health and position telemetry has its own retention; a resident's
export holds everything about them; erase leaves the audit hash chain untouched and
verifiable (``eldersafe audit verify``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from api_support import T0, api_client, login, raise_event, seed_tenants
from support import scalar, until
from test_alert_engine import drain, rows

from gateway.alerts.unit_of_work import timers_tick
from gateway.api import privacy
from gateway.config import Settings
from gateway.db.retention import delete_old_sensitive_telemetry
from gateway.server import retention_loop

_AUDIT = "SELECT time, alert_id, seq, actor, action, channel, detail, prev_hash, hash" \
         " FROM alert_audit ORDER BY alert_id, seq"


def _telemetry(dsn: str, site: str, device: str, metric: str, at: datetime,
               value: float = 70) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO telemetry (time, site_id, device_id, metric, value, unit)"
                     " VALUES (%s, %s, %s, %s, %s, '')", (at, site, device, metric, value))


def _audit_verify(dsn: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"ELDERSAFE_DATABASE_URL": dsn, "ELDERSAFE_ENVIRONMENT": "test"}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


async def _ladder_to_family(dsn: str) -> str:
    """An SOS of resident r-a climbed to the family rung (family:<id>:<name> notices)."""
    raise_event(dsn, "site-a", "wb-a", "sos")
    await drain(dsn, T0)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await timers_tick(conn, T0 + timedelta(seconds=61))
    return str(scalar(dsn, "SELECT id FROM alerts"))


async def test_a_read_with_alert_is_recorded_with_that_alert(database: str) -> None:
    seed_tenants(database)
    alert_id = await _ladder_to_family(database)
    _telemetry(database, "site-a", "wb-a", "spo2_pct", T0, 96)
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE sites SET latitude = 31.2, longitude = 121.4 WHERE id = 'site-a'")
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        await api.get("/api/telemetry", headers=duty, params={
            "site": "site-a", "device": "wb-a", "alert": alert_id,
            "since": (T0 - timedelta(hours=1)).isoformat(), "until": T0.isoformat()})
        await api.get("/api/telemetry", headers=duty, params={
            "site": "site-a", "device": "wb-a", "since": (T0 - timedelta(hours=1)).isoformat(),
            "until": (T0 + timedelta(seconds=1)).isoformat()})
        site = (await api.get("/api/sites/site-a", headers=duty,
                              params={"alert": alert_id})).json()
        assert site["latitude"] == 31.2
        elsewhere = await api.get("/api/telemetry", headers=duty, params={
            "site": "site-a", "device": "wb-a", "alert": "6b1f2f4e-6c1e-4a55-9d0a-0d5e1a7e0002"})
        assert elsewhere.status_code == 404
        sup = await login(api, "sup-a")
        rid = scalar(database, "SELECT id FROM residents WHERE external_id = 'r-a'")
        log = (await api.get(f"/api/residents/{rid}/reads", headers=sup)).json()
    # the first range ends at T0 (exclusive): no reading, nothing shown, nothing recorded
    assert [(r["actor"], r["what"], r["alert_id"]) for r in reversed(log)] == [
        ("staff:duty-a", "telemetry", None)]
    assert rows(database, "SELECT what, alert_id::text, site_id FROM sensitive_reads"
                          " ORDER BY id") == [("telemetry", None, "site-a"),
                                             ("site_location", alert_id, "site-a")]
    detail = scalar(database, "SELECT detail FROM sensitive_reads WHERE what = 'telemetry'")
    assert detail["metrics"] == ["spo2_pct"] and detail["device"] == "wb-a"


async def test_retention_deletes_old_health_and_position_readings_only(database: str) -> None:
    seed_tenants(database)
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO devices (site_id, id, profile, address) VALUES"
                     " ('site-a', 'ef-1', 'es-ef1', '1')")
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=31), now - timedelta(days=29)
    for at in (old, recent):
        _telemetry(database, "site-a", "wb-a", "heart_rate_bpm", at)   # a wristband's
        _telemetry(database, "site-a", "wb-a", "battery_pct", at)      # a wristband's too
        _telemetry(database, "site-a", "ef-1", "latitude", at)          # a position
        _telemetry(database, "site-a", "ef-1", "residual_current_ma", at)  # not personal
    # the server's retention loop, as `eldersafe server` runs it, for one pass
    loop = asyncio.create_task(retention_loop(Settings(
        environment="test", database_url=database, sensitive_retention_days=30)))
    try:
        await until(lambda: scalar(database, "SELECT count(*) FROM telemetry") == 5,
                    within_s=30, what="the retention pass")
    finally:
        loop.cancel()
    async with await psycopg.AsyncConnection.connect(database) as conn:  # nothing left to do
        assert await delete_old_sensitive_telemetry(
            conn, timedelta(days=30), privacy.LOCATION_METRICS | privacy.HEALTH_METRICS,
            privacy.HEALTH_PROFILES) == 0
    kept = rows(database, "SELECT device_id, metric, time < %s FROM telemetry"
                          " ORDER BY device_id, metric, time", (now - timedelta(days=30),))
    assert kept == [("ef-1", "latitude", False), ("ef-1", "residual_current_ma", True),
                    ("ef-1", "residual_current_ma", False), ("wb-a", "battery_pct", False),
                    ("wb-a", "heart_rate_bpm", False)]


async def test_export_then_erase_leaves_the_audit_chain_verifiable(database: str) -> None:
    seed_tenants(database)
    alert_id = await _ladder_to_family(database)
    rid = scalar(database, "SELECT id FROM residents WHERE external_id = 'r-a'")
    _telemetry(database, "site-a", "wb-a", "heart_rate_bpm", T0)
    _telemetry(database, "site-b", "wb-b", "heart_rate_bpm", T0)  # another resident's
    assert rows(database, "SELECT count(*) FROM notifications WHERE person_id LIKE %s",
                (f"family:{rid}:%",))[0][0] >= 1
    audit_before = rows(database, _AUDIT)
    async with api_client(database) as api:
        duty = await login(api, "duty-a")
        assert (await api.get(f"/api/residents/{rid}/export", headers=duty)).status_code == 403
        sup = await login(api, "sup-a")
        export: dict[str, Any] = (await api.get(f"/api/residents/{rid}/export",
                                                headers=sup)).json()
        assert export["resident"]["name"] == "王秀英"
        assert [f["name"] for f in export["family_contacts"]] == ["王小明"]
        assert export["site"]["address"] == "甲路1号"
        assert [t["metric"] for t in export["telemetry"]] == ["heart_rate_bpm"]
        assert [a["id"] for a in export["alerts"]] == [alert_id]
        assert len(export["alert_audit"]) == len(audit_before)
        erased = await api.post(f"/api/residents/{rid}/erase", headers=sup)
        assert erased.status_code == 200, erased.text
        assert erased.json()["telemetry_rows_deleted"] == 1
        assert erased.json()["family_contacts_deleted"] == 1 and erased.json()["home_cleared"]
        after = (await api.get(f"/api/residents/{rid}", headers=sup)).json()
        assert after["name"] == f"erased-{rid}" and after["phone"] is None
        assert after["family"] == []
        # the alert is still there to read, without the name
        alert = (await api.get(f"/api/alerts/{alert_id}", headers=sup)).json()
        assert alert["resident"]["name"] == f"erased-{rid}"
        assert alert["site"]["address"] is None
    dump = "\n".join(str(r) for r in rows(
        database, "SELECT r::text FROM residents r UNION ALL SELECT s::text FROM sites s"
                  " UNION ALL SELECT f::text FROM family_contacts f"))
    for trace in ("王秀英", "13800000001", "王小明", "13800000011", "甲路1号"):
        assert trace not in dump, trace
    assert rows(database, "SELECT device_id FROM telemetry") == [("wb-b",)]
    assert rows(database, _AUDIT) == audit_before  # not one audit row changed
    verified = _audit_verify(database)
    assert verified.returncode == 0 and "audit log intact" in verified.stdout, verified.stdout
    assert rows(database, "SELECT what, actor FROM sensitive_reads WHERE resident_id = %s"
                          " ORDER BY id", (rid,)) == [("export", "staff:sup-a"),
                                                      ("erase", "staff:sup-a")]
