"""Edge CPU share and peak RSS with 200 simulated devices, against an idle edge in the same run.

The acceptance point: ``eldersafe edge`` carrying 200 devices for 60 s uses
≤ 10 % of one core and ≤ 80 MB peak RSS. Both edges are real
``python -m gateway.cli edge`` processes on a private Mosquitto; the devices
are the project's wire-level simulators in processes of their own, so only the
edge's CPU is measured (psutil ``cpu_times`` delta over the window; peak RSS =
the kernel's ``VmHWM``, which includes start-up):

* **baseline**: the same edge with one device per driver kind (a call-button
  receiver, a Modbus unit, a wristband) that says nothing: same imports, same
  tasks, the MQTT session and housekeeping, no traffic.
* **200 devices**: 100 call buttons on 2 receivers (status every 30 s, each
  button checks in once per ``--supervision-s``), 60 Modbus units on 3 buses
  (es-ef1 polled every 2 s, es-sd1 every 1 s: the profiles' own intervals),
  40 wristbands advertising every 1 s (kept connected over GATT by the edge).
  During the window: three presses and a cancel, a smoke build-up and its
  clearing, a residual-current creep past the alarm threshold and back.

What reached the broker is counted by a ``server`` subscriber and printed, so
the run shows the edge was working. Run: ``make bench`` or ``python bench/edge.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from common import LOADER, SERVER, SITE, services  # noqa: E402

CPU_TARGET = 10.0  # % of one core
RSS_TARGET_MB = 80.0
BUTTON_BASE = 0x00B00000


@dataclass(frozen=True)
class Layout:
    """Which simulated devices one edge carries."""

    receivers: list[list[int]]  # button ids per receiver
    buses: list[list[tuple[int, str]]]  # (unit id, profile) per bus
    wristbands: int
    poll_override_s: float | None = None  # baseline: units polled (almost) never

    @property
    def devices(self) -> int:
        return sum(map(len, self.receivers)) + sum(map(len, self.buses)) + self.wristbands


def full_layout(buttons: int, units: int, wristbands: int) -> Layout:
    """Buttons on 2 receivers, units on 3 buses (half es-ef1, half es-sd1)."""
    ids = [BUTTON_BASE + i for i in range(buttons)]
    receivers = [ids[: buttons // 2], ids[buttons // 2 :]]
    buses: list[list[tuple[int, str]]] = [[], [], []]
    for i in range(units):
        bus = buses[i % 3]
        bus.append((len(bus) + 1, "es-ef1" if i % 2 == 0 else "es-sd1"))
    return Layout(receivers, [b for b in buses if b], wristbands)


def idle_layout() -> Layout:
    """The baseline: a silent receiver, one unit polled hourly, one wristband never heard."""
    return Layout([[]], [[(1, "es-sd1")]], 0, poll_override_s=3600.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- simulator process ----------------------------------------------------------------------


async def simulate(spec: dict[str, Any]) -> None:
    """Child process: host receivers and Modbus buses, run the event script on "go"."""
    from simulators.callbutton_receiver import CallButtonReceiverSimulator
    from simulators.modbus_sensors import ModbusSensorBus

    events = bool(spec["events"])
    receivers = []
    for buttons in spec["receivers"]:
        sim = CallButtonReceiverSimulator(status_interval_s=30.0 if events else 0, seed=1)
        await sim.start()
        for b in buttons:
            sim.add_button(b)
        receivers.append(sim)
    buses = [ModbusSensorBus({u: p for u, p in units}) for units in spec["buses"]]
    urls = [await bus.start() for bus in buses]
    print(json.dumps({"ports": [r.slave_path for r in receivers], "buses": urls}), flush=True)

    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    tasks: list[asyncio.Task[None]] = []
    if events and line.strip() == "go":
        tasks = script(receivers, buses, spec)
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop" or EOF
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    frames = sum(r.frames_sent for r in receivers)
    print(json.dumps({"frames": frames}), flush=True)
    for r in receivers:
        await r.stop()
    for bus in buses:
        await bus.stop()


def script(
    receivers: list[Any], buses: list[Any], spec: dict[str, Any]
) -> list[asyncio.Task[None]]:
    """Supervision check-ins spread over the period, plus the light alarm load."""
    rng = random.Random(7)
    period = float(spec["supervision_s"])

    async def check_ins(sim: Any, button: int) -> None:
        await asyncio.sleep(rng.uniform(0, period))
        while True:
            await sim.supervision(button)
            await asyncio.sleep(period)

    async def at(delay: float, fn: Any, *args: Any, **kw: Any) -> None:
        await asyncio.sleep(delay)
        result = fn(*args, **kw)
        if asyncio.iscoroutine(result):
            await result

    tasks = [asyncio.create_task(check_ins(sim, b)) for sim in receivers for b in list(sim.buttons)]
    r0, r1 = receivers[0], receivers[-1]
    b0, b1 = list(r0.buttons), list(r1.buttons)
    if b0 and b1:
        tasks += [
            asyncio.create_task(at(8, r0.press, b0[3 % len(b0)])),
            asyncio.create_task(at(21, r1.press, b1[5 % len(b1)])),
            asyncio.create_task(at(37, r0.press, b0[11 % len(b0)])),
            asyncio.create_task(at(42, r0.cancel, b0[11 % len(b0)])),
        ]
    units = [
        (bus, u, p) for bus, spec_bus in zip(buses, spec["buses"], strict=True) for u, p in spec_bus
    ]
    sd1 = [(bus, u) for bus, u, p in units if p == "es-sd1"]
    ef1 = [(bus, u) for bus, u, p in units if p == "es-ef1"]
    if sd1:
        bus, unit = sd1[0]
        tasks.append(asyncio.create_task(at(12, bus.smoke_build_up, unit, interval_s=1.0)))
        tasks.append(asyncio.create_task(at(40, bus.set_smoke, unit, 0.02)))
    if ef1:
        bus, unit = ef1[-1]
        tasks.append(asyncio.create_task(at(4, bus.leakage_creep, unit, interval_s=1.0)))
        tasks.append(asyncio.create_task(at(45, bus.set_residual_current, unit, 120)))
    return tasks


# -- broker side ------------------------------------------------------------------------------


class Collector:
    """A ``server`` subscriber counting what the edges published, per channel."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.lock = threading.Lock()
        self.channels: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.readings = 0
        self.devices: set[str] = set()  # device ids heard (any channel)
        self.gateway_status: dict[str, bool] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-edge-server", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(*SERVER)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"eldersafe/v1/{SITE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self.lock:
            if parts[3] == "gateway":
                self.gateway_status[parts[4]] = bool(json.loads(msg.payload).get("online"))
                self.channels["gateway status"] += 1
                return
            self.channels[parts[4]] += 1
            self.devices.add(parts[3])
            if parts[4] == "telemetry":
                self.readings += len(json.loads(msg.payload)["readings"])
            elif parts[4] == "event":
                body = json.loads(msg.payload)
                self.events[f"{body['type']}/{body['phase']}"] += 1

    def reset(self) -> None:
        with self.lock:
            self.channels.clear()
            self.events.clear()
            self.readings = 0
            self.devices.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "channels": dict(self.channels),
                "events": dict(self.events),
                "readings": self.readings,
                "devices": len(self.devices),
                "by_kind": dict(
                    Counter(d.split("-")[0].rstrip("0123456789") for d in self.devices)
                ),
            }

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- one measured edge ------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    devices: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float  # VmHWM: high-water mark since the process started
    window_rss_mb: float  # largest RSS sampled during the window
    threads: int
    broker: dict[str, Any] = field(default_factory=dict)
    sim: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_pct(self) -> float:
        return 100.0 * self.cpu_s / self.seconds


