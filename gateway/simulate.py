"""``eldersafe simulate SCENARIO``: simulated devices at their transports and a real edge process.

The simulators run in this process (ptys, a Modbus RTU server, wristbands on a
BLE link exposed as an HCI transport); the edge is ``eldersafe edge`` in a
process of its own, with a site file written for the simulated site. So the
edge and driver code are exactly what runs on hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simulators.scenario import Scenario, SimulatedSite

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerLogin:
    host: str
    port: int
    username: str
    password: str


def edge_site_file(site: SimulatedSite, broker: BrokerLogin, state_dir: Path) -> dict[str, Any]:
    """The edge's site configuration for a running simulated site."""
    sc = site.scenario
    drivers: list[dict[str, Any]] = []
    for rx_id, sim in site.receivers.items():
        buttons = [
            {"id": d.id, "address": f"{d.button_id:08x}"}
            for d in sc.devices
            if d.kind == "button" and rx_id in sc.hearing(d)
        ]
        drivers.append(
            {
                "name": rx_id,
                "kind": "callbutton",
                "port": sim.slave_path,
                "devices": [{"id": rx_id, "address": "receiver"}, *buttons],
            }
        )
    if site.bus is not None:
        drivers.append(
            {
                "name": "rs485",
                "kind": "modbus",
                "port": site.bus.url,
                "devices": [
                    {
                        "id": d.id,
                        "address": f"unit-{d.unit}",
                        "profile": "es-sd1" if d.kind == "smoke_detector" else "es-ef1",
                    }
                    for d in sc.devices
                    if d.unit is not None
                ],
            }
        )
    if site.wristbands:
        drivers.append(
            {
                "name": "ble",
                "kind": "wristband",
                "backend": "bumble",
                "bumble_transport": site.ble_transport,
                "devices": [
                    {"id": d.id, "address": d.address} for d in sc.devices if d.kind == "wristband"
                ],
            }
        )
    return {
        "site": sc.site,
        "gateway": sc.gateway,
        "state_dir": str(state_dir),
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "username": broker.username,
            "password": broker.password,
            "keepalive_s": 10,
            "reconnect_max_s": 2,
        },
        "telemetry": {"qos": 1, "batch_s": 1.0},
        "drivers": drivers,
    }


@dataclass
class RunningSimulation:
    site: SimulatedSite
    edge: asyncio.subprocess.Process
    config_path: Path
    health_path: Path

    async def play(self, speed: float = 1.0) -> None:
        await self.site.play(speed=speed)

    def health(self) -> dict[str, Any]:
        """The edge's ``health.json`` (empty until it writes one)."""
        try:
            return dict(json.loads(self.health_path.read_text()))
        except (OSError, ValueError):
            return {}

    def ready(self) -> bool:
        """The edge is connected, subscribed to commands, and has heard every driver."""
        h = self.health()
        drivers = h.get("drivers") or {}
        return (
            h.get("pid") == self.edge.pid
            and h.get("connected") is True
            and (h.get("mqtt") or {}).get("subscribed") is True
            and len(drivers) > 0
            and all(d.get("observations", 0) > 0 for d in drivers.values())
        )

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until ``ready``; receivers are asked for a status frame meanwhile.

        Frames a receiver sends before the edge has its port open are lost (as
        on a real UART), so a scenario must not start before this.
        """
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.edge.returncode is not None:
                raise RuntimeError(f"the edge exited with {self.edge.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"edge not ready after {timeout_s} s: {self.health()}")
            for receiver in self.site.receivers.values():
                await receiver.send_status()
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def simulation(
    scenario: Scenario, broker: BrokerLogin, state_dir: Path, *, log_path: Path | None = None
) -> AsyncIterator[RunningSimulation]:
    """Start the simulated site and an edge for it; stop both on exit."""
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    site = SimulatedSite(scenario)
    await site.start()
    edge: asyncio.subprocess.Process | None = None
    out = None
    try:
        config_path = state_dir / "site.yaml"
        text = yaml.safe_dump(edge_site_file(site, broker, state_dir / "edge"))
        await asyncio.to_thread(config_path.write_text, text)
        out = await asyncio.to_thread(log_path.open, "ab") if log_path else None
        edge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "edge",
            "--config",
            str(config_path),
            stdout=out,
            stderr=out,
            env=dict(os.environ),
        )
        yield RunningSimulation(site, edge, config_path, state_dir / "edge" / "health.json")
    finally:
        if edge is not None and edge.returncode is None:
            edge.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(edge.wait(), 15)
            except TimeoutError:
                edge.kill()
                await edge.wait()
        if out is not None:
            out.close()
        await site.stop()


async def run_scenario(
    scenario: Scenario, broker: BrokerLogin, state_dir: Path, *, ready_timeout_s: float = 30.0
) -> int:
    async with simulation(scenario, broker, state_dir) as sim:
        await sim.wait_ready(ready_timeout_s)  # the edge has its transports and the broker
        print(f"simulate: {scenario.title} (site {scenario.site})")
        await sim.play()
        remaining = scenario.duration_s - max((s.at for s in scenario.steps), default=0)
        await asyncio.sleep(max(remaining, 1.0))
        return 0 if sim.edge.returncode is None else 1
