"""Line and driver counters of a real ``eldersafe edge``: health.json and Prometheus.

A corrupt frame written to the call-button receiver's pty and a Modbus unit that
stops answering must move the counters the operator sees, and the silent unit
must log one line going offline and one coming back — not an error per poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import GATEWAY_PASSWORDS, until

from gateway.local.mosquitto import MosquittoInstance
from gateway.local.ports import free_port
from simulators.callbutton_receiver import CallButtonReceiverSimulator
from simulators.modbus_sensors import ModbusSensorBus

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def receiver() -> AsyncIterator[CallButtonReceiverSimulator]:
    simulator = CallButtonReceiverSimulator(status_interval_s=0.2)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def bus() -> AsyncIterator[ModbusSensorBus]:
    sensors = ModbusSensorBus({1: "es-sd1", 2: "es-ef1"})
    await sensors.start()
    yield sensors
    await sensors.stop()


async def test_counters_move_on_a_corrupt_frame_and_a_silent_unit(
    broker: MosquittoInstance,
    receiver: CallButtonReceiverSimulator,
    bus: ModbusSensorBus,
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    fast = {"poll_interval_s": 0.3}
    config = {
        "site": "site-a",
        "gateway": "gw-a",
        "state_dir": str(tmp_path / "state"),
        "broker": {
            "port": broker.port,
            "username": "gw-site-a",
            "password_env": "EDGE_TEST_PASSWORD",
            "reconnect_max_s": 1,
        },
        "metrics": {"port": metrics_port},
        "drivers": [
            {
                "name": "cb",
                "kind": "callbutton",
                "port": receiver.slave_path,
                "devices": [{"id": "receiver-1", "address": "receiver"}],
            },
            {
                "name": "rs485",
                "kind": "modbus",
                "port": bus.url,
                "request_timeout_s": 0.2,
                "devices": [
                    {"id": "smoke-1", "address": "unit-1", "profile": "es-sd1", **fast},
                    {"id": "ef-2", "address": "unit-2", "profile": "es-ef1", **fast},
                ],
            },
        ],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "edge.log"
    with log_path.open("wb") as out:
        edge = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway.cli", "edge", "--config", str(path)),
            cwd=REPO,
            env={**os.environ, "EDGE_TEST_PASSWORD": GATEWAY_PASSWORDS["gw-site-a"]},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def health() -> dict[str, Any]:
        try:
            return dict(json.loads((tmp_path / "state" / "health.json").read_text()))
        except (OSError, ValueError):
            return {}

    def counters(driver: str, scope: str = "line") -> dict[str, int]:
        drivers = health().get("drivers", {})
        return dict(drivers.get(driver, {}).get("counters", {}).get(scope, {}))

    def scraped() -> dict[tuple[str, str, str], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            (s.labels["driver"], s.labels["scope"], s.labels["counter"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "eldersafe_edge_driver_line"
            for s in family.samples
            if s.name.endswith("_total")
        }

    try:
        await until(lambda: counters("cb").get("frames", 0) > 0, 20, "receiver frames counted")
        await until(lambda: counters("rs485", "unit-1").get("polls", 0) > 0, 10, "unit-1 polled")
        before = counters("cb")

        await receiver.inject_corrupt_frame("bad_crc")
        await until(lambda: counters("cb")["bad_crc"] == before["bad_crc"] + 1, 10, "bad_crc")
        after = counters("cb")
        assert after["resyncs"] > before["resyncs"]
        assert after["frames"] >= before["frames"]  # the receiver goes on being heard
        metrics = await asyncio.to_thread(scraped)
        assert metrics[("cb", "line", "bad_crc")] >= before["bad_crc"] + 1
        assert ("rs485", "unit-1", "failed_polls") in metrics

        bus.silence(1)  # unit 1 stops answering: offline after 3 failed polls
        await until(
            lambda: counters("rs485", "unit-1").get("failed_polls", 0) >= 8, 20, "failed polls"
        )
        unit = counters("rs485", "unit-1")
        assert unit["offline_transitions"] == 1
        assert counters("rs485")["failed_polls"] >= unit["failed_polls"]  # the bus total
        assert counters("rs485", "unit-2")["failed_polls"] == 0  # its neighbour answers
        metrics = await asyncio.to_thread(scraped)
        assert metrics[("rs485", "unit-1", "failed_polls")] >= 8

        bus.resume(1)
        await until(lambda: "answering again" in log_path.read_text(), 10, "back online")
        assert counters("rs485", "unit-1")["offline_transitions"] == 1
    finally:
        edge.terminate()
        await asyncio.wait_for(edge.wait(), 15)
    log = log_path.read_text()
    print(log[-3000:])
    unit_lines = [line for line in log.splitlines() if "unit-1" in line]
    assert len([line for line in unit_lines if "offline after" in line]) == 1, unit_lines
    assert len([line for line in unit_lines if "answering again" in line]) == 1, unit_lines
    noisy = [line for line in log.splitlines() if " ERROR " in line or "pymodbus" in line]
    assert noisy == []  # no error (and no frame dump) per failed poll
