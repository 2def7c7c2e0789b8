"""``eldersafe demo``: a small district on one machine with its own broker and database.

Starts a private Mosquitto and PostgreSQL + TimescaleDB under the state
directory (never the system's services), registers a district with two sites
and their gateways, runs ``eldersafe server``, feeds it a stream of sample
messages (telemetry, an SOS repeated by the RF retries, a fall, a smoke alarm,
one corrupt message) and prints what arrived in the database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker_auth import BrokerAccount, gateway_username, hash_password
from gateway.config import DEMO_SECRET
from gateway.contract.payloads import (
    EventPayload,
    EventType,
    Phase,
    ReadingItem,
    StatusPayload,
    TelemetryPayload,
    dump,
    now_utc,
)
from gateway.db.migrate import migrate
from gateway.local.mosquitto import MosquittoInstance
from gateway.local.postgres import PostgresInstance

SITES = {"home-wang": "station-xinhua", "room-201": "inst-anyang"}
DEMO_GATEWAY_PASSWORD = "eldersafe-demo-gateway"

SEED = """
INSERT INTO organisations (id, parent_id, kind, name) VALUES
  ('bureau-pudong', NULL, 'bureau', 'District Civil Affairs Bureau'),
  ('street-huamu', 'bureau-pudong', 'street', 'Huamu Street Centre'),
  ('station-xinhua', 'street-huamu', 'station', 'Xinhua Community Station'),
  ('inst-anyang', 'street-huamu', 'institution', 'Anyang Care Home')
ON CONFLICT DO NOTHING;
INSERT INTO sites (id, organisation_id, kind, name, address) VALUES
  ('home-wang', 'station-xinhua', 'home', 'Wang Home', 'Lane 12, No. 3'),
  ('room-201', 'inst-anyang', 'room', 'Room 201', 'Anyang Care Home, 2F')
