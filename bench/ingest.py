"""Ingest drain rate of the real ``eldersafe server`` against the fastest bare paho subscriber.

Both consumers are processes of their own, with persistent sessions on the same
private Mosquitto, draining the same backlog:

  * baseline: a bare paho subscriber on MQTT 3.1.1 (paho drains ≈ 30 % faster
    on 3.1.1 than on MQTT 5 here), QoS 1, ``loop_forever`` in its main thread,
    counting only;
  * eldersafe: ``python -m gateway.cli server``, the process a deployment runs:
    every message validated against the contract, written to TimescaleDB and
    acknowledged only after its transaction committed.

Each consumer connects and subscribes, is frozen (SIGSTOP), the backlog is
loaded, and the clock starts when it is thawed (SIGCONT); it stops when the
consumer has everything (paho: it reports its last message; the server: its
``eldersafe_ingest_messages_total``, which counts committed and acknowledged
messages, polled every 20 ms). Every server run lies between two paho runs and
is compared with their mean. Every row is then counted in the database.

Workloads: 200,000 messages of ≈ 160 B, one reading each (a unit and a
per-reading time), and 20,000 messages of 50 readings each (rows/s).
Run: ``make bench`` or ``python bench/ingest.py [--runs 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAHO, SERVER, SITE, load, services

from gateway.db.migrate import migrate
from gateway.local.ports import free_port

DEVICES = 2000
FILTER = f"eldersafe/v1/{SITE}/+/telemetry"
METRICS = ("heart_rate", "spo2", "skin_temp", "steps", "battery_mv")
UNITS = ("bpm", "%", "C", "1", "mV")


def make_messages(count: int, readings: int) -> list[tuple[str, bytes]]:
    """Telemetry as an edge sends it: message time, and per reading a unit and its own time."""
    t0 = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    out = []
    for i in range(count):
        device = i % DEVICES
        when = t0 + timedelta(seconds=i // DEVICES)
        items = []
        for r in range(readings):
            at = (when + timedelta(milliseconds=r * 10)).isoformat(timespec="milliseconds")
            items.append(
                f'{{"metric":"{METRICS[r % 5]}_{r // 5}","value":{(i * 7 + r) % 1000 / 10},'
                f'"unit":"{UNITS[r % 5]}","time":"{at}"}}'
            )
        payload = (
            f'{{"v":1,"time":"{when.isoformat(timespec="milliseconds")}",'
            f'"readings":[{",".join(items)}]}}'
        )
        out.append((f"eldersafe/v1/{SITE}/dev-{device}/telemetry", payload.encode()))
    return out


# -- the baseline: a bare paho subscriber in a process of its own --------------------------


def paho_subscriber(port: int, total: int) -> None:
    """Count ``total`` messages on a persistent MQTT 3.1.1 session; print when done."""
    import paho.mqtt.client as mqtt

    count = 0
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=PAHO[0],
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )
    client.username_pw_set(*PAHO)

    def on_connect(c: mqtt.Client, u: object, flags: object, reason: object, p: object) -> None:
        c.subscribe(FILTER, qos=1)

    def on_subscribe(c: mqtt.Client, u: object, mid: int, codes: object, p: object) -> None:
        print("ready", flush=True)
        if total == 0:
            c.disconnect()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count == total:
            print(f"done {time.time():.6f}", flush=True)
            c.disconnect()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_forever()


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"paho subscriber: no {prefix!r} line")


def paho_drain(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Seconds for the bare paho subscriber to drain the backlog."""
    cmd = [sys.executable, __file__, "--paho-subscriber", str(port), str(len(messages))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        _wait_line(proc, "ready", 20)
        proc.send_signal(signal.SIGSTOP)
        asyncio.run(load(port, messages))
        started = time.time()
        proc.send_signal(signal.SIGCONT)
        done = float(_wait_line(proc, "done", 600).split()[1])
        proc.wait(30)
        return done - started
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        wipe_session(port, PAHO)


def wipe_session(port: int, account: tuple[str, str]) -> None:
    """End an account's persistent session, so that it queues nothing while another runs."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=account[0], protocol=mqtt.MQTTv311,
        clean_session=True,
    )  # fmt: skip
    client.username_pw_set(*account)
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not wipe the session of {account[0]}")
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()


# -- eldersafe: the real server process ----------------------------------------------------


CPU_SHARES: list[tuple[float, float, float]] = []  # cores busy (server, postgres, broker)
BROKER_PID = 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that are alive (PostgreSQL's backends)."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def postmaster(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone()
        assert row is not None
        return psutil.Process(int(row[1])).ppid()


class Server:
    """``eldersafe server`` as a deployment runs it, with its metrics endpoint for the bench."""

    def __init__(self, port: int, dsn: str, log_dir: Path) -> None:
        self.metrics_port = free_port()
        self.dsn = dsn
        self.log = log_dir / f"server-{len(list(log_dir.iterdir()))}.log"
        env = dict(os.environ)
        env.update(
            {
                "ELDERSAFE_ENVIRONMENT": "test",
                "ELDERSAFE_DATABASE_URL": dsn,
                "ELDERSAFE_MQTT_PORT": str(port),
                "ELDERSAFE_MQTT_USERNAME": SERVER[0],
                "ELDERSAFE_MQTT_PASSWORD": SERVER[1],
                "ELDERSAFE_MQTT_KEEPALIVE_S": "120",  # frozen while the backlog loads
                "ELDERSAFE_METRICS_PORT": str(self.metrics_port),
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "server"],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while b"mqtt session up" not in self.log.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.pid = self.proc.pid

    def acked(self) -> int:
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ).read()
        found = re.search(rb"^eldersafe_ingest_messages_total ([0-9.e+]+)$", text, re.M)
        return int(float(found.group(1))) if found else 0

    def drain(self, port: int, messages: list[tuple[str, bytes]]) -> float:
        """Seconds for this server to make the backlog durable and acknowledge it."""
        before = self.acked()
        self.proc.send_signal(signal.SIGSTOP)
        try:
            asyncio.run(load(port, messages))
        finally:
            cpu = (
                cpu_seconds(self.pid),
                cpu_seconds(postmaster(self.dsn)),
                cpu_seconds(BROKER_PID),
            )
            started = time.time()
            self.proc.send_signal(signal.SIGCONT)
        target = before + len(messages)
        while self.acked() < target:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server died:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        elapsed = time.time() - started
        used = (
            cpu_seconds(self.pid) - cpu[0],
            cpu_seconds(postmaster(self.dsn)) - cpu[1],
            cpu_seconds(BROKER_PID) - cpu[2],
        )
        CPU_SHARES.append((used[0] / elapsed, used[1] / elapsed, used[2] / elapsed))
        return elapsed

    def stop(self, port: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(20)
        wipe_session(port, SERVER)


def server_drain(port: int, dsn: str, log_dir: Path, messages: list[tuple[str, bytes]]) -> float:
    """A fresh server process (and session) drains the backlog; it must not have died."""
    server = Server(port, dsn, log_dir)
    try:
        elapsed = server.drain(port, messages)
        assert server.proc.poll() is None and server.proc.pid == server.pid
        return elapsed
    finally:
        server.stop(port)


def rows_in(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        assert dead == (0,), f"{dead} dead letters"
        conn.execute("TRUNCATE telemetry")
        conn.commit()
    return int(row[0]) if row else 0


def register_site(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO organisations VALUES ('bench-org', NULL, 'bureau', 'Bench')")
        conn.execute(
            "INSERT INTO sites (id, organisation_id, kind, name) VALUES (%s, 'bench-org',"
            " 'home', 'Bench')",
            (SITE,),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batched-messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2, help="server runs of the 1-reading load")
    parser.add_argument("--paho-subscriber", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paho_subscriber:
        paho_subscriber(*args.paho_subscriber)
        return 0

    with services() as (broker, pg), tempfile.TemporaryDirectory() as logs:
        assert pg is not None
        global BROKER_PID
        assert broker.process is not None
        BROKER_PID = broker.process.pid
        migrate(pg.dsn)
        register_site(pg.dsn)
        port, dsn, log_dir = broker.port, pg.dsn, Path(logs)
        single = make_messages(args.messages, 1)
        size = statistics.mean(len(p) for _, p in single)
        paho = [paho_drain(port, single)]
        ours = []
        again = 0.0
        for i in range(args.runs):
            ours.append(server_drain(port, dsn, log_dir, single))
            if i == args.runs - 1:  # redelivery: every row already stored (the dedup path)
                again = server_drain(port, dsn, log_dir, single[: args.messages // 10])
            stored = rows_in(dsn)
            assert stored == args.messages, f"{stored} rows stored, expected {args.messages}"
            paho.append(paho_drain(port, single))
        batched = make_messages(args.batched_messages, 50)
        batched_s = server_drain(port, dsn, log_dir, batched)
        stored = rows_in(dsn)
        assert stored == args.batched_messages * 50, f"{stored} rows, expected 50 per message"

    n = args.messages
    print(f"\n1 reading per message: {n:,} messages of {size:.0f} B (topic excluded)")
    print(f"{'run':24} {'paho msg/s':>11} {'eldersafe msg/s':>16} {'ratio':>6}")
    ratios = []
    for i, s in enumerate(ours):
        base = statistics.mean([n / paho[i], n / paho[i + 1]])
        ratios.append((n / s) / base)
        print(f"{f'server run {i + 1}':24} {base:11.0f} {n / s:16.0f} {ratios[-1]:6.2f}")
    print(f"paho runs (msg/s): {', '.join(f'{n / p:.0f}' for p in paho)}")
    print(
        "cores busy during the server runs (server, postgres, broker): "
        + "; ".join(f"{a:.2f}, {b:.2f}, {c:.2f}" for a, b, c in CPU_SHARES)
    )
    print(f"ratio (median of runs): {statistics.median(ratios):.2f} x bare paho on MQTT 3.1.1")
    print(f"redelivered backlog (rows already stored): {n // 10 / again:.0f} msg/s")
    b = args.batched_messages
    print(
        f"50 readings per message: {b:,} messages, {b * 50 / batched_s:,.0f} rows/s "
        f"({b / batched_s:,.0f} msg/s)"
    )
    print(
        "every row counted in the database; each message acknowledged only after its batch"
        " committed."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
