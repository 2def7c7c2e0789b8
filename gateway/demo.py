"""``eldersafe demo`` (``make demo``): a simulated district on one machine, with scripted staff.

Starts a private Mosquitto and PostgreSQL + TimescaleDB under the state directory
(never the system's services), imports the demo district (``gateway.demo_district``:
a bureau, two streets, four stations, a care home, 60 homes, staff on shifts), runs
``eldersafe server`` with the staff API and console, and then, until Ctrl-C (or
``--seconds``):

- every scenario of ``simulators/scenarios`` on a loop, each with its simulated
  devices at their real transports and a real ``eldersafe edge`` process;
- the other 57 homes and the care home's rooms driven lighter: now and then one of
  them sends an SOS or a fall as its gateway would (the contract's event over MQTT
  with its own account).
  Sixty edge processes (and their BLE and Modbus simulators) would not fit two cores
  beside the server and database; the four scenario edges already prove the device
  path, and the district still sees alerts from every station;
- scripted staff (``gateway.demo_staff``) answering over the HTTP API;
- one live line: alerts raised / acknowledged / escalated / resolved.

Ctrl-C (SIGINT) or SIGTERM stops everything: staff, edges, server, broker, database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

from gateway.alerts.district import District, import_district
from gateway.api.security import hash_password as hash_staff_password
from gateway.broker_auth import BrokerAccount, hash_password
from gateway.config import DEMO_SECRET
from gateway.contract.payloads import EventPayload, EventType, Phase, dump
from gateway.db.migrate import migrate
from gateway.demo_district import (
    DEMO_PASSWORD,
    LADDER_S,
    care_home_room_ids,
    demo_district,
    demo_logins,
    generated_home_ids,
    on_shift,
    supervisors,
)
from gateway.demo_staff import ScriptedStaff
from gateway.local.mosquitto import MosquittoInstance
from gateway.local.ports import free_port
from gateway.local.postgres import PostgresInstance
from gateway.mqtt.client import MqttClient, MqttSettings
from gateway.simulate import BrokerLogin, simulation
from simulators.scenario import Scenario, SimulatedSite, all_scenarios, load_scenario

log = logging.getLogger(__name__)

DEMO_GATEWAY_PASSWORD = "eldersafe-demo-gateway"
ROUND_PAUSE_S = (25.0, 45.0)  # quiet time between two rounds of one scenario
HOME_EVENT_EVERY_S = (6.0, 14.0)  # one event from one of the other homes, this often
STATUS_EVERY_S = 1.0

_COUNTS = """
SELECT count(*), count(acknowledged_at), count(*) FILTER (WHERE level >= 1),
       count(*) FILTER (WHERE status = 'resolved'), count(*) FILTER (WHERE status = 'open')
