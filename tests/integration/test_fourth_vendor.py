"""A vendor the project does not ship, run by a real ``eldersafe edge``, without editing gateway/.

The Acme AS-200 smoke detector (``tests/vendor_acme``: its own register map at
0x0100, its own alarm bits, hush on coil 0x0010) is a profile and a decoder in a
test-only package. The site file names the package under ``plugins:``; the
edge process finds it on PYTHONPATH like any installed vendor module. Its
pymodbus RTU server is on a TCP socket, the broker is Mosquitto with the
project's accounts and ACLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import support
import yaml
from support import GATEWAY_PASSWORDS, SERVER_PASSWORD, Collector, publish_all, until
from vendor_acme import HUSH_COIL
from vendor_acme.bus import AcmeBus

from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.local.mosquitto import MosquittoInstance

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
SITE = "site-a"
ELDERSAFE = Path(sys.executable).with_name("eldersafe")  # the installed command
# The watcher needs server rights beside the commanding "server" client; where the
# broker names sessions after accounts, two clients of one account knock each other
# off, and the test support provides a second server account for watchers.
WATCHER = (
    ("server-2", support.SERVER_PASSWORDS["server-2"])
    if "server-2" in getattr(support, "SERVER_PASSWORDS", {})
    else ("server", SERVER_PASSWORD)
)


def edge_env() -> dict[str, str]:
    # The vendor package is importable the way an installed one would be; the
    # checkout first, so the edge runs this tree's code.
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {
        **os.environ,
        "PYTHONPATH": path,
        "EDGE_TEST_PASSWORD": GATEWAY_PASSWORDS["gw-site-a"],
    }


def site_file(tmp_path: Path, broker_port: int, bus_url: str, plugins: list[str]) -> Path:
    config: dict[str, Any] = {
        "site": SITE,
        "gateway": "gw-a",
        "state_dir": str(tmp_path / "state"),
        "broker": {
            "port": broker_port,
            "username": "gw-site-a",
            "password_env": "EDGE_TEST_PASSWORD",
            "reconnect_max_s": 1,
        },
        "plugins": plugins,
        "telemetry": {"batch_s": 0.5},
        "drivers": [
            {
                "name": "kitchen-bus",
                "kind": "modbus",
                "port": bus_url,
                "request_timeout_s": 0.2,
                "devices": [
                    {
                        "id": "smoke-acme",
                        "address": "unit-7",
                        "profile": "acme-as200",
                        "poll_interval_s": 0.3,
                    }
                ],
            }
        ],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_acme_smoke_alarm_reaches_mqtt_as_an_event(
    broker: MosquittoInstance, tmp_path: Path
) -> None:
    bus = AcmeBus([7])
    url = await bus.start()
    collector = Collector(broker.port, *WATCHER, f"eldersafe/v1/{SITE}/#")

    def of(channel: str) -> list[dict[str, Any]]:
        return [
            json.loads(p)
            for t, p in list(collector.messages)
            if t == f"eldersafe/v1/{SITE}/smoke-acme/{channel}"
        ]

    # Without the plugin the edge does not know the profile, and says so.
    refused = await asyncio.create_subprocess_exec(
        *(ELDERSAFE, "edge", "--config", str(site_file(tmp_path, broker.port, url, []))),
        cwd=tmp_path,
        env=edge_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode != 0
    assert "unknown device profile 'acme-as200'" in stderr.decode(), stderr.decode()

    log = tmp_path / "edge.log"
    with log.open("wb") as out:
        edge = await asyncio.create_subprocess_exec(
            *[
                ELDERSAFE,
                "edge",
                "--config",
                str(site_file(tmp_path, broker.port, url, ["vendor_acme"])),
            ],
            cwd=tmp_path,
            env=edge_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await until(lambda: of("status") != [], 20, "the AS-200's status")
        assert of("status")[-1]["online"] is True
        await until(lambda: of("telemetry") != [], 10, "AS-200 telemetry")
        metrics = {r["metric"]: r for t in of("telemetry") for r in t["readings"]}
        assert metrics["smoke_density_db_m"]["value"] == 0.02
        assert metrics["temperature_c"]["value"] == 21.5
        assert metrics["battery_mv"]["unit"] == "mV"
        assert not [e for e in of("event") if e["type"] == "smoke"]

        bus.set_smoke(7, True)
        await until(lambda: any(e["type"] == "smoke" for e in of("event")), 10, "smoke event")
        (smoke,) = [e for e in of("event") if e["type"] == "smoke"]
        assert (smoke["phase"], smoke["profile"]) == ("raise", "acme-as200")
        assert smoke["data"]["smoke"] is True
        assert smoke["data"]["smoke_density_db_m"] == 0.45

        # Downlink through the vendor's map: hush is coil 0x0010 on this model.
        command = CommandPayload(
            v=1, command_id=uuid.uuid4(), action=CommandAction.HUSH, time=now_utc()
        )
        await asyncio.to_thread(
            publish_all,
            broker.port,
            "server",
            SERVER_PASSWORD,
            [(f"eldersafe/v1/{SITE}/smoke-acme/command", dump(command), 1)],
        )
        await until(lambda: bus.coil_writes != [], 10, "the hush coil write")
        assert bus.coil_writes == [(7, HUSH_COIL, True)]

        bus.set_smoke(7, False)
        await until(
            lambda: [e["phase"] for e in of("event") if e["type"] == "smoke"] == ["raise", "clear"],
            10,
            "smoke cleared",
        )
    finally:
        edge.terminate()
        await asyncio.wait_for(edge.wait(), 15)
        collector.close()
        await bus.stop()
        print(log.read_text()[-3000:])
