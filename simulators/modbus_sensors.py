"""A virtual RS-485 bus of es-ef1 and es-sd1 detectors (DEVICES.md section 3).

A pymodbus RTU server (RTU framing over TCP, ``socket://127.0.0.1:PORT``, which
pyserial and the pymodbus serial client open like a serial port) hosts several
units. Their registers live in this module's own model and are copied into
pymodbus's datastore by the per-device ``action`` hook on every access, so
tests and scripts change a value with one call and the next poll sees it.

Written from DEVICES.md alone: nothing here imports ``device_drivers``.

    bus = ModbusSensorBus({1: "es-ef1", 2: "es-sd1"})
    url = await bus.start()          # socket://127.0.0.1:PORT for the driver
    bus.set_register(1, 1, 450)      # residual current 450 mA -> alarm bit set
    bus.silence(2); bus.resume(2)    # unit 2 stops answering, then answers
    await bus.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

__all__ = ["EF1", "SD1", "ModbusSensorBus", "WriteRecord"]

log = logging.getLogger(__name__)

EF1 = "es-ef1"
SD1 = "es-sd1"

# es-ef1 registers
EF_STATUS, EF_RESIDUAL, EF_TEMP1, EF_VOLTAGE, EF_CURRENT, EF_POWER = 0, 1, 2, 6, 7, 8
EF_ENERGY_HI, EF_ENERGY_LO, EF_RC_THRESHOLD, EF_TEMP_THRESHOLD = 9, 10, 11, 12
EF_RESIDUAL_ALARM, EF_TEMP_ALARM, EF_OVER_CURRENT, EF_FAULT, EF_OPEN_CIRCUIT = 0, 1, 2, 3, 4
NOT_FITTED = 0x8000
# es-sd1 registers
SD_STATUS, SD_OBSCURATION, SD_TEMPERATURE, SD_BATTERY, SD_FIRMWARE = 0, 1, 2, 3, 4
SD_SMOKE, SD_FAULT, SD_BATTERY_LOW, SD_TAMPER, SD_TEST, SD_SILENCED = 0, 1, 2, 3, 4, 5

_REGISTER_COUNT = {EF1: 13, SD1: 5}
_FC_NAMES = {5: "write_coil", 6: "write_register", 15: "write_coils", 16: "write_registers"}


def _u16(value: int) -> int:
    """int16 or uint16 -> register word."""
    if not -0x8000 <= value <= 0xFFFF:
        raise ValueError(f"{value} does not fit a 16-bit register")
    return value & 0xFFFF


def _defaults(profile: str) -> list[int]:
    if profile == EF1:
        regs = [0] * 13
        regs[EF_RESIDUAL] = 100
        regs[EF_TEMP1 : EF_TEMP1 + 4] = [250, 260, NOT_FITTED, NOT_FITTED]
        regs[EF_VOLTAGE] = 2300
        regs[EF_CURRENT] = 520
        regs[EF_POWER] = 1150
        regs[EF_ENERGY_HI], regs[EF_ENERGY_LO] = 0x0001, 0x86A0  # 1000.00 kWh
        regs[EF_RC_THRESHOLD] = 300
        regs[EF_TEMP_THRESHOLD] = 700
        return regs
    if profile == SD1:
        return [0, 2, 215, 95, 0x0103]
    raise ValueError(f"unknown profile {profile!r}")


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """A write the gateway made: function 5 (coil) or 6 (register)."""

    unit: int
    function: str  # "write_coil" | "write_register" | ...
    address: int
    value: int  # coil: 1/0
    at: float


class _Unit:
    def __init__(self, unit_id: int, profile: str) -> None:
        self.unit_id = unit_id
        self.profile = profile
        self.registers = _defaults(profile)
        self.coils = [False] * 16
        self.auto_alarms = True  # es-ef1 sets its own alarm bits from thresholds
        self.silent = False
        self.hush_until = 0.0


class ModbusSensorBus:
    """Several simulated detectors on one Modbus RTU line."""

    def __init__(
        self,
        units: Mapping[int, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hush_duration_s: float = 600.0,
    ) -> None:
        """``units``: unit id -> "es-ef1" | "es-sd1". ``port=0`` picks a free TCP port."""
        self._units = {uid: _Unit(uid, profile) for uid, profile in units.items()}
        self._host = host
        self._port = port
        self.hush_duration_s = hush_duration_s
        self.writes: list[WriteRecord] = []
        self.requests_dropped = 0
        self._server: ModbusSerialServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> str:
        """Start serving; returns the ``socket://`` URL a Modbus RTU client opens."""
        devices = [
            SimDevice(
                id=uid,
                simdata=(
                    [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                    [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                    [SimData(0, values=list(u.registers), datatype=DataType.REGISTERS)],
                    [SimData(0, values=[0], datatype=DataType.REGISTERS)],
                ),
                action=partial(self._action, uid),
            )
            for uid, u in self._units.items()
        ]
        # id 0 catches requests to absent units; _trace_packet drops its replies so an
        # absent unit is silent, as on a real RS-485 line.
        devices.append(
            SimDevice(id=0, simdata=[SimData(0, values=[0], datatype=DataType.REGISTERS)])
        )
        self._server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=f"socket://{self._host}:{self._port}",
            baudrate=9600,
            trace_packet=self._trace_packet,
        )
        await self._server.serve_forever(background=True)
        listener = self._server.transport
        sockets = getattr(listener, "sockets", None)
        if sockets:
            self._port = sockets[0].getsockname()[1]
        self.url = f"socket://{self._host}:{self._port}"
        return self.url

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def __aenter__(self) -> ModbusSensorBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the wire --------------------------------------------------------------------

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Drop replies of silenced or absent units: on RS-485 they simply never answer."""
        if sending and data:
            unit = self._units.get(data[0])
            if unit is None or unit.silent:
                self.requests_dropped += 1
                return b""
        return data

    async def _action(
        self,
        unit_id: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Keep pymodbus's datastore in step with our model; record writes."""
        unit = self._units[unit_id]
        if unit.silent:
            return None  # its reply is dropped in _trace_packet; a dead unit changes nothing
        if function_code in (3, 6, 16):
            self._refresh(unit)
            n = min(len(unit.registers), len(current_registers))
            current_registers[:n] = unit.registers[:n]
            if set_values is not None:
                for i, value in enumerate(set_values):
                    reg = address + i
                    self._record(
                        unit, _FC_NAMES.get(function_code, str(function_code)), reg, int(value)
                    )
                    if reg < len(unit.registers):
                        unit.registers[reg] = int(value) & 0xFFFF
                self._refresh(unit)
        elif function_code in (5, 15) and set_values is not None:
            for i, value in enumerate(set_values):
                coil = address + i
                self._record(
                    unit, _FC_NAMES.get(function_code, str(function_code)), coil, int(bool(value))
                )
                if coil < len(unit.coils):
                    unit.coils[coil] = bool(value)
                if coil == 0 and value:
                    self.hush(unit_id)
        return None

    def _record(self, unit: _Unit, function: str, address: int, value: int) -> None:
        self.writes.append(WriteRecord(unit.unit_id, function, address, value, time.time()))

    def _refresh(self, unit: _Unit) -> None:
        """Device-side logic: alarm bits follow thresholds; hush expires."""
        regs = unit.registers
        if unit.profile == EF1 and unit.auto_alarms:
            rc_alarm = regs[EF_RESIDUAL] >= regs[EF_RC_THRESHOLD] > 0
            temps = [
                t - 0x10000 if t & 0x8000 else t
                for t in regs[EF_TEMP1 : EF_TEMP1 + 4]
                if t != NOT_FITTED
            ]
            t_alarm = any(t >= regs[EF_TEMP_THRESHOLD] for t in temps)
            regs[EF_STATUS] = _with_bit(regs[EF_STATUS], EF_RESIDUAL_ALARM, rc_alarm)
            regs[EF_STATUS] = _with_bit(regs[EF_STATUS], EF_TEMP_ALARM, t_alarm)
        if unit.profile == SD1 and unit.hush_until and time.monotonic() >= unit.hush_until:
            unit.hush_until = 0.0
            regs[SD_STATUS] = _with_bit(regs[SD_STATUS], SD_SILENCED, False)

    # -- control from tests and scripts ----------------------------------------------------

    def unit(self, unit_id: int) -> _Unit:
        return self._units[unit_id]

    def set_register(self, unit_id: int, register: int, value: int) -> None:
        """Set a raw register (int16 values may be given negative)."""
        unit = self._units[unit_id]
        unit.registers[register] = _u16(value)
        self._refresh(unit)

    def get_register(self, unit_id: int, register: int) -> int:
        unit = self._units[unit_id]
        self._refresh(unit)
        return unit.registers[register]

    def set_status_bit(self, unit_id: int, bit: int, on: bool = True) -> None:
        unit = self._units[unit_id]
        unit.registers[0] = _with_bit(unit.registers[0], bit, on)

    def set_residual_current(self, unit_id: int, milliamps: int) -> None:
        self.set_register(unit_id, EF_RESIDUAL, milliamps)

    def set_cable_temperature(self, unit_id: int, channel: int, celsius: float | None) -> None:
        """Channel 1-4; ``None`` = not fitted."""
        raw = NOT_FITTED if celsius is None else round(celsius * 10)
        self.set_register(unit_id, EF_TEMP1 + channel - 1, raw)

    def set_smoke(self, unit_id: int, obscuration_db_m: float, alarm: bool | None = None) -> None:
        """Obscuration in dB/m; the alarm bit follows ``alarm`` (default: >= 0.15 dB/m)."""
        self.set_register(unit_id, SD_OBSCURATION, round(obscuration_db_m * 100))
        on = obscuration_db_m >= 0.15 if alarm is None else alarm
        self.set_status_bit(unit_id, SD_SMOKE, on)

    def hush(self, unit_id: int) -> None:
        unit = self._units[unit_id]
        if unit.profile == SD1:
            unit.hush_until = time.monotonic() + self.hush_duration_s
            self.set_status_bit(unit_id, SD_SILENCED, True)

    def silence(self, unit_id: int) -> None:
        """The unit stops answering (power cut, broken cable)."""
        self._units[unit_id].silent = True

    def resume(self, unit_id: int) -> None:
        self._units[unit_id].silent = False

    def coil_writes(self, unit_id: int | None = None) -> list[WriteRecord]:
        return [
            w
            for w in self.writes
            if w.function.startswith("write_coil") and unit_id in (None, w.unit)
        ]

    def register_writes(self, unit_id: int | None = None) -> list[WriteRecord]:
        return [
            w
            for w in self.writes
            if w.function.startswith("write_register") and unit_id in (None, w.unit)
        ]

    # -- scripted scenarios ---------------------------------------------------------------

    def start_script(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a scenario coroutine in the background; cancelled by ``stop``."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ramp(
        self, unit_id: int, register: int, start: int, end: int, step: int, interval_s: float
    ) -> None:
        """Move a raw register from start to end in steps, one per interval."""
        step = abs(step) if end >= start else -abs(step)
        value = start
        while (step > 0 and value < end) or (step < 0 and value > end):
            self.set_register(unit_id, register, value)
            await asyncio.sleep(interval_s)
            value += step
        self.set_register(unit_id, register, end)

    async def leakage_creep(
        self,
        unit_id: int,
        *,
        start_ma: int = 100,
        end_ma: int = 450,
        step_ma: int = 25,
        interval_s: float = 1.0,
    ) -> None:
        """Residual current creeping up as insulation degrades (alarm at 300 mA)."""
        await self.ramp(unit_id, EF_RESIDUAL, start_ma, end_ma, step_ma, interval_s)

    async def cable_heating(
        self,
        unit_id: int,
        *,
        channel: int = 1,
        start_c: float = 30.0,
        end_c: float = 80.0,
        step_c: float = 5.0,
        interval_s: float = 1.0,
    ) -> None:
        """A loose terminal heating a cable past the 70 °C alarm."""
        await self.ramp(
            unit_id,
            EF_TEMP1 + channel - 1,
            round(start_c * 10),
            round(end_c * 10),
            round(step_c * 10),
            interval_s,
        )

    async def smoke_build_up(
        self,
        unit_id: int,
        *,
        end_db_m: float = 0.4,
        step_db_m: float = 0.05,
        interval_s: float = 1.0,
    ) -> None:
        """Smoke filling a room; the alarm bit sets at 0.15 dB/m."""
        level = self.get_register(unit_id, SD_OBSCURATION) / 100
        while level < end_db_m:
            level = min(end_db_m, level + step_db_m)
            self.set_smoke(unit_id, level)
            await asyncio.sleep(interval_s)


def _with_bit(word: int, bit: int, on: bool) -> int:
    return word | (1 << bit) if on else word & ~(1 << bit)