FROM alerts
"""


def _postgres_can_reach(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        ["runuser", "-u", "postgres", "--", "test", "-x", str(path)], check=False
    )
    return probe.returncode == 0


def _say(text: str) -> None:
    clear = "\r\033[K" if sys.stdout.isatty() else ""  # over the live line, not after it
    print(f"{clear}demo: {text}", flush=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        time.sleep(0.2)


def _fresh_database(pg: PostgresInstance) -> None:
    """Each run starts from an empty record: the demo's database is dropped and made anew."""
    admin = pg.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{pg.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{pg.database}"')


def _gateways(district: District, scenarios: list[Scenario]) -> dict[str, str]:
    """Site → its gateway's account (the scenarios name theirs)."""
    named = {sc.site: sc.gateway for sc in scenarios}
    return {s.id: named.get(s.id, f"gw-{s.id}") for s in district.sites}


def _seed(dsn: str, district: District, gateways: dict[str, str]) -> None:
    import_district(dsn, district)
    hashed = hash_staff_password(DEMO_PASSWORD)  # one argon2 hash: every demo person's
    gateway_hash = hash_password(DEMO_GATEWAY_PASSWORD)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE staff SET password_hash = %s", (hashed,))
        for site, gateway in gateways.items():
            conn.execute(
                "INSERT INTO gateways (id, site_id, password_hash) VALUES (%s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING",
                (gateway, site, gateway_hash),
            )


@dataclass
class Tally:
    """The live line's numbers (from the database: what the console shows too)."""

    raised: int = 0
    acknowledged: int = 0
    escalated: int = 0
    resolved: int = 0
    open: int = 0
    home_events: int = 0
    home_event_failures: int = 0
    edge_restarts: int = 0
    rounds: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (f"alerts raised {self.raised} · acknowledged {self.acknowledged} · "
                f"escalated {self.escalated} · resolved {self.resolved} · open {self.open}"
                f" | scenario rounds {sum(self.rounds.values())} · home events"
                f" {self.home_events}")  # fmt: skip


async def _quiet(site: SimulatedSite) -> None:
    """Bring the site's level conditions back to normal, so the next round raises them
    again (an edge reports a condition when it changes, not while it lasts)."""
    for d in site.scenario.devices:
        if d.unit is not None and site.bus is not None:
            if d.kind == "smoke_detector":
                site.bus.set_smoke(d.unit, 0.0, alarm=False)
            else:
                site.bus.set_residual_current(d.unit, 100)
                for channel in (1, 2, 3):
                    site.bus.set_cable_temperature(d.unit, channel, 35.0)
        elif d.kind == "wristband":
            await site.wristbands[d.id].set_heart_rate(72)


async def _scenario_loop(sc: Scenario, port: int, state_dir: Path, tally: Tally,
                         start_after_s: float) -> None:  # fmt: skip
    """Rounds of one scenario with its simulators and edge; an edge that does not come up
    or exits is said so on screen and started again (the rest of the demo goes on)."""
    await asyncio.sleep(start_after_s)  # staggered: four edges starting at once crowd 2 cores
    login = BrokerLogin("127.0.0.1", port, sc.gateway, DEMO_GATEWAY_PASSWORD)
    work = state_dir / "sim" / sc.name
    rounds = random.Random(sc.name)
    while True:
        try:
            async with simulation(sc, login, work,
                                  log_path=state_dir / f"edge-{sc.site}.log") as sim:  # fmt: skip
                await sim.wait_ready(90)
                _say(f"edge for {sc.site} ready — {sc.title}")
                while sim.edge.returncode is None:
                    await sim.play()
                    tally.rounds[sc.name] = tally.rounds.get(sc.name, 0) + 1
                    await asyncio.sleep(sc.duration_s - max((s.at for s in sc.steps), default=0))
                    await _quiet(sim.site)
                    await asyncio.sleep(rounds.uniform(*ROUND_PAUSE_S))
                raise RuntimeError(f"the edge exited with {sim.edge.returncode}")
        except (TimeoutError, RuntimeError, OSError) as exc:
            tally.edge_restarts += 1
            _say(f"edge for {sc.site}: {exc}; starting it again (its log: edge-{sc.site}.log)")
            await asyncio.sleep(5.0)


_HOME_EVENTS = (  # (device prefix, profile, event type): presses outnumber falls
    ("btn", "es-cb1", EventType.SOS),
    ("btn", "es-cb1", EventType.SOS),
    ("wb", "es-wb1", EventType.FALL),
    ("wb", "es-wb1", EventType.SOS),
)


async def _home_events(port: int, gateways: dict[str, str], tally: Tally) -> None:
    """Now and then one of the homes without a scenario raises an alert, as its gateway
    would: a contract event (QoS 1) under its own account, which the ACL keeps to its site."""
    pick = random.Random(2026)
    homes = generated_home_ids() + care_home_room_ids()
    numbers = {site: f"{i:03d}" for i, site in enumerate(generated_home_ids(), start=1)}
    numbers.update({site: f"{100 + k:03d}" for k, site in enumerate(care_home_room_ids(), 1)})
    while True:
        await asyncio.sleep(pick.uniform(*HOME_EVENT_EVERY_S))
        site = pick.choice(homes)
        prefix, profile, kind = pick.choice(_HOME_EVENTS)
        device = f"{prefix}-{numbers[site]}"
        event = EventPayload(v=1, event_id=uuid.uuid4(), type=kind,
                             phase=Phase.PULSE, time=datetime.now(UTC), profile=profile,
                             data={"confidence": 90} if kind is EventType.FALL else {})  # fmt: skip
        gateway = gateways[site]
        settings = MqttSettings("127.0.0.1", port, client_id=gateway, username=gateway,
                                password=DEMO_GATEWAY_PASSWORD, session_expiry_s=0)  # fmt: skip
        try:
            async with MqttClient(settings) as client:
                await asyncio.wait_for(client.publish_and_wait(
                    f"eldersafe/v1/{site}/{device}/event", dump(event), qos=1), 30)  # fmt: skip
        except (TimeoutError, ConnectionError) as exc:  # a busy broker: the next one may pass
            tally.home_event_failures += 1
            log.warning("home event from %s not delivered: %r", site, exc)
            continue
        tally.home_events += 1


async def _status(dsn: str, tally: Tally) -> None:
    tty = sys.stdout.isatty()
    last_print = 0.0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(_COUNTS)).fetchone()
            assert row is not None
            tally.raised, tally.acknowledged, tally.escalated, tally.resolved, tally.open = row
            if tty:  # one line, cut to the terminal's width so that \r can rewrite it
                width = shutil.get_terminal_size().columns - 1
                print(f"\r\033[K{tally.line()[:width]}", end="", flush=True)
            elif time.monotonic() - last_print >= 10:  # a log file gets a line now and then
                last_print = time.monotonic()
                print(tally.line(), flush=True)
            await asyncio.sleep(STATUS_EVERY_S)