def edge_config(
    layout: Layout, gateway: str, state_dir: Path, broker_port: int, ends: dict[str, Any]
) -> dict[str, Any]:
    drivers: list[dict[str, Any]] = []
    for r, (port, buttons) in enumerate(zip(ends["ports"], layout.receivers, strict=True)):
        devices = [{"id": f"receiver-{r}", "address": "receiver"}]
        devices += [{"id": f"btn-{b:08x}", "address": f"{b:08X}"} for b in buttons]
        drivers.append(
            {"name": f"receiver-{r}", "kind": "callbutton", "port": port, "devices": devices}
        )
    for n, (url, units) in enumerate(zip(ends["buses"], layout.buses, strict=True)):
        devs: list[dict[str, Any]] = []
        for unit, profile in units:
            dev: dict[str, Any] = {
                "id": f"bus{n}-{profile[3:]}-{unit}",
                "address": f"unit-{unit}",
                "profile": profile,
            }
            if layout.poll_override_s is not None:
                dev["poll_interval_s"] = layout.poll_override_s
            devs.append(dev)
        drivers.append({"name": f"rs485-{n}", "kind": "modbus", "port": url, "devices": devs})
    bands = [f"C0:4E:57:00:00:{i + 1:02X}" for i in range(max(layout.wristbands, 1))]
    drivers.append(
        {
            "name": "ble",
            "kind": "wristband",
            "backend": "bumble",
            "bumble_transport": f"tcp-client:127.0.0.1:{ends['ble_port']}",
            "devices": [{"id": f"wb-{i:02d}", "address": a} for i, a in enumerate(bands)],
        }
    )
    return {
        "site": SITE,
        "gateway": gateway,
        "state_dir": str(state_dir),
        "broker": {
            "host": "127.0.0.1",
            "port": broker_port,
            "username": LOADER[0],
            "password": LOADER[1],
        },
        "drivers": drivers,
    }


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def wait_drivers_running(
    health: Path, drivers: int, timeout: float, edge: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if edge.poll() is not None:
            raise RuntimeError(f"edge exited with {edge.returncode} during start-up")
        with contextlib.suppress(OSError, ValueError):
            states = json.loads(health.read_text()).get("drivers", {})
            if len(states) == drivers and all(s["state"] == "running" for s in states.values()):
                return
        time.sleep(0.2)
    raise RuntimeError(f"edge drivers not all running after {timeout} s: {health}")


def wait_wristbands(log: Path, count: int, edge: subprocess.Popen[bytes]) -> None:
    """The edge connects configured wristbands one by one (~1 s each): wait for all."""
    deadline = time.monotonic() + 30.0 + 3.0 * count
    while time.monotonic() < deadline:
        if edge.poll() is not None:
            raise RuntimeError(f"edge exited with {edge.returncode} during start-up")
        if log.read_text(errors="replace").count("connected and subscribed") >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"not all {count} wristbands connected; see {log}")


