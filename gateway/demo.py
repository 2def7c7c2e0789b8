"""``eldersafe demo``: a small simulated district on one machine, with its own broker and database.

Starts a private Mosquitto and PostgreSQL + TimescaleDB under the state
directory (never the system's services), registers a district (bureau →
street → community station and care home → sites) and one gateway per site,
runs ``eldersafe server``, plays every scenario in ``simulators/scenarios``
at once (each with its simulated devices and a real ``eldersafe edge``
process), sends one corrupt message as a faulty third-party gateway would,
and prints what arrived in the database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker_auth import BrokerAccount, hash_password
from gateway.config import DEMO_SECRET
from gateway.db.migrate import migrate
from gateway.local.mosquitto import MosquittoInstance
from gateway.local.postgres import PostgresInstance
from gateway.simulate import BrokerLogin, run_scenario
from simulators.scenario import Scenario, all_scenarios, load_scenario

DEMO_GATEWAY_PASSWORD = "eldersafe-demo-gateway"

ORGANISATIONS = """
INSERT INTO organisations (id, parent_id, kind, name) VALUES
  ('bureau-pudong', NULL, 'bureau', 'District Civil Affairs Bureau'),
  ('street-huamu', 'bureau-pudong', 'street', 'Huamu Street Centre'),
  ('station-xinhua', 'street-huamu', 'station', 'Xinhua Community Station'),
  ('inst-anyang', 'street-huamu', 'institution', 'Anyang Care Home')
ON CONFLICT DO NOTHING
"""


def _postgres_can_reach(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        ["runuser", "-u", "postgres", "--", "test", "-x", str(path)], check=False
    )
    return probe.returncode == 0


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        time.sleep(0.2)


def _register(dsn: str, scenarios: list[Scenario]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(  # each demo run starts from an empty record
            "TRUNCATE telemetry, device_events, event_ledger, device_status, dead_letters"
        )
        conn.execute(ORGANISATIONS)
        for sc in scenarios:
            unit = "inst-anyang" if sc.site.startswith("anyang") else "station-xinhua"
            kind = "room" if unit == "inst-anyang" else "home"
            conn.execute(
                "INSERT INTO sites (id, organisation_id, kind, name) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (sc.site, unit, kind, sc.title),
            )
            conn.execute(
                "INSERT INTO gateways (id, site_id, password_hash) VALUES (%s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING",
                (sc.gateway, sc.site, hash_password(DEMO_GATEWAY_PASSWORD)),
            )


def _faulty_gateway_message(port: int, sc: Scenario) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-faulty", protocol=mqtt.MQTTv5)
    client.username_pw_set(sc.gateway, DEMO_GATEWAY_PASSWORD)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(
        f"eldersafe/v1/{sc.site}/third-party/telemetry", b'{"v":1,"readings":"corrupt"', qos=1
    ).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


async def _play_all(scenarios: list[Scenario], port: int, state_dir: Path) -> list[int]:
    return await asyncio.gather(
        *(
            run_scenario(
                sc,
                BrokerLogin("127.0.0.1", port, sc.gateway, DEMO_GATEWAY_PASSWORD),
                state_dir / "sim" / sc.name,
            )
            for sc in scenarios
        )
    )


def _report(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        print("\n== device events (one row per event id, however many repeats and receivers)")
        for when, site, device, etype, phase, data in conn.execute(
            "SELECT time, site_id, device_id, type, phase, data FROM device_events"
            " ORDER BY site_id, time"
        ):
            print(f"   {when:%H:%M:%S} {site:12} {device:16} {etype:18} {phase:6} {data}")
        print("== telemetry (rows by site and metric)")
        for site, metric, n, lo, hi in conn.execute(
            "SELECT site_id, metric, count(*), min(value), max(value) FROM telemetry"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ):
            print(f"   {site:12} {metric:26} {n:4} rows  {lo:8.1f} … {hi:8.1f}")
        print("== device and gateway status")
        for site, device, online, battery in conn.execute(
            "SELECT site_id, device_id, online, battery FROM device_status ORDER BY 1, 2"
        ):
            print(f"   {site:12} {device:26} online={online!s:5} battery={battery}")
        print("== dead letters")
        for topic, reason in conn.execute("SELECT topic, reason FROM dead_letters ORDER BY id"):
            print(f"   {topic}: {reason}")


def run_demo(state_dir: Path, *, seconds: float = 20.0) -> int:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if not _postgres_can_reach(state_dir):
        state_dir = Path("/var/tmp/eldersafe-demo")
        state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o755)
    scenarios = [load_scenario(name) for name in all_scenarios()]
    pg = PostgresInstance(state_dir / "postgres")
    broker = MosquittoInstance(state_dir / "mosquitto")
    server: subprocess.Popen[bytes] | None = None
    try:
        pg.init()
        pg.start()
        migrate(pg.dsn)
        _register(pg.dsn, scenarios)
        accounts = [BrokerAccount("server", hash_password(DEMO_SECRET), None)] + [
            BrokerAccount(sc.gateway, hash_password(DEMO_GATEWAY_PASSWORD), sc.site)
            for sc in scenarios
        ]
        broker.configure(accounts)
        broker.start()
        print(f"demo: mosquitto on 127.0.0.1:{broker.port}, timescaledb on {pg.dsn}")
        env = dict(
            os.environ,
            ELDERSAFE_ENVIRONMENT="demo",
            ELDERSAFE_DATABASE_URL=pg.dsn,
            ELDERSAFE_MQTT_PORT=str(broker.port),
            ELDERSAFE_MQTT_PASSWORD=DEMO_SECRET,
        )
        log_path = state_dir / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "server"], env=env, stdout=log, stderr=log
            )
        _wait(lambda: b"mqtt session up" in log_path.read_bytes(), 30, "the server's MQTT session")
        for sc in scenarios:
            print(f"demo: {sc.title} — {sc.story.strip()}")
        results = asyncio.run(_play_all(scenarios, broker.port, state_dir))
        _faulty_gateway_message(broker.port, scenarios[0])
        expected = sum(len(sc.expect) for sc in scenarios)
        _wait(
            lambda: (
                _count(pg.dsn, "device_events") >= expected and _count(pg.dsn, "dead_letters") >= 1
            ),
            seconds,
            "ingest",
        )
        _report(pg.dsn)
        print(f"\ndemo: logs in {state_dir}")
        return 0 if all(r == 0 for r in results) else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        broker.stop()
        pg.stop()
