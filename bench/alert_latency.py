"""Device to live change log: a button press on the serial pty, a smoke bit on the Modbus bus.

Every part is real and in a process of its own except the simulated devices: the
call-button receiver on a pty and an es-sd1 detector on a Modbus RTU server (this
process) → ``eldersafe edge`` → Mosquitto → ``eldersafe server`` (ingest, engine) →
TimescaleDB, with 5,000 telemetry msg/s (QoS 1, 2,000 devices) published in the
background by a paced loader process.

* **press**: from the bench writing the first byte of the button's frame to the
  pty, to the commit of the first ``alert_changes`` row of its alert (each press
  is another button, so each is a new alert).
* **smoke**: the detector is polled every 1 s (its profile), so the poll phase is
  not the gateway's latency: it is measured from the edge's own reading of the
  poll's answer (the event's ``time``, stamped by the edge when the poll returned;
  same host clock) to the commit of the alert's first change; the figure from the
  bit being set is printed too. Each smoke alert is cleared and resolved before
  the next (smoke is one incident per site).
* **when the change arrived**: ``pg_xact_commit_timestamp`` of the change row
  (``track_commit_timestamp = on`` in the private cluster): nothing is added to the
  engine's path, and the rows are read after the run. PostgreSQL stamps the commit
  just before the commit's WAL flush, so the flush (≈ 1-3 ms here) is not counted;
  a LISTEN-based reader would add it plus a notification round trip.
* **baseline**: bare MQTT publish → receive on the same broker, same run, same
  load: a paho publisher (QoS 1) and a paho subscriber in a process of their own,
  10 probes/s, each stamped with ``time.time()`` at publish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from common import LOADER, PAHO, SERVER, SITE, services  # noqa: E402
from escalation import ServerProcess, enable_commit_timestamps, quantiles  # noqa: E402

from gateway.alerts.district import District, import_district  # noqa: E402
from gateway.broker_auth import BrokerAccount, hash_password  # noqa: E402
from gateway.db.migrate import migrate  # noqa: E402

BUTTON_BASE = 0x00C00000
SD1_UNIT = 1
PROBE_TOPIC = f"eldersafe/v1/{SITE}/probe/telemetry"
# The broker names each session after its account (use_username_as_clientid): the
# background loader and the probe publisher need accounts of their own, or they would
# take the edge's session over.
BACKGROUND = ("gw-bench-bg", "bench-bg-secret")
PROBE = ("gw-bench-probe", "bench-probe-secret")
TARGET_MS, LIMIT_MS = 20.0, 50.0
ME = str(Path(__file__).resolve())
LEGS = (
    "press: frame written -> edge's stamp",
    "press: edge's stamp -> ingest commit",
    "press: ingest commit -> change log",
    "smoke: edge's stamp -> ingest commit",
    "smoke: ingest commit -> change log",
)


# -- child processes: background telemetry, the MQTT probe ---------------------------------


async def background(port: int, rate: int) -> None:
    """QoS 1 telemetry at ``rate`` msg/s, paced in 10 ms slices, until killed."""
    from gateway.mqtt.codec import PubAck, encode_connect, encode_publish, read_packets

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        encode_connect("bench-bg", username=BACKGROUND[0], password=BACKGROUND[1], clean_start=True)
    )

    acked = 0

    async def count_acks() -> None:
        """PUBACKs free packet ids: never more than 30,000 in flight (ids wrap at 65,535)."""
        nonlocal acked
        buf = bytearray()
        while data := await reader.read(1 << 16):
            buf.extend(data)
            packets, used = read_packets(buf)
            del buf[:used]
            acked += sum(isinstance(p, PubAck) for p in packets)

    acks = asyncio.create_task(count_acks())
    n = 0
    started = time.monotonic()
    while not acks.done():
        due = min(int((time.monotonic() - started) * rate), acked + 30_000)
        chunk = []
        while n < due:
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            payload = (
                f'{{"v":1,"time":"{at}","readings":[{{"metric":"heart_rate",'
                f'"value":{60 + n % 40},"unit":"bpm","time":"{at}"}}]}}'
            )
            topic = f"eldersafe/v1/{SITE}/dev-{n % 2000}/telemetry"
            chunk.append(encode_publish(topic, payload.encode(), qos=1, packet_id=n % 65535 + 1))
            n += 1
        if chunk:
            writer.write(b"".join(chunk))
            await writer.drain()
        await asyncio.sleep(0.01)


def probe(port: int, seconds: float) -> None:
    """Bare paho publish → receive latencies (ms) as one JSON line on stdout."""
    import threading

    import paho.mqtt.client as mqtt

    got: dict[int, float] = {}
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got[int(json.loads(msg.payload)["readings"][0]["value"])] = time.time()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-probe-sub")
    sub.username_pw_set(*PAHO)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe(PROBE_TOPIC, qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-probe-pub")
    pub.username_pw_set(*PROBE)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    subscribed.wait(10)
    print(json.dumps({"ready": True}), flush=True)  # the presses wait for this line
    sent: dict[int, float] = {}
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        payload = (
            f'{{"v":1,"time":"{at}","readings":[{{"metric":"probe","value":{i},'
            f'"unit":"1","time":"{at}"}}]}}'
        )
        sent[i] = time.time()
        pub.publish(PROBE_TOPIC, payload, qos=1)
        i += 1
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while len(got) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.loop_stop()
    sub.loop_stop()
    lags = [(got[k] - t) * 1000 for k, t in sent.items() if k in got]
    print(json.dumps({"sent": len(sent), "lags": lags}), flush=True)


# -- the run ---------------------------------------------------------------------------------


def district() -> District:
    now = datetime.now(UTC)
    return District.model_validate(
        {
            "organisations": [
                {"id": "bureau", "kind": "bureau", "name": "区民政局"},
                {"id": "station-1", "parent": "bureau", "kind": "station", "name": "社区站"},
            ],
            "sites": [{"id": SITE, "organisation": "station-1", "name": "家"}],
            "staff": [{"id": "duty-1", "organisation": "station-1", "name": "李", "role": "duty"}],
            "shifts": [
                {
                    "staff": "duty-1",
                    "starts_at": now.replace(hour=0).isoformat(),
                    "ends_at": now.replace(hour=23).isoformat(),
                }
            ],
        }
    )


def scalar(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


async def wait_db(dsn: str, sql: str, params: tuple[Any, ...], within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(scalar, dsn, sql, params)
        if value:
            return value
        await asyncio.sleep(0.05)
    raise RuntimeError(f"timed out waiting for: {sql} {params}")


async def resolve(dsn: str, alert_id: uuid.UUID) -> None:
    from alerting.lifecycle import resolve as resolve_command
    from alerting.model import Channel
    from alerting.model import Outcome as AlertOutcome
    from gateway.alerts.unit_of_work import command

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await command(
            conn,
            alert_id,
            lambda _a: resolve_command("bench", Channel.CONSOLE, AlertOutcome.FALSE_ALARM),
            datetime.now(UTC),
        )


def edge_config(work: Path, port: int, pty: str, modbus: str, buttons: list[int]) -> Path:
    config = {
        "site": SITE,
        "gateway": "edge-bench",
        "state_dir": str(work / "edge-state"),
        "broker": {"host": "127.0.0.1", "port": port, "username": LOADER[0], "password": LOADER[1]},
        "drivers": [
            {
                "name": "receiver",
                "kind": "callbutton",
                "port": pty,
                "devices": [{"id": "receiver", "address": "receiver"}]
                + [{"id": f"btn-{b:08x}", "address": f"{b:08X}"} for b in buttons],
            },
            {
                "name": "rs485",
                "kind": "modbus",
                "port": modbus,
                "devices": [{"id": "smoke-1", "address": f"unit-{SD1_UNIT}", "profile": "es-sd1"}],
            },
        ],
    }
    path = work / "edge.yaml"
    path.write_text(json.dumps(config))
    return path


def drivers_running(health: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        states = json.loads(health.read_text()).get("drivers", {})
        return len(states) == 2 and all(s["state"] == "running" for s in states.values())
    return False


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(cmd, cwd=REPO, **kw)


async def wait_edge(health: Path, edge: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if edge.poll() is not None:
            raise RuntimeError(f"edge exited with {edge.returncode}")
        if await asyncio.to_thread(drivers_running, health):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("edge drivers not running")


async def run(args: argparse.Namespace, port: int, dsn: str, work: Path) -> dict[str, Any]:
    from simulators.callbutton_receiver import CallButtonReceiverSimulator
    from simulators.modbus_sensors import ModbusSensorBus

    rx = CallButtonReceiverSimulator(status_interval_s=30.0, seed=1)
    pty = await rx.start()
    buttons = [BUTTON_BASE + i for i in range(args.presses)]
    for b in buttons:
        rx.add_button(b)
    bus = ModbusSensorBus({SD1_UNIT: "es-sd1"})
    url = await bus.start()
    me = [sys.executable, ME]
    edge = spawn(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "edge",
            "--config",
            str(edge_config(work, port, pty, url, buttons)),
        ],
        stdout=await asyncio.to_thread((work / "edge.log").open, "wb"),
        stderr=subprocess.STDOUT,
    )
    bg = spawn([*me, "--background", str(port), str(args.rate)])
    probe_proc: subprocess.Popen[str] | None = None
    try:
        await wait_edge(work / "edge-state" / "health.json", edge)
        # the background load reaches the database before anything is measured
        await wait_db(dsn, "SELECT count(*) > 20000 FROM telemetry", (), 60)
        probe_proc = spawn(
            [*me, "--probe", str(port), str(args.probe_seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        # The probe's own start-up (an interpreter, paho, two connections) takes a good
        # part of a core: the presses begin once it is publishing, not beside it.
        assert probe_proc.stdout is not None
        ready = await asyncio.to_thread(probe_proc.stdout.readline)
        assert json.loads(ready) == {"ready": True}, ready
        rows_before = await asyncio.to_thread(scalar, dsn, "SELECT count(*) FROM telemetry")
        t_load = time.monotonic()
        presses: list[tuple[str, float]] = []
        for b in buttons:
            await asyncio.sleep(0.25)
            t0 = time.time()
            await rx.press(b)
            presses.append((f"btn-{b:08x}", t0))
        smokes: list[tuple[uuid.UUID, float]] = []
        for k in range(args.smokes):
            t0 = time.time()
            bus.set_smoke(SD1_UNIT, 0.3)
            alert = await wait_db(
                dsn, "SELECT id FROM alerts WHERE type = 'smoke' AND status <> 'resolved'", ()
            )
            smokes.append((alert, t0))
            bus.set_smoke(SD1_UNIT, 0.02)
            await wait_db(
                dsn,
                "SELECT count(*) > %s FROM device_events WHERE device_id = 'smoke-1'"
                " AND phase = 'clear'",
                (k,),
            )
            await resolve(dsn, alert)
        rows_after = await asyncio.to_thread(scalar, dsn, "SELECT count(*) FROM telemetry")
        load_rate = (rows_after - rows_before) / (time.monotonic() - t_load)
        assert probe_proc.stdout is not None
        probe_out = json.loads(await asyncio.to_thread(probe_proc.stdout.readline))
        await wait_db(dsn, "SELECT count(*) >= %s FROM alerts WHERE type = 'sos'", (len(presses),))
    finally:
        for p in (bg, probe_proc, edge):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        await rx.stop()
        await bus.stop()
    return {"presses": presses, "smokes": smokes, "probe": probe_out, "load_rate": load_rate}


# The alert's first change, and along the way: the edge's stamp of the event (when it
# read the frame or the poll's answer) and the commit of ingest's transaction.
FIRST_CHANGE = """
SELECT extract(epoch FROM pg_xact_commit_timestamp(c.xmin)),
       extract(epoch FROM e.time), extract(epoch FROM pg_xact_commit_timestamp(e.xmin))