def measure(
    name: str,
    layout: Layout,
    *,
    broker_port: int,
    collector: Collector,
    seconds: float,
    warmup: float,
    supervision_s: float,
    workdir: Path,
) -> Result:
    """Start simulators and one edge, warm up, measure the edge over ``seconds``."""
    events = layout.poll_override_s is None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    spec = {
        "receivers": layout.receivers,
        "buses": layout.buses,
        "events": events,
        "supervision_s": supervision_s,
    }
    sim = subprocess.Popen(
        [sys.executable, __file__, "--simulate", json.dumps(spec)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ble_port = free_port()
    ble_log = (workdir / f"{name}-wristbands.log").open("wb")
    ble = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.wristband",
            "--expose",
            f"tcp-server:127.0.0.1:{ble_port}",
            "--count",
            str(layout.wristbands),
            "--interval-ms",
            "1000",
        ],
        cwd=REPO,
        env=env,
        stdout=ble_log,
        stderr=subprocess.STDOUT,
    )
    edge: subprocess.Popen[bytes] | None = None
    try:
        assert sim.stdin is not None and sim.stdout is not None
        ends = json.loads(sim.stdout.readline())
        ends["ble_port"] = ble_port
        time.sleep(1.0)  # the wristband process binds its port
        gateway = f"edge-{name}"
        state = workdir / gateway
        config = workdir / f"{gateway}.yaml"
        config.write_text(json.dumps(edge_config(layout, gateway, state, broker_port, ends)))
        with (workdir / f"{gateway}.log").open("wb") as log:
            edge = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "edge", "--config", str(config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        drivers = len(layout.receivers) + len(layout.buses) + 1
        wait_drivers_running(state / "health.json", drivers, 60.0, edge)
        wait_wristbands(workdir / f"{gateway}.log", layout.wristbands, edge)
        time.sleep(warmup)
        proc = psutil.Process(edge.pid)
        collector.reset()
        sim.stdin.write("go\n")
        sim.stdin.flush()
        before = proc.cpu_times()
        started = time.monotonic()
        window_rss = 0
        while (left := started + seconds - time.monotonic()) > 0:
            window_rss = max(window_rss, proc.memory_info().rss)
            time.sleep(min(0.5, left))
        after = proc.cpu_times()
        elapsed = time.monotonic() - started
        window_rss = max(window_rss, proc.memory_info().rss)
        cpu = (after.user - before.user) + (after.system - before.system)
        result = Result(
            name,
            sum(len(d["devices"]) for d in json.loads(config.read_text())["drivers"]),
            elapsed,
            cpu,
            vm_hwm_mb(edge.pid),
            window_rss / 2**20,
            proc.num_threads(),
            collector.snapshot(),
        )
        sim.stdin.write("stop\n")
        sim.stdin.flush()
        result.sim = json.loads(sim.stdout.readline() or "{}")
        if edge.poll() is not None:
            raise RuntimeError(f"edge exited with {edge.returncode} during the window")
        return result
    finally:
        for p in (edge, sim, ble):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        ble_log.close()


# -- report -----------------------------------------------------------------------------------


def report(base: Result, full: Result) -> bool:
    print(
        f"\n{'edge':12} {'configured':>10} {'window s':>8} {'CPU s':>7} {'CPU %':>6} "
        f"{'peak RSS MB':>11} {'window RSS MB':>13} {'threads':>7}"
    )
    for r in (base, full):
        print(
            f"{r.name:12} {r.devices:10d} {r.seconds:8.1f} {r.cpu_s:7.2f} {r.cpu_pct:6.2f} "
            f"{r.peak_rss_mb:11.1f} {r.window_rss_mb:13.1f} {r.threads:7d}"
        )
    extra_cpu = full.cpu_pct - base.cpu_pct
    extra_rss = full.peak_rss_mb - base.peak_rss_mb
    print(f"{'200 − idle':12} {'':10} {'':8} {'':7} {extra_cpu:6.2f} {extra_rss:11.1f}")

    b = full.broker
    print(f"\nreceived from the 200-device edge during the window ({full.seconds:.0f} s):")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(b["by_kind"].items()))
    print(f"  devices heard: {b['devices']} ({kinds}); telemetry readings: {b['readings']}")
    print("  messages: " + ", ".join(f"{k} {v}" for k, v in sorted(b["channels"].items())))
    print("  events: " + (", ".join(f"{k} {v}" for k, v in sorted(b["events"].items())) or "none"))
    print(f"  call-button frames the receivers sent: {full.sim.get('frames')}")

    working = b["readings"] > 0 and sum(b["events"].values()) > 0
    if not working:
        print("\nTHE EDGE PUBLISHED NO TELEMETRY OR NO EVENTS: the figures do not count")
    cpu_ok = full.cpu_pct <= CPU_TARGET
    rss_ok = full.peak_rss_mb <= RSS_TARGET_MB
    print(
        f"\ntarget CPU ≤ {CPU_TARGET:.0f} % of one core: {full.cpu_pct:.2f} % "
        f"{'MET' if cpu_ok else 'NOT MET'}"
    )
    print(
        f"target peak RSS ≤ {RSS_TARGET_MB:.0f} MB: {full.peak_rss_mb:.1f} MB "
        f"{'MET' if rss_ok else 'NOT MET'}"
    )
    return working and cpu_ok and rss_ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--baseline-seconds", type=float, default=30.0, help="idle edge window")
    parser.add_argument("--warmup", type=float, default=10.0, help="after all drivers run")
    parser.add_argument("--buttons", type=int, default=100)
    parser.add_argument("--units", type=int, default=60, help="Modbus units on 3 buses")
    parser.add_argument("--wristbands", type=int, default=40)
    parser.add_argument(
        "--supervision-s",
        type=float,
        default=60.0,
        help="each button's check-in period (real buttons: 3600)",
    )
    parser.add_argument("--keep", action="store_true", help="keep configs and edge logs")
    parser.add_argument("--simulate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate:
        asyncio.run(simulate(json.loads(args.simulate)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="eldersafe-bench-edge-"))
    layout = full_layout(args.buttons, args.units, args.wristbands)
    with services(with_database=False) as (broker, _):
        collector = Collector(broker.port)
        try:
            common = {
                "broker_port": broker.port,
                "collector": collector,
                "warmup": args.warmup,
                "supervision_s": args.supervision_s,
                "workdir": workdir,
            }
            print(
                f"baseline: idle edge (3 drivers, 3 silent devices), {args.baseline_seconds:.0f} s"
            )
            base = measure("idle", idle_layout(), seconds=args.baseline_seconds, **common)
            print(
                f"loaded edge: {layout.devices} devices + {len(layout.receivers)} receivers, "
                f"{args.seconds:.0f} s (after all {layout.wristbands} wristbands connected)"
            )
            full = measure("200", layout, seconds=args.seconds, **common)
        finally:
            collector.close()
    ok = report(base, full)
    if args.keep:
        print(f"\nconfigs and logs: {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
