"""Issue 7's scale acceptance with real processes: two ``eldersafe server`` processes sharing
the MQTT subscription against one Mosquitto and one PostgreSQL run 500 escalating SOS alerts
up the whole ladder (0 s, 60 s, 3 min, 5 min on the database-driven engine clock); one server
is SIGKILLed while steps and notices are due, and at the end both are killed between events'
commit and their alerts. Every notification happens exactly once: one
``alert_steps`` row per rung, one ``notifications`` row per person and step, one ``notified``
audit entry per idempotency key (``eldersafe audit verify`` passes), and every key at the
local receivers (Apprise's json:// target, the voice provider, the bureau's webhook).

At the receivers a key may arrive twice only as the notifier runner documents it
(gateway/notify/runner.py: at-least-once, receivers keep the first of each key): a send the
killed server had on the wire before the kill and whose transaction died with it, sent again
by the survivor after the kill. Any other second arrival fails the test.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import pytest
from support import SERVER_PASSWORDS, publish_all, scalar, wait_for
from test_alert_engine import ingest

from gateway.alerts.district import District, import_district
from gateway.broker_auth import BrokerAccount, hash_password
from gateway.contract.payloads import EventPayload, EventType, Phase, dump
from gateway.local.mosquitto import MosquittoInstance

SECRET = "scale-test-bureau-key"
STATIONS = 5
SITES = 50  # homes, spread over the stations
DEVICES = 10  # call buttons per home, each its resident's: 500 alerts
# The engine clock starts an hour back (shifts and event times around it stay real).
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
# ARCHITECTURE §5's critical ladder: duty, supervisor and family, street, bureau
RUNGS = (0, 60, 180, 300)


def site_id(i: int) -> str:
    return f"home-{i:02d}"


def station_of(site: int) -> str:
    return f"station-{site % STATIONS}"


def gateway_password(site: int) -> str:
    return f"gw-pass-{site}"


# --- receivers -------------------------------------------------------------------------


class Receivers:
    """Apprise json:// targets, the voice/SMS provider and the bureau's webhook in one local
    HTTP server; every arrival is kept with its key and the monotonic time it came."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, str, float]] = []  # (kind, key, at)
        self.bad_signatures = 0
        self._lock = threading.Lock()
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receivers.take(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        Handler.protocol_version = "HTTP/1.1"  # keep-alive: fewer connections to accept
        ThreadingHTTPServer.request_queue_size = 256  # bursts of connections at each rung
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, path: str, headers: dict[str, str], body: bytes) -> None:
        at = time.monotonic()
        if path.startswith("/apprise/"):
            kind, key = "messaging", unquote(headers.get("idempotency-key", ""))
        elif path == "/voice":
            doc = json.loads(body)
            kind, key = doc["kind"], doc["idempotency_key"]
        else:
            doc = json.loads(body)
            kind, key = "webhook", doc["idempotency_key"]
            ts = headers.get("x-eldersafe-timestamp", "")
            mac = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256)
            if headers.get("x-eldersafe-signature") != "sha256=" + mac.hexdigest():
                kind = "bad-signature"
        with self._lock:
            self.arrivals.append((kind, key, at))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the district ------------------------------------------------------------------------


