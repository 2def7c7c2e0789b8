"""Command results end to end: a command from the server account → the edge → the device →
a result on ``…/{device}/command/result``, against the simulated devices at their transports.

Every command id ends in one result: executed (via the driver that carried it),
refused (with the reason, before anything reaches the wire) or unreachable. The
simulators record what reached the device, so a refusal is seen to have written
nothing: an es-ef1 has no hush coil, and its coil stays untouched.
"""

# The fixture ``edge`` comes from test_edge.py; tests take it as an argument.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import SERVER_PASSWORD, publish_all
from test_edge import EdgeProcess, SessionCollector, edge, health, until  # noqa: F401

from device_drivers.wristband import gatt
from gateway.broker_auth import BrokerAccount, hash_password
from gateway.contract.payloads import (
    CommandAction,
    CommandPayload,
    CommandResultPayload,
    dump,
    now_utc,
)
from gateway.local.mosquitto import MosquittoInstance
from gateway.simulate import BrokerLogin, simulation
from simulators.modbus_sensors import ModbusSensorBus
from simulators.scenario import Scenario, ScenarioDevice

pytestmark = pytest.mark.timeout(120)

SITE, GATEWAY = "site-a", "gw-site-a"
GATEWAY_SECRET = "command-results-gateway-secret"
WATCHER = ("watcher", "command-results-watcher-secret")  # server rights, its own session
BUTTON_ID = 0x00C0FFEE
SCENARIO = Scenario(
    name="command-results",
    title="Staff answer alarms: every command gets a result",
    site=SITE,
    gateway=GATEWAY,
    duration_s=1,
    devices=[
        ScenarioDevice(id="receiver-1", kind="receiver"),
        ScenarioDevice(id="btn-1", kind="button", button_id=BUTTON_ID),
        ScenarioDevice(id="wb-1", kind="wristband", address="C0:4E:57:00:00:07"),
        ScenarioDevice(id="sd-1", kind="smoke_detector", unit=1),
        ScenarioDevice(id="ef-2", kind="electrical_detector", unit=2),
    ],
)


@pytest.fixture
def results_broker(service_dir: Path) -> Iterator[MosquittoInstance]:
    broker = MosquittoInstance(service_dir / "mqtt")
    broker.configure(
        [
            BrokerAccount("server", hash_password(SERVER_PASSWORD), None),
            BrokerAccount(WATCHER[0], hash_password(WATCHER[1]), None),
            BrokerAccount(GATEWAY, hash_password(GATEWAY_SECRET), SITE),
        ]
    )
    broker.start()
    yield broker
    broker.stop()


def command(action: CommandAction, **args: Any) -> CommandPayload:
    return CommandPayload(
        v=1,
        command_id=uuid.uuid4(),
        action=action,
        time=now_utc(),
        args=args,
        alert_id=uuid.uuid4(),
    )