async def _live(dsn: str, broker_port: int, api_url: str, state_dir: Path,
                district: District, scenarios: list[Scenario], gateways: dict[str, str],
                seconds: float | None) -> Tally:  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tally = Tally()
    staff = ScriptedStaff(api_url, DEMO_PASSWORD, lambda at: on_shift(district, at),
                          supervisors(district))  # fmt: skip
    tasks = [asyncio.create_task(_scenario_loop(sc, broker_port, state_dir, tally, 2.0 * i),
                                 name=f"scenario {sc.name}")
             for i, sc in enumerate(scenarios)]  # fmt: skip
    tasks += [
        asyncio.create_task(_home_events(broker_port, gateways, tally), name="home events"),
        asyncio.create_task(staff.run(), name="scripted staff"),
        asyncio.create_task(_status(dsn, tally), name="status"),
    ]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *tasks], timeout=seconds,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        for task in done:
            if task is not stopped:
                task.result()  # a part that failed stops the demo with its error
    finally:
        print(flush=True)
        _say("stopping (staff, edges, server, broker, database)…")
        for task in [stopped, *tasks]:
            task.cancel()
        await asyncio.gather(stopped, *tasks, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return tally


def _stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_demo(state_dir: Path, *, seconds: float | None = None, api_port: int | None = None) -> int:
    """Until SIGINT/SIGTERM, or ``seconds`` after the district is up."""
    started = time.monotonic()
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if not _postgres_can_reach(state_dir):
        state_dir = Path("/var/tmp/eldersafe-demo")
        state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o755)
    _log_to(state_dir / "demo.log")
    scenarios = [load_scenario(name) for name in all_scenarios()]
    district = demo_district(scenarios)
    gateways = _gateways(district, scenarios)
    wanted = api_port or int(os.environ.get("ELDERSAFE_API_PORT", "8000"))
    port = wanted if _port_free(wanted) else free_port()
    pg = PostgresInstance(state_dir / "postgres")
    broker = MosquittoInstance(state_dir / "mosquitto")
    server: subprocess.Popen[bytes] | None = None
    try:
        _say(f"starting TimescaleDB under {state_dir / 'postgres'}…")
        pg.init()
        pg.start()
        _fresh_database(pg)
        migrate(pg.dsn)
        _seed(pg.dsn, district, gateways)
        _say(f"district imported: {len(district.organisations)} units, {len(district.sites)}"
             f" sites, {len(district.residents)} residents, {len(district.devices)} devices,"
             f" {len(district.staff)} staff")  # fmt: skip
        accounts = [BrokerAccount(g, hash_password(DEMO_GATEWAY_PASSWORD), s)
                    for s, g in gateways.items()]  # fmt: skip
        broker.configure([BrokerAccount("server", hash_password(DEMO_SECRET), None), *accounts])
        broker.start()
        _say(f"mosquitto on 127.0.0.1:{broker.port}")
        env = dict(os.environ, ELDERSAFE_ENVIRONMENT="demo", ELDERSAFE_DATABASE_URL=pg.dsn,
                   ELDERSAFE_MQTT_PORT=str(broker.port), ELDERSAFE_MQTT_PASSWORD=DEMO_SECRET,
                   ELDERSAFE_API_HOST="127.0.0.1", ELDERSAFE_API_PORT=str(port))  # fmt: skip
        log_path = state_dir / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "server"], env=env,
                                      stdout=log, stderr=log)  # fmt: skip
        api_url = f"http://127.0.0.1:{port}"
        _wait(lambda: b"mqtt session up" in log_path.read_bytes(), 60, "the server's MQTT session")
        _wait(lambda: _answers(api_url), 60, f"the staff API on {api_url}")
        if port != wanted:
            _say(f"port {wanted} is taken: the API listens on {port} instead")
        _banner(api_url, district, time.monotonic() - started)
        tally = asyncio.run(_live(pg.dsn, broker.port, api_url, state_dir, district, scenarios,
                                  gateways, seconds))  # fmt: skip
        _say(f"{tally.line()}")
        _say(f"logs in {state_dir}")
        return 0
    except KeyboardInterrupt:  # Ctrl-C while starting up
        print(flush=True)
        _say("interrupted while starting; stopping what started")
        return 130
    finally:
        # a second Ctrl-C must not cut the clean-up short and leave a process behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_process(server)
        broker.stop()
        pg.stop()
        _say("stopped")


def _log_to(path: Path) -> None:
    """This process's log (simulators, edges' supervision, scripted staff) goes to a file:
    the terminal keeps the start-up steps and the one live line."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _answers(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/api/auth/me", timeout=2).status_code == 401
    except httpx.HTTPError:
        return False


def _banner(api_url: str, district: District, took_s: float) -> None:
    ladder = " / ".join(f"{s} s" for s in LADDER_S)
    rows = [f"    {d.username:22} {d.role:10} {d.name} ({d.unit})"
            for d in demo_logins(district, datetime.now(UTC))]  # fmt: skip
    print("\n".join([
        "",
        f"demo: ready in {took_s:.0f} s",
        f"  console:  {api_url}/console/",
        f"  API docs: {api_url}/docs",
        f"  logins (password {DEMO_PASSWORD!r}):",
        *rows,
        f"  escalation runs on DEMO timing: rungs at {ladder} (duty → supervisor and family"
        " → street → bureau); a real district's defaults are minutes (0 / 1 / 3 / 5 min)",
        "  scripted staff acknowledge most alerts within seconds and miss about one in four",
        "  Ctrl-C stops everything",
        "",
    ]), flush=True)  # fmt: skip