def district(port: int) -> dict[str, Any]:
    """One bureau, one street centre, stations with one duty person (messaging through
    Apprise) and one supervisor (console) each; homes with one family contact each, by
    Apprise on even homes and by phone (a voice call: the ladder's channels stop there) on
    odd ones."""
    base = f"http://127.0.0.1:{port}"
    orgs: list[dict[str, Any]] = [
        {"id": "bureau", "kind": "bureau", "name": "区民政局", "webhook_url": f"{base}/bureau"},
        {"id": "street-1", "parent": "bureau", "kind": "street", "name": "街道中心"},
    ]
    staff: list[dict[str, Any]] = [
        {"id": "street-a", "organisation": "street-1", "name": "陈", "role": "street"}
    ]
    shifts = []
    for k in range(STATIONS):
        orgs.append({"id": f"station-{k}", "parent": "street-1", "kind": "station",
                     "name": f"社区站 {k}"})  # fmt: skip
        apprise = f"json://127.0.0.1:{port}/apprise/duty-{k}"
        staff.append({"id": f"duty-{k}", "organisation": f"station-{k}", "name": "李",
                      "role": "duty", "apprise_url": apprise})  # fmt: skip
        staff.append({"id": f"sup-{k}", "organisation": f"station-{k}", "name": "张",
                      "role": "supervisor"})  # fmt: skip
        shifts.append({"staff": f"duty-{k}", "starts_at": (T0 - timedelta(hours=1)).isoformat(),
                       "ends_at": (T0 + timedelta(hours=12)).isoformat()})  # fmt: skip
    sites, residents, devices = [], [], []
    for i in range(SITES):
        sites.append({"id": site_id(i), "organisation": station_of(i), "name": f"家 {i}",
                      "address": f"幸福路 {i} 号"})  # fmt: skip
        for d in range(DEVICES):
            resident: dict[str, Any] = {"id": f"r-{i}-{d}", "site": site_id(i),
                                        "name": f"老人 {i}-{d}"}  # fmt: skip
            if d == 0:  # the home's family contact
                contact: dict[str, Any] = {"name": f"家属{i}"}
                if i % 2 == 0:
                    contact["apprise_url"] = f"json://127.0.0.1:{port}/apprise/family-{i}"
                else:
                    contact["phone"] = f"+86138{i:08d}"
                resident["family"] = [contact]
            residents.append(resident)
            devices.append({"site": site_id(i), "id": f"btn-{d}", "profile": "es-cb1",
                            "address": f"{i:02x}{d:02x}", "resident": f"r-{i}-{d}"})  # fmt: skip
    return {"organisations": orgs, "sites": sites, "residents": residents, "devices": devices,
            "staff": staff, "shifts": shifts}  # fmt: skip


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
def district_broker() -> Iterator[MosquittoInstance]:
    """Mosquitto with both server accounts and one gateway account per home (a cheap hash:
    fifty accounts, one connection each)."""
    directory = Path(tempfile.mkdtemp(prefix="eldersafe-mqtt-"))
    directory.chmod(0o755)
    accounts = [BrokerAccount(u, hash_password(p), None) for u, p in SERVER_PASSWORDS.items()]
    accounts += [
        BrokerAccount(f"gw-{site_id(i)}", hash_password(gateway_password(i), iterations=1000),
                      site_id(i))
        for i in range(SITES)
    ]  # fmt: skip
    instance = MosquittoInstance(directory)
    instance.configure(accounts)
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(directory, ignore_errors=True)