ON CONFLICT DO NOTHING;
"""


def _postgres_can_reach(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        ["runuser", "-u", "postgres", "--", "test", "-x", str(path)], check=False
    )
    return probe.returncode == 0


def _demo_messages() -> list[tuple[str, bytes]]:
    t = now_utc()
    out: list[tuple[str, bytes]] = []
    for i in range(30):
        when = t + timedelta(seconds=i)
        out.append(
            (
                "eldersafe/v1/home-wang/wb-wang/telemetry",
                dump(
                    TelemetryPayload(
                        v=1,
                        time=when,
                        readings=[
                            ReadingItem(metric="heart_rate_bpm", value=68 + i % 7, unit="bpm"),
                            ReadingItem(metric="spo2_pct", value=97, unit="%"),
                        ],
                    )
                ),
            )
        )
        out.append(
            (
                "eldersafe/v1/room-201/ef-1/telemetry",
                dump(
                    TelemetryPayload(
                        v=1,
                        time=when,
                        readings=[
                            ReadingItem(
                                metric="residual_current_ma", value=120 + 11 * i, unit="mA"
                            ),
                        ],
                    )
                ),
            )
        )
    sos = EventPayload(
        v=1,
        event_id=uuid.uuid4(),
        type=EventType.SOS,
        phase=Phase.PULSE,
        time=t,
        profile="es-cb1",
        data={"button_id": "0001e240", "seq": 7},
    )
    out += [("eldersafe/v1/home-wang/btn-wang/event", dump(sos))] * 3  # the three RF repeats
    out.append(
        (
            "eldersafe/v1/home-wang/wb-wang/event",
            dump(
                EventPayload(
                    v=1,
                    event_id=uuid.uuid4(),
                    type=EventType.FALL,
                    phase=Phase.PULSE,
                    time=t,
                    profile="es-wb1",
                    data={"confidence": 92},
                )
            ),
        )
    )
    out.append(
        (
            "eldersafe/v1/room-201/sd-1/event",
            dump(
                EventPayload(
                    v=1,
                    event_id=uuid.uuid4(),
                    type=EventType.SMOKE,
                    phase=Phase.RAISE,
                    time=t,
                    profile="es-sd1",
                    data={"obscuration_db_m": 0.21},
                )
            ),
        )
    )
    out.append(
        (
            "eldersafe/v1/home-wang/wb-wang/status",
            dump(StatusPayload(v=1, time=t, online=True, battery=76, rssi=-58)),
        )
    )
    out.append(("eldersafe/v1/home-wang/wb-wang/telemetry", b'{"v":1,"readings":"corrupt"'))
    return out


def _publish(port: int, site: str, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"demo-gw-{site}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(gateway_username(f"gw-{site}"), DEMO_GATEWAY_PASSWORD)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def _report(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        print("\n== telemetry rows by metric")
        for metric, n, lo, hi in conn.execute(
            "SELECT metric, count(*), min(value), max(value) FROM telemetry"
            " GROUP BY metric ORDER BY metric"
        ):
            print(f"   {metric:24} {n:5} rows  min {lo:8.1f}  max {hi:8.1f}")
        print("== device events (one row per event id, however many repeats)")
        for site, device, etype, phase, data in conn.execute(
            "SELECT site_id, device_id, type, phase, data FROM device_events ORDER BY time, type"
        ):
            print(f"   {site:10} {device:10} {etype:10} {phase:6} {data}")
        print("== device status")
        for site, device, online, battery in conn.execute(
            "SELECT site_id, device_id, online, battery FROM device_status ORDER BY 1, 2"
        ):
            print(f"   {site:10} {device:10} online={online} battery={battery}")
        print("== dead letters")
        for topic, reason in conn.execute("SELECT topic, reason FROM dead_letters ORDER BY id"):
            print(f"   {topic}: {reason}")


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


def run_demo(state_dir: Path, *, seconds: float = 20.0) -> int:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if not _postgres_can_reach(state_dir):
        state_dir = Path("/var/tmp/eldersafe-demo")
        state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o755)
    pg = PostgresInstance(state_dir / "postgres")
    broker = MosquittoInstance(state_dir / "mosquitto")
    server: subprocess.Popen[bytes] | None = None
    try:
        pg.init()
        pg.start()
        migrate(pg.dsn)
        with psycopg.connect(pg.dsn) as conn:
            conn.execute(  # each demo run starts from an empty record
                "TRUNCATE telemetry, device_events, event_ledger, device_status, dead_letters"
            )
            conn.execute(SEED.encode())
            for site in SITES:
                conn.execute(
                    "INSERT INTO gateways (id, site_id, password_hash) VALUES (%s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    (f"gw-{site}", site, hash_password(DEMO_GATEWAY_PASSWORD)),
                )
        accounts = [BrokerAccount("server", hash_password(DEMO_SECRET), None)] + [
            BrokerAccount(
                gateway_username(f"gw-{site}"), hash_password(DEMO_GATEWAY_PASSWORD), site
            )
            for site in SITES
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
        log_path.write_bytes(b"")
        with log_path.open("ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "server"], env=env, stdout=log, stderr=log
            )
        _wait(lambda: b"mqtt session up" in log_path.read_bytes(), 30, "the server's MQTT session")
        messages = _demo_messages()
        for site in SITES:
            _publish(broker.port, site, [m for m in messages if f"/{site}/" in m[0]])
        print(
            f"demo: published {len(messages)} sample messages; waiting {seconds:.0f} s for ingest"
        )
        expected_events = 3  # the SOS (sent three times), the fall, the smoke alarm
        _wait(
            lambda: (
                _count(pg.dsn, "device_events") >= expected_events
                and _count(pg.dsn, "dead_letters") >= 1
            ),
            seconds,
            "ingest",
        )
        _report(pg.dsn)
        print(f"\ndemo: server log in {log_path}")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        broker.stop()
        pg.stop()
