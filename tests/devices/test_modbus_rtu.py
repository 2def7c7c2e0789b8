"""es-ef1 / es-sd1 end to end: pymodbus RTU server (socket://) -> pymodbus client -> driver."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import ObservationCollector
from support import until as eventually

from device_drivers.modbus.driver import ModbusBusDriver, ModbusUnit
from device_drivers.model import (
    Command,
    CommandAction,
    CommandError,
    Condition,
    ConditionKind,
    LinkStatus,
    Observation,
    Occurrence,
    OccurrenceKind,
    Reading,
)
from simulators.modbus_sensors import ModbusSensorBus

EF, SD, EF2 = 1, 2, 3
POLL_S = 0.05

pytestmark = pytest.mark.timeout(30)


def Collector() -> ObservationCollector:
    return ObservationCollector(within_s=5.0)


def condition(address: str, kind: ConditionKind, active: bool) -> Callable[[Observation], bool]:
    return lambda o: (
        isinstance(o, Condition) and o.address == address and o.kind == kind and o.active is active
    )


@pytest.fixture
async def bus() -> AsyncIterator[ModbusSensorBus]:
    sensors = ModbusSensorBus({EF: "es-ef1", SD: "es-sd1", EF2: "es-ef1"})
    await sensors.start()
    try:
        yield sensors
    finally:
        await sensors.stop()


@contextlib.asynccontextmanager
async def running(
    url: str, **kw: Any
) -> AsyncIterator[tuple[ModbusBusDriver, ObservationCollector, asyncio.Task[None]]]:
    units = [
        ModbusUnit(EF, "es-ef1", POLL_S),
        ModbusUnit(SD, "es-sd1", POLL_S),
        ModbusUnit(EF2, "es-ef1", POLL_S),
    ]
    driver = ModbusBusDriver(url, units, request_timeout_s=0.1, **kw)
    sink = Collector()
    task = asyncio.create_task(driver.run(sink))
    await asyncio.wait_for(driver.connected.wait(), 5)
    try:
        yield driver, sink, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_first_poll_brings_every_unit_online_with_readings(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (_, sink, _task):
        for uid in (EF, SD, EF2):
            await sink.wait_for(condition(f"unit-{uid}", ConditionKind.OFFLINE, False))
        await sink.wait_for(lambda o: isinstance(o, Reading) and o.address == "unit-2")
        sd_readings = {
            o.metric: o for o in sink.items if isinstance(o, Reading) and o.address == "unit-2"
        }
        assert sd_readings["battery_pct"] == Reading("unit-2", "battery_pct", 95.0, "%")
        assert sd_readings["temperature_c"] == Reading("unit-2", "temperature_c", 21.5, "°C")
        assert LinkStatus("unit-2", online=True, battery=95) in sink.items
        ef_metrics = {
            o.metric for o in sink.items if isinstance(o, Reading) and o.address == "unit-1"
        }
        assert ef_metrics == {
            "residual_current_ma",
            "cable_temp_c_1",
            "cable_temp_c_2",  # 3 and 4 are not fitted in the simulator
            "voltage_v",
            "current_a",
            "power_w",
            "energy_kwh",
        }


async def test_leakage_creep_raises_residual_current(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (_, sink, _task):
        await sink.wait_for(condition("unit-1", ConditionKind.RESIDUAL_CURRENT, False))
        bus.start_script(
            bus.leakage_creep(EF, start_ma=100, end_ma=450, step_ma=50, interval_s=0.03)
        )
        alarm = await sink.wait_for(condition("unit-1", ConditionKind.RESIDUAL_CURRENT, True))
        assert alarm.data["residual_current_alarm"] is True
        assert alarm.data["residual_current_ma"] >= 300
        assert alarm.data["residual_current_threshold_ma"] == 300
        assert alarm.data["residual_current_early_warning"] is True
        await sink.wait_for(
            lambda o: (
                isinstance(o, Reading)
                and o == Reading("unit-1", "residual_current_ma", 450.0, "mA")
            )
        )
        # The early warning showed up before the alarm (250 mA >= 80 % of 300 mA).
        early = [
            o
            for o in sink.items
            if isinstance(o, Condition)
            and o.kind == ConditionKind.RESIDUAL_CURRENT
            and not o.active
            and o.data["residual_current_early_warning"]
        ]
        assert early, "expected an early warning below the alarm threshold"
        # The other detector on the bus stayed quiet.
        assert not [
            o for o in sink.items if isinstance(o, Condition) and o.address == "unit-3" and o.active
        ]


async def test_cable_heating_raises_cable_temperature(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (_, sink, _task):
        bus.start_script(bus.cable_heating(EF2, channel=2, end_c=80, step_c=10, interval_s=0.02))
        alarm = await sink.wait_for(condition("unit-3", ConditionKind.CABLE_TEMPERATURE, True))
        assert alarm.data["cable_temp_c_2"] >= 70.0
        await sink.wait_for(lambda o: o == Reading("unit-3", "cable_temp_c_2", 80.0, "°C"))


async def test_smoke_bit_raises_smoke(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (_, sink, _task):
        await sink.wait_for(condition("unit-2", ConditionKind.SMOKE, False))
        bus.set_smoke(SD, 0.3)
        smoke = await sink.wait_for(condition("unit-2", ConditionKind.SMOKE, True))
        assert smoke.data == {
            "smoke_alarm": True,
            "smoke_obscuration_db_m": 0.3,
            "temperature_c": 21.5,
            "silenced": False,
        }
        bus.set_smoke(SD, 0.0)
        mark = len(sink.items)
        await sink.wait_for(condition("unit-2", ConditionKind.SMOKE, False), start=mark)


async def test_maintenance_bits_and_test_button(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (driver, sink, _task):
        bus.set_status_bit(SD, 2)  # battery low
        bus.set_status_bit(SD, 3)  # tamper
        bus.set_status_bit(SD, 4)  # test button
        await sink.wait_for(condition("unit-2", ConditionKind.LOW_BATTERY, True))
        await sink.wait_for(condition("unit-2", ConditionKind.TAMPER, True))
        await sink.wait_for(lambda o: isinstance(o, Occurrence) and o.kind == OccurrenceKind.TEST)
        polls = driver.health[SD].polls
        await eventually(lambda: driver.health[SD].polls >= polls + 5)  # the bit stays set
        tests = [o for o in sink.items if isinstance(o, Occurrence)]
        assert len(tests) == 1, "a held test bit is one pulse"


async def test_unit_offline_after_three_failed_polls_then_back(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (driver, sink, _task):
        await sink.wait_for(condition("unit-2", ConditionKind.OFFLINE, False))
        bus.silence(SD)
        offline = await sink.wait_for(condition("unit-2", ConditionKind.OFFLINE, True))
        assert offline.data["failed_polls"] == 3
        assert LinkStatus("unit-2", online=False, battery=95) in sink.items
        # Its neighbours kept being polled while it was dead.
        mark = len(sink.items)
        await sink.wait_for(lambda o: isinstance(o, Reading) and o.address == "unit-1", start=mark)
        bus.resume(SD)
        mark = len(sink.items)
        await sink.wait_for(condition("unit-2", ConditionKind.OFFLINE, False), start=mark)
        offline_levels = [
            o.active
            for o in sink.items
            if isinstance(o, Condition)
            and o.address == "unit-2"
            and o.kind == ConditionKind.OFFLINE
        ]
        assert offline_levels == [False, True, False]
        assert driver.health[SD].consecutive_failures == 0
        assert driver.health[EF].failures == 0


async def test_hush_writes_coil_zero(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (driver, sink, _task):
        bus.set_smoke(SD, 0.5)
        await sink.wait_for(condition("unit-2", ConditionKind.SMOKE, True))
        await driver.execute(Command("unit-2", CommandAction.HUSH))
        assert [(w.unit, w.function, w.address, w.value) for w in bus.coil_writes()] == [
            (SD, "write_coil", 0, 1)
        ]
        mark = len(sink.items)
        silenced = await sink.wait_for(
            lambda o: (
                isinstance(o, Condition)
                and condition("unit-2", ConditionKind.SMOKE, True)(o)
                and o.data["silenced"] is True
            ),
            start=mark,
        )
        assert silenced.active  # hushed, but the smoke is still there


async def test_threshold_write_lands(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (driver, sink, _task):
        await driver.execute(
            Command(
                "unit-1",
                CommandAction.SET_THRESHOLD,
                {"register": "residual_current_threshold", "value": 500},
            )
        )
        await driver.execute(
            Command(
                "unit-1",
                CommandAction.SET_THRESHOLD,
                {"register": "temperature_threshold", "value": 650},
            )
        )
        assert [(w.unit, w.function, w.address, w.value) for w in bus.register_writes()] == [
            (EF, "write_register", 11, 500),
            (EF, "write_register", 12, 650),
        ]
        assert bus.get_register(EF, 11) == 500
        mark = len(sink.items)
        rc = await sink.wait_for(
            lambda o: (
                isinstance(o, Condition)
                and o.address == "unit-1"
                and o.kind == ConditionKind.RESIDUAL_CURRENT
            ),
            start=mark,
        )
        assert rc.data["residual_current_threshold_ma"] == 500
        # 450 mA is now under the raised threshold: the detector no longer alarms.
        bus.set_residual_current(EF, 450)
        mark = len(sink.items)
        rc = await sink.wait_for(
            lambda o: (
                isinstance(o, Condition)
                and o.address == "unit-1"
                and o.kind == ConditionKind.RESIDUAL_CURRENT
                and o.data["residual_current_ma"] == 450
            ),
            start=mark,
        )
        assert rc.active is False and rc.data["residual_current_early_warning"] is True


async def test_bad_commands(bus: ModbusSensorBus) -> None:
    async with running(bus.url) as (driver, _, _task):
        for command in (
            Command("unit-9", CommandAction.HUSH),
            Command("sensor-1", CommandAction.HUSH),
            Command("unit-1", CommandAction.ACKNOWLEDGE),
            Command("unit-1", CommandAction.SET_THRESHOLD, {"register": "voltage", "value": 1}),
            Command(
                "unit-1",
                CommandAction.SET_THRESHOLD,
                {"register": "temperature_threshold", "value": 70000},
            ),
        ):
            with pytest.raises(CommandError) as err:
                await driver.execute(command)
            assert not err.value.recoverable, command
        assert bus.writes == []
        # A unit that does not answer: the write cannot be confirmed, try again later.
        bus.silence(SD)
        with pytest.raises(CommandError) as err:
            await driver.execute(Command("unit-2", CommandAction.HUSH))
        assert err.value.recoverable


async def test_run_raises_when_the_port_cannot_open() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    driver = ModbusBusDriver(f"socket://127.0.0.1:{port}", [ModbusUnit(1, "es-ef1")])
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(driver.run(Collector()), 5)


async def test_execute_before_run_is_recoverable() -> None:
    driver = ModbusBusDriver("socket://127.0.0.1:1", [ModbusUnit(1, "es-ef1")])
    with pytest.raises(CommandError) as err:
        await driver.execute(Command("unit-1", CommandAction.HUSH))
    assert err.value.recoverable


async def test_run_raises_when_the_bus_goes_away() -> None:
    sensors = ModbusSensorBus({EF: "es-ef1"})
    url = await sensors.start()
    driver = ModbusBusDriver(url, [ModbusUnit(EF, "es-ef1", POLL_S)], request_timeout_s=0.1)
    sink = Collector()
    task = asyncio.create_task(driver.run(sink))
    await sink.wait_for(lambda o: isinstance(o, Reading))
    await sensors.stop()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(task, 5)
    assert not driver.connected.is_set()