def set_clock(dsn: str, at: datetime) -> None:
    """Move the servers' engine clock (ELDERSAFE_ENGINE_CLOCK=database) and wake them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO engine_clock (now) VALUES (%s) ON CONFLICT (id) DO UPDATE SET now = %s",
            (at, at),
        )
        conn.execute("NOTIFY engine_timers")
        conn.execute("NOTIFY notifications")


def outstanding(dsn: str, at: datetime) -> int:
    """Work due at engine time ``at``: unclaimed events, due steps, due notices."""
    return int(scalar(
        dsn,
        "SELECT (SELECT count(*) FROM engine_inbox)"
        " + (SELECT count(*) FROM alerts WHERE status <> 'resolved' AND next_step_at <= %s)"
        " + (SELECT count(*) FROM notifications WHERE status = 'pending' AND not_before <= %s)",
        (at, at),
    ))  # fmt: skip


def settle_at(dsn: str, second: int, steps: int, within_s: float, logs: str = "") -> None:
    at = T0 + timedelta(seconds=second)
    set_clock(dsn, at)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM alert_steps") >= steps, within_s,
             f"{steps} steps at {second} s{logs}")  # fmt: skip
    wait_for(lambda: outstanding(dsn, at) == 0, within_s, f"nothing due at {second} s{logs}")


def publish_site(port: int, i: int) -> list[Any]:
    messages = []
    for d in range(DEVICES):
        event = EventPayload(v=1, event_id=uuid.uuid4(), type=EventType.SOS, phase=Phase.PULSE,
                             time=datetime.now(UTC), profile="es-cb1")  # fmt: skip
        messages.append((f"eldersafe/v1/{site_id(i)}/btn-{d}/event", dump(event), 1))
    return list(publish_all(port, f"gw-{site_id(i)}", gateway_password(i), messages))


def expected_keys(dsn: str) -> dict[str, str]:
    """Every idempotency key the ladder must deliver once, with its channel, from the
    steps that fired and who the district file says each role of each home is."""
    with psycopg.connect(dsn) as conn:
        steps = conn.execute(
            "SELECT s.step_id, s.level, a.site_id FROM alert_steps s"
            " JOIN alerts a ON a.id = s.alert_id"
        ).fetchall()
        family: dict[str, str] = dict(conn.execute(
            "SELECT r.site_id, 'family:' || r.id || ':' || f.name FROM residents r"
            " JOIN family_contacts f ON f.resident_id = r.id"
        ).fetchall())  # fmt: skip
    want: dict[str, str] = {}
    for step, level, site in steps:
        i = int(site.removeprefix("home-"))
        station = int(station_of(i).removeprefix("station-"))
        by_level: dict[int, list[tuple[str, tuple[str, ...]]]] = {
            0: [(f"staff:duty-{station}", ("console", "messaging"))],
            1: [(f"staff:sup-{station}", ("console",)),
                (family[site], ("messaging",) if i % 2 == 0 else ("voice",))],
            2: [("staff:street-a", ("console",))],
            3: [("bureau:bureau", ("webhook",))],
        }  # fmt: skip
        for person, channels in by_level[level]:
            for channel in channels:
                want[f"{step}/{person}/{channel}"] = channel
    return want


# --- the test ----------------------------------------------------------------------------


def test_two_servers_500_escalating_alerts_every_notification_once_through_a_sigkill(
    database: str, district_broker: MosquittoInstance, make_server: Any
) -> None:
    receivers = Receivers()
    try:
        import_district(database, District.model_validate(district(receivers.port)))
        set_clock(database, T0)
        env = {
            "ELDERSAFE_ENGINE_CLOCK": "database",
            "ELDERSAFE_ENGINE_POLL_S": "0.2",
            "ELDERSAFE_MQTT_SHARED_GROUP": "engine",
            "ELDERSAFE_BUREAU_WEBHOOK_SECRET": SECRET,
            "ELDERSAFE_VOICE_PROVIDER_URL": f"http://127.0.0.1:{receivers.port}/voice",
            "ELDERSAFE_NOTIFY_SEND_TIMEOUT_S": "5",
        }
        a = make_server(database, district_broker.port, **env)
        b = make_server(database, district_broker.port, username="server-2", **env)
        for s in (a, b):
            s.start()
        for s in (a, b):
            s.wait_session()

        def logs() -> str:
            return f"\nserver log:\n{a.log_tail()}\nserver-2 log:\n{b.log_tail()}"

        with ThreadPoolExecutor(8) as pool:
            rcs = [rc for site_rcs in pool.map(lambda i: publish_site(district_broker.port, i),
                                               range(SITES)) for rc in site_rcs]  # fmt: skip
        assert rcs == [0] * (SITES * DEVICES)
        alerts = SITES * DEVICES
        wait_for(lambda: scalar(database, "SELECT count(*) FROM alerts") >= alerts, 40,
                 f"{alerts} alerts{logs()}")  # fmt: skip
        # Both servers took part in the first rungs (whoever claimed the inbox rows).
        first_rungs_by = scalar(database, "SELECT count(DISTINCT split_part(fired_by, '/', 1))"
                                " FROM alert_steps")  # fmt: skip
        settle_at(database, RUNGS[0], alerts, 40, logs())
        settle_at(database, RUNGS[1], 2 * alerts, 40, logs())

        # The 3-minute rung and the SMS fallbacks fall due at once; server a dies while
        # both servers are working through them.
        set_clock(database, T0 + timedelta(seconds=RUNGS[2]))
        wait_for(lambda: scalar(database, "SELECT count(*) FROM alert_steps") >= 2 * alerts + 50,
                 30, f"the 3-minute rung under way{logs()}")  # fmt: skip
        a.kill()
        killed_at = time.monotonic()
        settle_at(database, RUNGS[2], 3 * alerts, 60, logs())
        a.start()  # back for the last rung: a restart resumes where the ladder is
        a.wait_session()
        settle_at(database, RUNGS[3], 4 * alerts, 60, logs())
        # A receiver's hiccup is retried after a backoff on the engine clock: move it on
        # (short of the top rung's repeat at 15 min) until nothing is left to send.
        settle_at(database, RUNGS[3] + 120, 4 * alerts, 30, logs())
        want = expected_keys(database)

        # Every alert once, each at the top of the ladder, each rung once.
        per_alert = dict(scalar_rows(database,
            "SELECT a.site_id || '/' || a.device_id, array_agg(s.level ORDER BY s.level)"
            " FROM alerts a JOIN alert_steps s ON s.alert_id = a.id GROUP BY 1"))  # fmt: skip
        assert per_alert == {f"{site_id(i)}/btn-{d}": [0, 1, 2, 3]
                             for i in range(SITES) for d in range(DEVICES)}  # fmt: skip
        assert scalar(database, "SELECT count(*) FROM alerts WHERE status = 'open'"
                      " AND level = 3 AND count = 1") == alerts  # fmt: skip
        escalated = Counter(dict(scalar_rows(database,
            "SELECT detail->>'step', count(*) FROM alert_audit WHERE action = 'escalated'"
            " GROUP BY 1")))  # fmt: skip
        assert len(escalated) == 4 * alerts and set(escalated.values()) == {1}

        # The outbox: one row per person and step, every one delivered and closed.
        statuses = Counter(dict(scalar_rows(database,
            "SELECT status, count(*) FROM notifications GROUP BY 1")))  # fmt: skip
        assert statuses == {"sent": 5 * alerts}, (statuses, scalar_rows(database,
            "SELECT key, concat_ws(' ', status, channel, not_before, attempts, last_error)"
            " FROM notifications WHERE status <> 'sent' LIMIT 5"))  # fmt: skip

        # The audit log: exactly one delivery per key, the chains intact.
        notified = Counter(dict(scalar_rows(database,
            "SELECT (detail->>'step') || '/' || (detail->>'person') || '/' || channel, count(*)"
            " FROM alert_audit WHERE action = 'notified' GROUP BY 1")))  # fmt: skip
        assert {k for k, n in notified.items() if n > 1} == set()
        assert set(notified) == set(want)
        verify = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "audit", "verify"],
            env={**os.environ, "ELDERSAFE_DATABASE_URL": database,
                 "ELDERSAFE_ENVIRONMENT": "test"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr

        # The receivers: every outside key arrived; a second arrival only for a send the
        # killed server had on the wire, repeated by the survivor after the kill.
        outside = {k: c for k, c in want.items() if c != "console"}
        wait_for(lambda: {k for _, k, _ in list(receivers.arrivals)} >= set(outside), 10,
                 "every outside key at its receiver")  # fmt: skip
        arrivals = list(receivers.arrivals)
        assert not [x for x in arrivals if x[0] == "bad-signature"]
        got = defaultdict(list)
        for kind, key, at in arrivals:
            got[key].append((kind, at))
        assert set(got) == set(outside), set(got) ^ set(outside)
        assert {k: next(kind for kind, _ in v) for k, v in got.items()} == outside
        doubles = {k: sorted(at for _, at in v) for k, v in got.items() if len(v) > 1}
        cut_by_the_kill = {k for k, ats in doubles.items()
                           if len(ats) == 2 and ats[0] < killed_at < ats[1]}  # fmt: skip
        assert set(doubles) == cut_by_the_kill, f"keys sent twice: {sorted(doubles)[:10]}"
        assert len(doubles) <= 2 * 20, doubles  # a server's passes × batch in flight
        assert first_rungs_by == 2, "both servers should have fired first rungs"

        # Killed between an event's commit and its alert: both servers stopped dead, events
        # committed as ingest commits them (with their inbox rows), both SIGKILLed; the
        # restarted one raises every alert with its first rung.
        for s in (a, b):
            assert s.proc is not None
            os.kill(s.proc.pid, signal.SIGSTOP)
        late = T0 + timedelta(seconds=RUNGS[3] + 120)
        for i in range(SITES):
            ingest(database, site_id(i), "btn-late", "sos", at=late)
        assert scalar(database, "SELECT count(*) FROM engine_inbox") == SITES
        a.kill()
        b.kill()
        b.start()
        wait_for(lambda: scalar(database, "SELECT count(*) FROM alert_steps") == 4 * alerts
                 + SITES and scalar(database, "SELECT count(*) FROM engine_inbox") == 0, 40,
                 f"the alerts of the committed events after the restart{logs()}")  # fmt: skip
        assert scalar(database, "SELECT count(*) FROM alerts WHERE device_id = 'btn-late'") == SITES
    finally:
        receivers.close()


def scalar_rows(dsn: str, sql: str) -> list[tuple[Any, Any]]:
    with psycopg.connect(dsn) as conn:
        return [(r[0], r[1]) for r in conn.execute(sql).fetchall()]
