"""Scenarios end to end: simulators at their transports → a real edge process → the real broker."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support import SERVER_PASSWORD, Collector, publish_all

from gateway.broker_auth import BrokerAccount, hash_password
from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.local.mosquitto import MosquittoInstance
from gateway.simulate import BrokerLogin, simulation
from simulators.scenario import Scenario, all_scenarios, load_scenario

GATEWAY_SECRET = "scenario-gateway-secret"


@pytest.fixture
def scenario_broker(service_dir: Path) -> Iterator[MosquittoInstance]:
    accounts = [BrokerAccount("server", hash_password(SERVER_PASSWORD), None)]
    for name in all_scenarios():
        sc = load_scenario(name)
        accounts.append(BrokerAccount(sc.gateway, hash_password(GATEWAY_SECRET), sc.site))
    broker = MosquittoInstance(service_dir / "mqtt")
    broker.configure(accounts)
    broker.start()
    yield broker
    broker.stop()


def events(collector: Collector) -> list[tuple[str, dict[str, object]]]:
    return [
        (topic.split("/")[3], orjson.loads(payload))
        for topic, payload in list(collector.messages)
        if topic.endswith("/event")
    ]


def matches(expected: dict[str, str], device: str, event: dict[str, object]) -> bool:
    return device == expected["device"] and all(
        event.get(k) == v for k, v in expected.items() if k != "device"
    )


async def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def run(
    scenario: Scenario, broker: MosquittoInstance, state: Path, log: Path, collector: Collector
) -> None:
    login = BrokerLogin("127.0.0.1", broker.port, scenario.gateway, GATEWAY_SECRET)
    async with simulation(scenario, login, state, log_path=log) as sim:
        birth = f"eldersafe/v1/{scenario.site}/gateway/{scenario.gateway}/status"
        await wait_until(
            lambda: any(t == birth for t, _ in collector.messages),
            20,
            f"the edge's birth message; edge log:\n{log.read_text()[-3000:]}",
        )
        await asyncio.sleep(1.0)  # drivers open their ports; BLE scans
        await sim.play(speed=1.0)

        def all_expected() -> bool:
            got = events(collector)
            return all(any(matches(e, d, ev) for d, ev in got) for e in scenario.expect)

        await wait_until(
            all_expected,
            30,
            f"{scenario.expect}; got {events(collector)}; edge log:\n{log.read_text()[-3000:]}",
        )
        assert sim.edge.returncode is None, "the edge process died"


@pytest.mark.parametrize("name", all_scenarios())
async def test_scenario_produces_its_events_exactly_once(
    name: str, scenario_broker, tmp_path
) -> None:
    scenario = load_scenario(name)
    watcher = Collector(
        scenario_broker.port, "server", SERVER_PASSWORD, f"eldersafe/v1/{scenario.site}/#"
    )
    state = Path(tmp_path) / "sim"
    try:
        await run(scenario, scenario_broker, state, tmp_path / "edge.log", watcher)
        await asyncio.sleep(1.0)  # late duplicates would arrive now
        got = events(watcher)
        for expected in scenario.expect:
            hits = [ev for d, ev in got if matches(expected, d, ev)]
            assert len(hits) == 1, (
                f"{expected}: {len(hits)} events (one physical event = one event)"
            )
        ids = [ev["event_id"] for _, ev in got]
        assert len(ids) == len(set(ids))
    finally:
        watcher.close()
        shutil.rmtree(state, ignore_errors=True)


async def test_downlink_acknowledge_reaches_the_wristband_and_the_button(
    scenario_broker, tmp_path
) -> None:
    """Staff acknowledge: the wristband records command 0x01 and the receiver a 0x81 frame."""
    scenario = load_scenario("fall-at-home-at-night")
    watcher = Collector(
        scenario_broker.port, "server", SERVER_PASSWORD, f"eldersafe/v1/{scenario.site}/#"
    )
    login = BrokerLogin("127.0.0.1", scenario_broker.port, scenario.gateway, GATEWAY_SECRET)
    log = tmp_path / "edge.log"
    try:
        async with simulation(scenario, login, tmp_path / "sim", log_path=log) as sim:
            birth = f"eldersafe/v1/{scenario.site}/gateway/{scenario.gateway}/status"
            await wait_until(lambda: any(t == birth for t, _ in watcher.messages), 20, "birth")
            band = sim.site.wristbands["wb-wang"]
            await band.fall(confidence=95)
            await wait_until(
                lambda: any(ev.get("type") == "fall" for _, ev in events(watcher)),
                20,
                f"the fall; log:\n{log.read_text()[-3000:]}",
            )
            for device in ("wb-wang", "btn-wang-bed"):
                cmd = CommandPayload(
                    v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=now_utc()
                )
                await asyncio.to_thread(
                    publish_all,
                    scenario_broker.port,
                    "server",
                    SERVER_PASSWORD,
                    [(f"eldersafe/v1/{scenario.site}/{device}/command", dump(cmd), 1)],
                )
            receiver = sim.site.receivers["receiver-wang"]
            await wait_until(
                lambda: any(c.data[:1] == b"\x01" for c in band.commands),
                20,
                f"0x01 at the wristband; log:\n{log.read_text()[-3000:]}",
            )
            await wait_until(lambda: len(receiver.acks) >= 1, 20, "0x81 at the receiver")
            ack = receiver.acks[0]
            assert ack.button_id == 0x0001E240 and ack.pattern == 2  # "help is coming"
    finally:
        watcher.close()


async def test_modbus_telemetry_flows_while_the_alarms_arrive(scenario_broker, tmp_path) -> None:
    scenario = load_scenario("leakage-creeping-up")
    watcher = Collector(
        scenario_broker.port, "server", SERVER_PASSWORD, f"eldersafe/v1/{scenario.site}/#"
    )
    try:
        await run(scenario, scenario_broker, tmp_path / "sim", tmp_path / "edge.log", watcher)
        readings = [
            reading
            for topic, payload in list(watcher.messages)
            if topic == f"eldersafe/v1/{scenario.site}/ef-zhao/telemetry"
            for reading in orjson.loads(payload)["readings"]
        ]
        leakage = [r["value"] for r in readings if r["metric"] == "residual_current_ma"]
        assert len(leakage) >= 5 and max(leakage) >= 300
        assert {"voltage_v", "current_a", "cable_temp_c_1"} <= {r["metric"] for r in readings}
    finally:
        watcher.close()


async def test_a_receiver_silent_for_90_s_is_reported_offline(scenario_broker, tmp_path) -> None:
    """The real default (90 s, DEVICES.md §2), through the edge process, not a shortened timer."""
    scenario = load_scenario("fall-at-home-at-night")
    topic = f"eldersafe/v1/{scenario.site}/receiver-wang/event"
    watcher = Collector(scenario_broker.port, "server", SERVER_PASSWORD, topic)
    login = BrokerLogin("127.0.0.1", scenario_broker.port, scenario.gateway, GATEWAY_SECRET)
    try:
        async with simulation(
            scenario, login, tmp_path / "sim", log_path=tmp_path / "e.log"
        ) as sim:
            receiver = sim.site.receivers["receiver-wang"]
            await asyncio.sleep(3)  # the edge has read the receiver's first frames
            await receiver.send_status()
            receiver.go_silent()
            silent_at = asyncio.get_running_loop().time()

            def offline() -> list[dict[str, object]]:
                return [
                    ev
                    for _, ev in events(watcher)
                    if ev["type"] == "device_offline" and ev["phase"] == "raise"
                ]

            await wait_until(lambda: bool(offline()), 120, "the receiver's offline event")
            elapsed = asyncio.get_running_loop().time() - silent_at
            assert 85 <= elapsed <= 110, f"reported offline after {elapsed:.0f} s of silence"
            receiver.resume()
            await receiver.send_status()
            await wait_until(
                lambda: any(
                    ev["type"] == "device_offline" and ev["phase"] == "clear"
                    for _, ev in events(watcher)
                ),
                20,
                "back online",
            )
            assert len(offline()) == 1
    finally:
        watcher.close()