async def send(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish as the server account does (QoS 1), each acknowledged by the broker."""
    rcs = await asyncio.to_thread(
        publish_all,
        port,
        "server",
        SERVER_PASSWORD,
        [(f"eldersafe/v1/{SITE}/{device}/command", payload, 1) for device, payload in messages],
    )
    assert rcs == [0] * len(messages)


class Results:
    """Command results as they arrive, through a subscriber of its own."""

    def __init__(self, port: int) -> None:
        self.collector = SessionCollector(port, f"eldersafe/v1/{SITE}/+/command/result", WATCHER)

    def of(self, command_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
        return self.collector.results(command_id)

    async def wait(self, command_id: uuid.UUID, within_s: float = 20) -> dict[str, Any]:
        await until(lambda: self.of(command_id) != [], within_s, f"the result of {command_id}")
        device, result = self.of(command_id)[0]
        CommandResultPayload.model_validate_json(json.dumps(result))  # the contract's model
        return {"device": device, **result}


async def test_each_command_ends_in_one_result_and_only_allowed_actions_reach_a_device(
    results_broker: MosquittoInstance, tmp_path: Path
) -> None:
    results = Results(results_broker.port)
    login = BrokerLogin("127.0.0.1", results_broker.port, GATEWAY, GATEWAY_SECRET)
    log = tmp_path / "edge.log"
    state = tmp_path / "sim"
    try:
        async with simulation(SCENARIO, login, state, log_path=log) as sim:
            await sim.wait_ready()
            receiver = sim.site.receivers["receiver-1"]
            band = sim.site.wristbands["wb-1"]
            bus = sim.site.bus
            assert bus is not None

            ack_button = command(CommandAction.ACKNOWLEDGE)
            locate_band = command(CommandAction.LOCATE)
            hush_smoke = command(CommandAction.HUSH)
            hush_electrical = command(CommandAction.HUSH)  # es-ef1 has no hush coil
            hush_band = command(CommandAction.HUSH)  # nor has a wristband
            for_nobody = command(CommandAction.ACKNOWLEDGE)
            broken_id = uuid.uuid4()
            broken = json.dumps(
                {"v": 1, "command_id": str(broken_id), "action": "acknowledge", "time": "soon"}
            ).encode()
            await send(
                results_broker.port,
                [
                    ("btn-1", dump(ack_button)),
                    ("wb-1", dump(locate_band)),
                    ("sd-1", dump(hush_smoke)),
                    ("ef-2", dump(hush_electrical)),
                    ("wb-1", dump(hush_band)),
                    ("nobody", dump(for_nobody)),
                    ("btn-1", broken),
                ],
            )

            # Executed: the device did it, and the result says through which driver.
            result = await results.wait(ack_button.command_id)
            assert (result["device"], result["outcome"], result["via"]) == (
                "btn-1",
                "executed",
                "receiver-1",
            )
            assert result["action"] == "acknowledge"
            assert result["alert_id"] == str(ack_button.alert_id)
            assert [(a.button_id, a.pattern) for a in receiver.acks] == [(BUTTON_ID, 2)]

            result = await results.wait(locate_band.command_id)
            assert (result["outcome"], result["via"]) == ("executed", "ble"), result
            assert [c.data for c in band.commands] == [gatt.encode_locate()]

            result = await results.wait(hush_smoke.command_id)
            assert (result["outcome"], result["via"]) == ("executed", "rs485"), result
            assert [(w.address, w.value) for w in bus.coil_writes(1)] == [(0, 1)]

            # Refused before the wire: the profile does not list the action.
            result = await results.wait(hush_electrical.command_id)
            assert result["outcome"] == "refused" and "via" not in result, result
            assert result["reason"] == "es-ef1 cannot hush (it can: set_threshold)"
            result = await results.wait(hush_band.command_id)
            assert result["outcome"] == "refused", result
            assert result["reason"].startswith("es-wb1 cannot hush"), result

            result = await results.wait(for_nobody.command_id)
            assert (result["device"], result["outcome"]) == ("nobody", "refused")
            assert "unknown device" in result["reason"]

            result = await results.wait(broken_id)
            assert result["outcome"] == "refused" and "invalid payload" in result["reason"]

            # A redelivered id is answered again from the ledger, not carried out again.
            await send(results_broker.port, [("btn-1", dump(ack_button))])
            await until(lambda: len(results.of(ack_button.command_id)) == 2, 20, "second answer")
            first, second = (r for _, r in results.of(ack_button.command_id))
            assert first == second  # the recorded result, byte for byte the same answer
            assert len(receiver.acks) == 1
            assert bus.coil_writes(2) == []  # the es-ef1 was never written
            assert sim.edge.returncode is None
    finally:
        results.collector.close()
        shutil.rmtree(state, ignore_errors=True)


async def test_a_taken_command_is_carried_out_after_a_crash_and_its_result_waits_out_the_broker(
    results_broker: MosquittoInstance, edge: Any, tmp_path: Path
) -> None:
    """Taken and acknowledged, then the edge dies mid-retry and the broker goes away: the
    restarted edge carries it out from its ledger, and the result leaves when the broker
    is back."""
    bus = ModbusSensorBus({1: "es-sd1"})
    url = await bus.start()
    config = {
        "site": SITE,
        "gateway": GATEWAY,
        "state_dir": str(tmp_path / "edge-state"),
        "broker": {
            "port": results_broker.port,
            "username": GATEWAY,
            "password": GATEWAY_SECRET,
            "keepalive_s": 5,
            "reconnect_max_s": 1,
        },
        "drivers": [
            {
                "name": "rs485",
                "kind": "modbus",
                "port": url,
                "request_timeout_s": 0.2,
                "devices": [
                    {"id": "sd-1", "address": "unit-1", "profile": "es-sd1", "poll_interval_s": 0.3}
                ],
            }
        ],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    results = Results(results_broker.port)
    process: EdgeProcess = edge(path)
    pid = process.start()
    hush = command(CommandAction.HUSH)
    try:
        await until(
            lambda: (
                health(tmp_path).get("pid") == pid
                and health(tmp_path).get("mqtt", {}).get("subscribed") is True
            ),
            20,
            "the edge subscribed",
        )
        bus.silence(1)  # the detector stops answering: the hush is retried
        await send(results_broker.port, [("sd-1", dump(hush))])
        retrying = f"command {hush.command_id} hush on sd-1: attempt 1 failed".encode()
        await until(lambda: retrying in process.log.read_bytes(), 20, "the first attempt failed")
        process.kill()  # taken (acknowledged to the broker), not answered
        await asyncio.to_thread(results_broker.stop)

        bus.resume(1)
        pid = process.start()  # no broker: the edge works from its ledger
        await until(lambda: bus.coil_writes(1) != [], 20, "the hush carried out after the crash")
        await until(
            lambda: (
                health(tmp_path).get("pid") == pid
                and health(tmp_path).get("commands", {}).get("executed") == 1
                and health(tmp_path).get("outbox_pending", 0) >= 1
            ),
            10,
            "the result waiting in the outbox",
        )
        assert results.of(hush.command_id) == []

        await asyncio.to_thread(results_broker.start)
        result = await results.wait(hush.command_id, 30)
        assert (result["outcome"], result["via"]) == ("executed", "rs485"), result
        assert [(w.address, w.value) for w in bus.coil_writes(1)] == [(0, 1)]
        assert len(results.of(hush.command_id)) == 1
    finally:
        results.collector.close()
        process.stop()
        await bus.stop()
        print(process.tail())
