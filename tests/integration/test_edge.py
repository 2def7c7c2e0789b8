"""``eldersafe edge`` as a real process: call-button simulator on a pty → edge → real Mosquitto.

The simulator (in this test's event loop) owns the pty master and keeps it open,
so the serial "cable" survives the edge being SIGKILLed; the restarted edge
reopens the slave path, as it would reopen /dev/ttyUSB0. Nothing is mocked:
the broker is Mosquitto with the project's accounts and ACLs, stopped and
started on the same port with the same persistence directory.

Frames the receiver sends while *no* edge has the port open are lost, exactly
as on a real UART (pyserial flushes the input buffer on open); so the test
presses buttons only while an edge is reading, and kills the edge when its
outbox holds what it has read — the outbox's promise is about what the edge
has accepted, and that is what is checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support import (
    GATEWAY_PASSWORDS,
    SERVER_PASSWORD,
    SERVER_PASSWORDS,
    Collector,
    publish_all,
    until,
    wait_for,
)

from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.local.mosquitto import MosquittoInstance
from simulators.callbutton_receiver import CallButtonReceiverSimulator

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[2]
SITE, GATEWAY = "site-a", "gw-a"
GW_TOPIC = f"eldersafe/v1/{SITE}/gateway/{GATEWAY}/status"
BUTTONS = {f"btn-{i:02d}": 0x00A00000 + i for i in range(10)}


class EdgeProcess:
    """The edge as a child process (so it can be SIGKILLed), logging to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "-v", "edge", "--config", str(self.config)],
                cwd=REPO,
                env={**os.environ, "EDGE_TEST_PASSWORD": GATEWAY_PASSWORDS["gw-site-a"]},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class SessionCollector:
    """A subscriber with server rights (its own account, so that the other test clients of
    the ``server`` account do not take its session over) and a persistent session that
    survives a broker restart."""

    def __init__(self, port: int, topic: str, account: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.subscriptions = 0  # SUBACKs so far (one per connection)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(*(account or ("server-2", SERVER_PASSWORDS["server-2"])))
        self.client.reconnect_delay_set(1, 1)
        self.topic = topic

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe(topic, qos=1)

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        def on_subscribe(*_: Any) -> None:
            self.subscriptions += 1
            self.subscribed.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t, json.loads(p)) for t, p, _ in self.snapshot() if t.endswith("/event")]

    def results(self, command_id: uuid.UUID | str) -> list[tuple[str, dict[str, Any]]]:
        """Command results for ``command_id``: (device, payload)."""
        return [
            (t.split("/")[3], json.loads(p))
            for t, p, _ in self.snapshot()
            if t.endswith("/command/result") and json.loads(p)["command_id"] == str(command_id)
        ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(
    tmp_path: Path, broker_port: int, serial_port: str, *, keepalive_s: int = 5
) -> Path:
    devices: list[dict[str, Any]] = [{"id": "receiver-1", "address": "receiver"}]
    devices += [{"id": dev, "address": f"{bid:08x}"} for dev, bid in BUTTONS.items()]
    config = {
        "site": SITE,
        "gateway": GATEWAY,
        "state_dir": str(tmp_path / "edge-state"),
        "broker": {
            "host": "127.0.0.1",
            "port": broker_port,
            "username": "gw-site-a",
            "password_env": "EDGE_TEST_PASSWORD",
            "keepalive_s": keepalive_s,
            "reconnect_max_s": 1,
        },
        "supervision": {"backoff_initial_s": 0.2, "backoff_max_s": 1},
        "drivers": [{"name": "cb", "kind": "callbutton", "port": serial_port, "devices": devices}],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def health(tmp_path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((tmp_path / "edge-state" / "health.json").read_text()))
    except (OSError, ValueError):
        return {}


async def edge_reading(tmp_path: Path, sim: CallButtonReceiverSimulator, pid: int) -> None:
    """Until the edge process ``pid`` has the port open and has heard the receiver (the
    receiver sends a status at each look, as a real one does on its own)."""

    async def heard() -> bool:
        h = health(tmp_path)
        if h.get("pid") == pid and h["drivers"]["cb"]["observations"] > 0:
            return True
        await sim.send_status()
        return False

    await until(heard, 20, f"edge {pid} hearing the receiver", interval=0.1)


def retained(port: int, topic: str) -> dict[str, Any]:
    watcher = Collector(port, "server", SERVER_PASSWORD, topic)
    try:
        wait_for(lambda: bool(watcher.messages), 5, f"the retained message on {topic}")
        return dict(json.loads(watcher.messages[-1][1]))
    finally:
        watcher.close()


@pytest.fixture
async def sim() -> AsyncIterator[CallButtonReceiverSimulator]:
    simulator = CallButtonReceiverSimulator(status_interval_s=5)
    await simulator.start()
    for button_id in BUTTONS.values():
        simulator.add_button(button_id)
    yield simulator
    await simulator.stop()


@pytest.fixture
def edge(tmp_path: Path) -> AsyncIterator[Callable[[Path], EdgeProcess]]:
    made: list[EdgeProcess] = []

    def make(config: Path) -> EdgeProcess:
        process = EdgeProcess(config, tmp_path / "edge.log")
        made.append(process)
        return process

    yield make  # type: ignore[misc]
    for process in made:
        process.stop()


async def test_birth_command_and_last_will(
    broker: MosquittoInstance, sim: CallButtonReceiverSimulator, edge: Any, tmp_path: Path
) -> None:
    events = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/#")
    process: EdgeProcess = edge(write_config(tmp_path, broker.port, sim.slave_path))
    pid = process.start()
    try:
        await edge_reading(tmp_path, sim, pid)
        # Birth: retained, online, with the driver's state.
        await until(
            lambda: any(t == GW_TOPIC for t, _, _ in events.snapshot()), 10, "birth message"
        )
        birth = await asyncio.to_thread(retained, broker.port, GW_TOPIC)
        assert birth["online"] is True and birth["drivers"] == {"cb": "running"}, birth

        # One press is one event, whatever the three RF repeats. A second press behind
        # it on the line is the barrier: any event the repeats made arrives before it.
        seq = await sim.press(BUTTONS["btn-03"])
        await sim.press(BUTTONS["btn-04"])
        await until(
            lambda: any(t.endswith("/btn-04/event") for t, _ in events.events()), 10, "barrier"
        )
        (topic, event), *rest = [(t, e) for t, e in events.events() if "/btn-04/" not in t]
        assert not rest, rest
        assert topic == f"eldersafe/v1/{SITE}/btn-03/event"
        assert (event["type"], event["phase"], event["data"]["seq"]) == ("sos", "pulse", seq)
        assert event["profile"] == "es-cb1"

        # Downlink: staff acknowledge → a 0x81 frame "help is coming" on the serial line.
        command = CommandPayload(
            v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=now_utc()
        )
        topic = f"eldersafe/v1/{SITE}/btn-03/command"
        rcs = await asyncio.to_thread(
            publish_all, broker.port, "server", SERVER_PASSWORD, [(topic, dump(command), 1)]
        )
        assert rcs == [0]
        ack = await sim.wait_for_ack(1, 10)  # (count, limit): positional on purpose
        assert ack.raw[3] == 0x81 and ack.button_id == BUTTONS["btn-03"] and ack.pattern == 2
        # The same command again (a redelivery) is not carried out twice.
        await asyncio.to_thread(
            publish_all, broker.port, "server", SERVER_PASSWORD, [(topic, dump(command), 1)]
        )
        await until(
            lambda: health(tmp_path).get("commands", {}).get("duplicate") == 1, 10, "duplicate"
        )
        assert len(sim.acks) == 1

        # Last will: SIGKILL → the broker publishes the retained offline status.
        process.kill()
        await until(
            lambda: any(
                t == GW_TOPIC and not json.loads(p)["online"] for t, p, _ in events.snapshot()
            ),
            10,
            "last will",
        )
        will = await asyncio.to_thread(retained, broker.port, GW_TOPIC)
        assert will["online"] is False
    finally:
        events.close()
        if process.proc is not None and process.proc.poll() is None:
            process.stop()
        print(process.tail())


async def test_300_events_through_broker_outage_and_sigkill_arrive_once(
    broker: MosquittoInstance, sim: CallButtonReceiverSimulator, edge: Any, tmp_path: Path
) -> None:
    """The acceptance point: broker down 30 s, 300 events, edge SIGKILLed in the middle."""
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/#")
    process: EdgeProcess = edge(write_config(tmp_path, broker.port, sim.slave_path))
    pid = process.start()
    pressed: list[tuple[str, int]] = []
    names = list(BUTTONS)

    async def press(n: int) -> None:
        for _ in range(n):
            device = names[len(pressed) % len(names)]
            pressed.append((device, await sim.press(BUTTONS[device])))

    try:
        await edge_reading(tmp_path, sim, pid)
        await until(lambda: health(tmp_path).get("connected") is True, 10, "edge connected")

        await asyncio.to_thread(broker.stop)
        stopped_at = time.monotonic()

        await press(150)
        await until(lambda: health(tmp_path).get("outbox_pending") == 150, 20, "150 in outbox")
        assert health(tmp_path)["connected"] is False

        process.kill()  # in the middle: the outbox holds 150 events, the broker is down
        pid = process.start()
        await edge_reading(tmp_path, sim, pid)
        await press(150)
        await until(lambda: health(tmp_path).get("outbox_pending") == 300, 20, "300 in outbox")
        assert collector.events() == []

        # The outage under test lasts 30 s; the edge must know it all along.
        await until(
            lambda: time.monotonic() - stopped_at >= 30 and health(tmp_path)["connected"] is False,
            40,
            "a 30 s outage",
        )
        outage = time.monotonic() - stopped_at
        await asyncio.to_thread(broker.start)

        await until(lambda: len({e["event_id"] for _, e in collector.events()}) >= 300, 60, "300")
        await until(lambda: health(tmp_path).get("outbox_pending") == 0, 10, "outbox drained")
        # Barrier: a press after the drain; every redelivery was sent before its PUBACK,
        # so it arrives before this event (the broker keeps the edge's order).
        barrier = ("btn-00", await sim.press(BUTTONS["btn-00"]))

        def key(topic: str, e: dict[str, Any]) -> tuple[str, int]:
            return (topic.split("/")[3], e["data"]["seq"])

        await until(lambda: any(key(t, e) == barrier for t, e in collector.events()), 10, "barrier")
        events = [(t, e) for t, e in collector.events() if key(t, e) != barrier]
        by_press: dict[tuple[str, int], set[str]] = defaultdict(set)
        for topic, e in events:
            assert e["type"] == "sos" and e["phase"] == "pulse"
            by_press[(topic.split("/")[3], e["data"]["seq"])].add(e["event_id"])
        assert outage >= 30
        assert len(pressed) == 300 and len(set(pressed)) == 300
        assert set(by_press) == set(pressed)  # every press arrived, nothing else did
        assert all(len(ids) == 1 for ids in by_press.values())  # one event id per press
        assert len({e["event_id"] for _, e in events}) == 300
        duplicates = len(events) - 300
        print(f"300 events, {duplicates} redeliveries (same event id), outage {outage:.1f} s")
        assert duplicates <= 300  # at-least-once: a redelivery keeps its event id
        first_arrival: list[tuple[str, int]] = []
        for topic, e in events:
            key = (topic.split("/")[3], e["data"]["seq"])
            if key not in first_arrival:
                first_arrival.append(key)
        assert first_arrival == pressed  # the outbox leaves in order, across the restart

        # A clean stop says offline itself (a clean disconnect fires no will).
        assert await asyncio.to_thread(process.stop) == 0
        assert (await asyncio.to_thread(retained, broker.port, GW_TOPIC))["online"] is False
    finally:
        collector.close()
        print(process.tail())


async def test_modbus_smoke_telemetry_hush_and_offline(
    broker: MosquittoInstance, edge: Any, tmp_path: Path
) -> None:
    """Modbus detectors through the edge: level changes only, telemetry, hush, 3-poll offline."""
    from simulators.modbus_sensors import ModbusSensorBus

    bus = ModbusSensorBus({1: "es-sd1", 2: "es-ef1"})
    url = await bus.start()
    config = {
        "site": SITE,
        "gateway": GATEWAY,
        "state_dir": str(tmp_path / "edge-state"),
        "broker": {
            "port": broker.port,
            "username": "gw-site-a",
            "password_env": "EDGE_TEST_PASSWORD",
            "reconnect_max_s": 1,
        },
        "telemetry": {"batch_s": 0.5},
        "drivers": [
            {
                "name": "rs485",
                "kind": "modbus",
                "port": url,
                "request_timeout_s": 0.2,
                "devices": [
                    {
                        "id": "smoke-1",
                        "address": "unit-1",
                        "profile": "es-sd1",
                        "poll_interval_s": 0.3,
                    },
                    {
                        "id": "ef-2",
                        "address": "unit-2",
                        "profile": "es-ef1",
                        "poll_interval_s": 0.3,
                    },
                ],
            }
        ],
    }
    path = tmp_path / "modbus.yaml"
    path.write_text(yaml.safe_dump(config))
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/#")
    process: EdgeProcess = edge(path)
    process.start()

    def of(device: str, channel: str) -> list[dict[str, Any]]:
        return [
            json.loads(p)
            for t, p, _ in collector.snapshot()
            if t == f"eldersafe/v1/{SITE}/{device}/{channel}"
        ]

    try:
        await until(lambda: of("ef-2", "telemetry") != [], 15, "telemetry from ef-2")
        assert {r["metric"] for t in of("ef-2", "telemetry") for r in t["readings"]}
        await until(lambda: of("smoke-1", "status") != [], 10, "retained status of smoke-1")
        assert of("smoke-1", "status")[-1]["online"] is True

        bus.set_smoke(1, 0.3)
        await until(lambda: any(e["type"] == "smoke" for e in of("smoke-1", "event")), 10, "smoke")

        def smoky_polls() -> int:
            return sum(
                1
                for t in of("smoke-1", "telemetry")
                for r in t["readings"]
                if r["metric"] == "smoke_obscuration_db_m" and r["value"] >= 0.3
            )

        await until(lambda: smoky_polls() >= 3, 10, "three polls in smoke")

        # Hush: the es-sd1's coil is written; the es-ef1 has none, so its hush is refused.
        hush_smoke, hush_ef = (
            CommandPayload(v=1, command_id=uuid.uuid4(), action=CommandAction.HUSH, time=now_utc())
            for _ in range(2)
        )
        await asyncio.to_thread(
            publish_all,
            broker.port,
            "server",
            SERVER_PASSWORD,
            [
                (f"eldersafe/v1/{SITE}/smoke-1/command", dump(hush_smoke), 1),
                (f"eldersafe/v1/{SITE}/ef-2/command", dump(hush_ef), 1),
            ],
        )
        await until(lambda: bus.coil_writes(1) != [], 10, "hush coil write")
        for sent in (hush_smoke, hush_ef):
            await until(lambda: collector.results(sent.command_id) != [], 10, "a result")  # noqa: B023
        # The results left the outbox behind any event of the polls before them: polled
        # again and again in smoke, still one raise.
        smoke = [e for e in of("smoke-1", "event") if e["type"] == "smoke"]
        assert [e["phase"] for e in smoke] == ["raise"], smoke
        ((_, executed),) = collector.results(hush_smoke.command_id)
        assert (executed["outcome"], executed["via"]) == ("executed", "rs485"), executed
        ((_, refused),) = collector.results(hush_ef.command_id)
        assert refused["outcome"] == "refused" and "es-ef1 cannot hush" in refused["reason"]
        assert bus.coil_writes(2) == []

        bus.silence(2)  # unit 2 stops answering: offline after 3 failed polls
        await until(
            lambda: any(
                e["type"] == "device_offline" and e["phase"] == "raise" for e in of("ef-2", "event")
            ),
            10,
            "ef-2 offline",
        )
        bus.resume(2)
        await until(
            lambda: any(
                e["type"] == "device_offline" and e["phase"] == "clear" for e in of("ef-2", "event")
            ),
            10,
            "ef-2 back online",
        )
    finally:
        collector.close()
        process.stop()
        await bus.stop()
        print(process.tail())


def test_site_config_is_validated_strictly(tmp_path: Path) -> None:
    from gateway.edge.config import ConfigError, load_config

    good = yaml.safe_load(write_config(tmp_path, 1883, "/dev/ttyUSB0").read_text())
    path = tmp_path / "c.yaml"

    def check(mutate: Callable[[dict[str, Any]], None], needle: str) -> None:
        data = json.loads(json.dumps(good))
        mutate(data)
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=needle):
            load_config(path)

    path.write_text(yaml.safe_dump(good))
    config = load_config(path)
    assert config.drivers[0].devices[1].address == f"{BUTTONS['btn-00']:08x}"
    check(lambda d: d.update(site="Site A"), "site")
    check(lambda d: d["drivers"][0]["devices"].pop(0), "receiver")
    check(lambda d: d["drivers"][0]["devices"][1].update(address="12345"), "8 hex")
    check(lambda d: d["drivers"][0]["devices"][2].update(id="btn-00"), "twice")
    check(lambda d: d["broker"].update(password="x"), "exactly one")
    check(lambda d: d.update(colour="red"), "colour")
    check(
        lambda d: d["drivers"].append(
            {
                **d["drivers"][0],
                "name": "cb2",
                "devices": [
                    {"id": "receiver-2", "address": "receiver"},
                    {"id": "btn-00", "address": "00000001"},
                ],
            }
        ),
        "one id is one device",
    )


async def test_wristband_over_bumble_transport(
    broker: MosquittoInstance, edge: Any, tmp_path: Path
) -> None:
    """es-wb1 through the edge: the wristband simulator in its own process, a real BLE stack."""
    from gateway.local.ports import free_port

    hci = free_port()
    sim_log = (tmp_path / "wristband.log").open("wb")
    sim = subprocess.Popen(  # noqa: ASYNC220 (a quick fork, before the test starts)
        [
            sys.executable,
            "-m",
            "simulators.wristband",
            "--expose",
            f"tcp-server:127.0.0.1:{hci}",
            "--interval-ms",
            "50",
            "--sos-after",
            "3",
        ],
        cwd=REPO,
        stdout=sim_log,
        stderr=subprocess.STDOUT,
    )
    config = {
        "site": SITE,
        "gateway": GATEWAY,
        "state_dir": str(tmp_path / "edge-state"),
        "broker": {
            "port": broker.port,
            "username": "gw-site-a",
            "password_env": "EDGE_TEST_PASSWORD",
        },
        "drivers": [
            {
                "name": "ble",
                "kind": "wristband",
                "backend": "bumble",
                "bumble_transport": f"tcp-client:127.0.0.1:{hci}",
                "devices": [{"id": "wb-1", "address": "c0:4e:57:00:00:01"}],
            }
        ],
    }
    path = tmp_path / "ble.yaml"
    path.write_text(yaml.safe_dump(config))
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/#")
    process: EdgeProcess = edge(path)
    try:
        await until(
            lambda: b"advertising" in (tmp_path / "wristband.log").read_bytes(),
            20,
            "the simulator's HCI server and advertising",
        )
        process.start()
        await until(
            lambda: any(t.endswith("wb-1/event") for t, _, _ in collector.snapshot()), 20, "SOS"
        )
        (_topic, event), *_ = collector.events()
        assert (event["type"], event["profile"]) == ("sos", "es-wb1")
        status = [json.loads(p) for t, p, _ in collector.snapshot() if t.endswith("wb-1/status")]
        assert status and status[-1]["online"] is True
    finally:
        collector.close()
        process.stop()
        sim.terminate()
        sim.wait(10)
        sim_log.close()