FROM alert_changes c JOIN alerts a ON a.id = c.alert_id
JOIN device_events e ON e.event_id = a.first_event_id
WHERE {where} ORDER BY c.position LIMIT 1
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--smokes", type=int, default=30)
    parser.add_argument("--rate", type=int, default=5000, help="background telemetry msg/s")
    parser.add_argument("--probe-seconds", type=float, default=100.0)
    parser.add_argument("--dump", help="write each press's stamps (epoch s) as JSON here")
    parser.add_argument("--background", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.background:
        asyncio.run(background(*args.background))
        return 0
    if args.probe:
        probe(int(args.probe[0]), args.probe[1])
        return 0

    with services() as (broker, pg), tempfile.TemporaryDirectory() as tmp:
        assert pg is not None
        work = Path(tmp)
        broker.configure(
            [BrokerAccount(SERVER[0], hash_password(SERVER[1]), None),
             BrokerAccount(PAHO[0], hash_password(PAHO[1]), None)]
            + [BrokerAccount(u, hash_password(p), SITE) for u, p in (LOADER, BACKGROUND, PROBE)]
        )  # fmt: skip
        broker.reload()
        enable_commit_timestamps(pg)
        migrate(pg.dsn)
        import_district(pg.dsn, district())
        server = ServerProcess(broker.port, pg.dsn, work / "server.log")
        try:
            out = asyncio.run(run(args, broker.port, pg.dsn, work))
        except BaseException:
            for log in ("server.log", "edge.log"):
                with contextlib.suppress(OSError):
                    print(f"--- {log}:\n{(work / log).read_text(errors='replace')[-3000:]}")
            raise
        finally:
            server.stop()
        press_ms, smoke_ms, smoke_from_set_ms = [], [], []
        legs: dict[str, list[float]] = {k: [] for k in LEGS}
        dump: list[dict[str, float]] = []
        with psycopg.connect(pg.dsn) as conn:
            for device, t0 in out["presses"]:
                r = conn.execute(FIRST_CHANGE.format(where="a.device_id = %s"), (device,))
                found = r.fetchone()
                if found is not None:
                    change, stamped, ingested = map(float, found)
                    press_ms.append((change - t0) * 1000)
                    dump.append({"t0": t0, "stamped": stamped, "ingested": ingested,
                                 "change": change})  # fmt: skip
                    legs["press: frame written -> edge's stamp"].append((stamped - t0) * 1000)
                    legs["press: edge's stamp -> ingest commit"].append((ingested - stamped) * 1000)
                    legs["press: ingest commit -> change log"].append((change - ingested) * 1000)
            for alert, t0 in out["smokes"]:
                found = conn.execute(FIRST_CHANGE.format(where="a.id = %s"), (alert,)).fetchone()
                assert found is not None
                change, stamped, ingested = map(float, found)
                smoke_ms.append((change - stamped) * 1000)
                smoke_from_set_ms.append((change - t0) * 1000)
                legs["smoke: edge's stamp -> ingest commit"].append((ingested - stamped) * 1000)
                legs["smoke: ingest commit -> change log"].append((change - ingested) * 1000)
        if args.dump:
            Path(args.dump).write_text(json.dumps({"presses": dump, "probe": out["probe"]}))
        alerts_sos = scalar(pg.dsn, "SELECT count(*) FROM alerts WHERE type = 'sos'")
        dead = scalar(pg.dsn, "SELECT count(*) FROM engine_dead_letters")
    probe_ms = out["probe"]["lags"]
    print(
        f"background load: {out['load_rate']:.0f} telemetry rows/s stored during the run"
        f" (target {args.rate} msg/s); sos alerts {alerts_sos}; engine dead letters {dead}"
    )
    print(f"{'latency, ms':<46}{'n':>5}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")

    def line(name: str, values: list[float]) -> dict[str, float]:
        q = quantiles(values)
        print(
            f"{name:<46}{int(q['n']):>5}{q['p50']:>8.1f}{q['p90']:>8.1f}{q['p99']:>8.1f}"
            f"{q['max']:>8.1f}"
        )
        return q

    base = line("baseline: bare MQTT publish -> receive (QoS 1)", probe_ms)
    press = line("press: pty frame -> change log", press_ms)
    smoke = line("smoke: poll answered -> change log", smoke_ms)
    line("smoke: bit set -> change log (incl. 1 s poll)", smoke_from_set_ms)
    if press_ms:
        print(f"{'press: the first after the server started':<46}{1:>5}{press_ms[0]:>8.1f}")
    print("where the time goes:")
    for name, values in legs.items():
        if values:
            line(f"  {name}", values)
    ok = (
        len(press_ms) == len(out["presses"])
        and len(probe_ms) == out["probe"]["sent"]
        and len(smoke_ms) == args.smokes
        and dead == 0
        and alerts_sos == len(out["presses"])
    )
    for name, q in (("press", press), ("smoke", smoke)):
        verdict = (
            "met"
            if q["p99"] <= TARGET_MS
            else (
                "MISSED (within the 50 ms limit)" if q["p99"] <= LIMIT_MS else "MISSED (over 50 ms)"
            )
        )
        print(
            f"{name}: p99 {q['p99']:.1f} ms, {q['p99'] - base['p99']:+.1f} ms vs bare MQTT p99;"
            f" target {TARGET_MS:.0f} ms {verdict}"
        )
    print(f"checks {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
