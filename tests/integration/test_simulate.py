"""Scenarios end to end: simulators at their transports → a real edge process → the real broker."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from support import SERVER_PASSWORD, Collector, publish_all
from support import until as wait_until

from gateway.broker_auth import BrokerAccount, hash_password
from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.local.mosquitto import MosquittoInstance
from gateway.simulate import BrokerLogin, RunningSimulation, simulation
from simulators.scenario import Scenario, all_scenarios, load_scenario

GATEWAY_SECRET = "scenario-gateway-secret"
# The broker names sessions after accounts: the watching subscriber has an account of its
# own (server rights), so the commands the tests publish as "server" do not knock it off.
WATCHER = ("watcher", "scenario-watcher-secret")


@pytest.fixture
def scenario_broker(service_dir: Path) -> Iterator[MosquittoInstance]:
    accounts = [
        BrokerAccount("server", hash_password(SERVER_PASSWORD), None),
        BrokerAccount(WATCHER[0], hash_password(WATCHER[1]), None),
    ]
    for name in all_scenarios():
        sc = load_scenario(name)
        accounts.append(BrokerAccount(sc.gateway, hash_password(GATEWAY_SECRET), sc.site))
    broker = MosquittoInstance(service_dir / "mqtt")
    broker.configure(accounts)
    broker.start()
    yield broker
    broker.stop()


def watch(broker: MosquittoInstance, topic: str) -> Collector:
    return Collector(broker.port, *WATCHER, topic)


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


async def run(
    scenario: Scenario,
    broker: MosquittoInstance,
    state: Path,
    log: Path,
    collector: Collector,
    *,
    also: tuple[Callable[[], bool], str] | None = None,
) -> None:
    """Play ``scenario`` until its events (and ``also``, a condition) have arrived."""
    login = BrokerLogin("127.0.0.1", broker.port, scenario.gateway, GATEWAY_SECRET)
    async with simulation(scenario, login, state, log_path=log) as sim:
        birth = f"eldersafe/v1/{scenario.site}/gateway/{scenario.gateway}/status"
        await wait_until(
            lambda: any(t == birth for t, _ in collector.messages),
            20,
            f"the edge's birth message; edge log:\n{log.read_text()[-3000:]}",
        )
        await sim.wait_ready()  # drivers have their ports open and hear their devices
        await sim.play(speed=1.0)

        def all_expected() -> bool:
            got = events(collector)
            return all(any(matches(e, d, ev) for d, ev in got) for e in scenario.expect)

        await wait_until(
            all_expected,
            30,
            f"{scenario.expect}; got {events(collector)}; edge log:\n{log.read_text()[-3000:]}",
        )
        await settled(sim, broker, collector)
        if also is not None:
            await wait_until(also[0], 30, also[1])
        assert sim.edge.returncode is None, "the edge process died"


async def settled(sim: RunningSimulation, broker: MosquittoInstance, collector: Collector) -> None:
    """Until everything the edge has heard so far has arrived at ``collector``.

    Each driver is heard once more (receivers are asked for a status frame, which
    follows every earlier frame on the line; Modbus units are polled; wristbands
    advertise a new battery level), so whatever came before has passed the outbox's ledgers. Then a
    command for a device the site does not have is refused: its result joins the
    outbox behind every event queued before it, and the broker keeps the edge's
    order, so once the result is here, so is every event (and any duplicate).
    """
    before = {name: d["observations"] for name, d in sim.health()["drivers"].items()}

    def heard_again() -> bool:
        drivers = sim.health().get("drivers", {})
        return all(drivers[name]["observations"] > n for name, n in before.items())

    for receiver in sim.site.receivers.values():
        await receiver.send_status()
    for band in sim.site.wristbands.values():
        await band.set_battery(band.battery - 1)  # a changed advert: a new link status
    await wait_until(heard_again, 20, "every driver heard again")
    marker = CommandPayload(
        v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=now_utc()
    )
    site = sim.site.scenario.site
    await asyncio.to_thread(
        publish_all,
        broker.port,
        "server",
        SERVER_PASSWORD,
        [(f"eldersafe/v1/{site}/no-such-device/command", dump(marker), 1)],
    )
    await wait_until(
        lambda: result_of(collector, marker.command_id) is not None,
        20,
        "the marker command's result",
    )


def result_of(collector: Collector, command_id: uuid.UUID) -> dict[str, object] | None:
    for topic, payload in list(collector.messages):
        if topic.endswith("/command/result"):
            result = orjson.loads(payload)
            if result["command_id"] == str(command_id):
                return dict(result)
    return None


@pytest.mark.parametrize("name", all_scenarios())
async def test_scenario_produces_its_events_exactly_once(
    name: str, scenario_broker, tmp_path
) -> None:
    scenario = load_scenario(name)
    watcher = watch(scenario_broker, f"eldersafe/v1/{scenario.site}/#")
    state = Path(tmp_path) / "sim"
    try:
        # run() waits until late duplicates (repeats, second receivers) would have arrived
        await run(scenario, scenario_broker, state, tmp_path / "edge.log", watcher)
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
    watcher = watch(scenario_broker, f"eldersafe/v1/{scenario.site}/#")
    login = BrokerLogin("127.0.0.1", scenario_broker.port, scenario.gateway, GATEWAY_SECRET)
    log = tmp_path / "edge.log"
    try:
        async with simulation(scenario, login, tmp_path / "sim", log_path=log) as sim:
            await sim.wait_ready()
            band = sim.site.wristbands["wb-wang"]
            await band.fall(confidence=95)
            await wait_until(
                lambda: any(ev.get("type") == "fall" for _, ev in events(watcher)),
                20,
                f"the fall; log:\n{log.read_text()[-3000:]}",
            )
            sent: dict[str, uuid.UUID] = {}
            for device in ("wb-wang", "btn-wang-bed"):
                cmd = CommandPayload(
                    v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=now_utc()
                )
                sent[device] = cmd.command_id
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
            # ... and the console learns it: a result per command, naming the driver
            for device, via in (("wb-wang", "ble"), ("btn-wang-bed", "receiver-wang")):
                await wait_until(
                    lambda: result_of(watcher, sent[device]) is not None,  # noqa: B023
                    20,
                    f"the result for {device}",
                )
                result = result_of(watcher, sent[device])
                assert result is not None
                assert (result["outcome"], result["via"]) == ("executed", via), result
    finally:
        watcher.close()


async def test_modbus_telemetry_flows_while_the_alarms_arrive(scenario_broker, tmp_path) -> None:
    scenario = load_scenario("leakage-creeping-up")
    watcher = watch(scenario_broker, f"eldersafe/v1/{scenario.site}/#")

    def readings() -> list[dict[str, float | str]]:
        return [
            reading
            for topic, payload in list(watcher.messages)
            if topic == f"eldersafe/v1/{scenario.site}/ef-zhao/telemetry"
            for reading in orjson.loads(payload)["readings"]
        ]

    def leakage() -> list[float]:
        return [float(r["value"]) for r in readings() if r["metric"] == "residual_current_ma"]

    try:
        await run(
            scenario,
            scenario_broker,
            tmp_path / "sim",
            tmp_path / "edge.log",
            watcher,
            also=(lambda: len(leakage()) >= 5 and max(leakage()) >= 300, "5 leakage readings"),
        )
        assert len(leakage()) >= 5 and max(leakage()) >= 300
        metrics = {r["metric"] for r in readings()}
        assert {"voltage_v", "current_a", "cable_temp_c_1"} <= metrics
    finally:
        watcher.close()


async def test_a_receiver_silent_for_90_s_is_reported_offline(scenario_broker, tmp_path) -> None:
    """The real default (90 s, DEVICES.md §2), through the edge process, not a shortened timer."""
    scenario = load_scenario("fall-at-home-at-night")
    topic = f"eldersafe/v1/{scenario.site}/receiver-wang/event"
    watcher = watch(scenario_broker, topic)
    login = BrokerLogin("127.0.0.1", scenario_broker.port, scenario.gateway, GATEWAY_SECRET)
    try:
        async with simulation(
            scenario, login, tmp_path / "sim", log_path=tmp_path / "e.log"
        ) as sim:
            receiver = sim.site.receivers["receiver-wang"]
            await sim.wait_ready()  # the edge reads the receiver
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
