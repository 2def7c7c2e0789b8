"""Modbus RTU bus session: poll es-ef1 / es-sd1 units, emit typed observations.

One driver per bus (one serial port, or ``socket://host:port`` for RTU framing
over TCP, which pymodbus's serial client opens through pyserial's URL
handler). Units are polled one at a time, each on its own interval; the bus is
half-duplex, so requests never overlap (pymodbus's client serialises them and
``execute`` goes through the same client).

Every poll emits a Reading per measured value and the level of every status
condition (the edge publishes only changes). Failed polls are counted per
unit: ``offline_after_failures`` in a row raise OFFLINE, the next answer clears
it. A dead unit never stops the others being polled; a dead *port* makes
``run`` raise so the edge's supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from device_drivers.modbus import register_map
from device_drivers.modbus.registers import (
    RegisterMap,
    conditions_from,
    decode_values,
    readings_from,
)
from device_drivers.model import (
    Command,
    CommandAction,
    CommandError,
    Condition,
    ConditionKind,
    DecodeError,
    LinkStatus,
    ObservationSink,
    Occurrence,
    Scalar,
)

__all__ = ["ModbusBusDriver", "ModbusUnit", "UnitHealth", "unit_address"]

log = logging.getLogger(__name__)


class _UnansweredRequests(logging.Filter):
    """pymodbus logs an ERROR, with a dump of the last frames, for every request a unit
    leaves unanswered. A silent unit is an expected state of a bus, not an error per
    poll: the driver counts failed polls and logs each unit's offline and back-online
    transition once (and raises when the port itself fails)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No response received" not in record.getMessage()


logging.getLogger("pymodbus.logging").addFilter(_UnansweredRequests())


def unit_address(unit_id: int) -> str:
    return f"unit-{unit_id}"


def _parse_unit_address(address: str) -> int:
    prefix, _, number = address.partition("-")
    if prefix != "unit" or not number.isdigit():
        raise ValueError(f"not a Modbus unit address: {address!r}")
    return int(number)


@dataclass(frozen=True, slots=True)
class ModbusUnit:
    """One detector on the bus. ``poll_interval_s`` overrides the profile's."""

    unit_id: int
    profile: str  # any registered Modbus profile: "es-ef1", "es-sd1", a vendor's
    poll_interval_s: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.unit_id <= 247:
            raise ValueError(f"Modbus unit id must be 1-247, got {self.unit_id}")
        try:
            register_map(self.profile)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None


@dataclass(slots=True)
class UnitHealth:
    """Per-unit poll bookkeeping, exposed for metrics and tests."""

    polls: int = 0
    failures: int = 0  # total
    consecutive_failures: int = 0
    offline: bool | None = None  # None until the first verdict
    last_error: str = ""
    last_status: int | None = None
    last_battery: int | None = None
    next_due: float = 0.0
    decode_errors: int = field(default=0)
    offline_transitions: int = 0

    def counters(self) -> dict[str, int]:
        return {
            "polls": self.polls,
            "failed_polls": self.failures,
            "decode_errors": self.decode_errors,
            "offline_transitions": self.offline_transitions,
        }


class ModbusBusDriver:
    """Polls several units on one Modbus RTU bus; implements the Driver protocol."""

    def __init__(
        self,
        port: str,
        units: Iterable[ModbusUnit],
        *,
        baudrate: int = 9600,
        request_timeout_s: float = 1.0,
        retries: int = 0,
        offline_after_failures: int = 3,
        clock: Callable[[], float] = time.monotonic,
        client_factory: Callable[[], AsyncModbusSerialClient] | None = None,
    ) -> None:
        """``port``: serial device path or ``socket://host:port`` (RTU over TCP).

        ``retries`` are pymodbus's in-request retries; a poll counts as failed
        only when they are exhausted. Keep ``request_timeout_s`` well below the
        shortest poll interval.
        """
        self.port = port
        self.units = {u.unit_id: u for u in units}
        if not self.units:
            raise ValueError("a Modbus bus driver needs at least one unit")
        self.offline_after_failures = offline_after_failures
        self._clock = clock
        self._client_factory = client_factory or (
            lambda: AsyncModbusSerialClient(
                port,
                framer=FramerType.RTU,
                baudrate=baudrate,
                bytesize=8,
                parity="N",
                stopbits=1,
                timeout=request_timeout_s,
                retries=retries,
                reconnect_delay=0,  # the edge's supervisor owns reconnecting
            )
        )
        self.health = {uid: UnitHealth() for uid in self.units}
        self._client: AsyncModbusSerialClient | None = None
        self.connected = asyncio.Event()

    def _interval(self, unit: ModbusUnit) -> float:
        return unit.poll_interval_s or register_map(unit.profile).poll_interval_s

    def counters_snapshot(self) -> dict[str, dict[str, int]]:
        per_unit = {unit_address(uid): h.counters() for uid, h in self.health.items()}
        line = {name: sum(c[name] for c in per_unit.values()) for name in UnitHealth().counters()}
        return {"line": line, **per_unit}

    # -- session ---------------------------------------------------------------------

    async def run(self, sink: ObservationSink) -> None:
        client = self._client_factory()
        if not await client.connect():
            client.close()
            raise ConnectionError(f"cannot open Modbus port {self.port}")
        self._client = client
        self.connected.set()
        now = self._clock()
        for health in self.health.values():
            health.next_due = now
        try:
            while True:
                unit_id = min(self.health, key=lambda uid: self.health[uid].next_due)
                health = self.health[unit_id]
                delay = health.next_due - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._poll(client, self.units[unit_id], sink)
                _raise_if_cancelling()
                # Fixed rate, but never a burst of catch-up polls after a slow spell.
                health.next_due = max(
                    health.next_due + self._interval(self.units[unit_id]), self._clock()
                )
        finally:
            self.connected.clear()
            self._client = None
            client.close()

    async def _poll(
        self, client: AsyncModbusSerialClient, unit: ModbusUnit, sink: ObservationSink
    ) -> None:
        regmap = register_map(unit.profile)
        health = self.health[unit.unit_id]
        address = unit_address(unit.unit_id)
        health.polls += 1
        try:
            response = await client.read_holding_registers(
                regmap.poll_start, count=regmap.poll_count, device_id=unit.unit_id
            )
            if response.isError():
                raise ModbusException(f"exception response {response}")
            values = decode_values(regmap, response.registers)
        except (ModbusException, DecodeError, TimeoutError) as exc:
            if isinstance(exc, DecodeError):
                health.decode_errors += 1
            if not client.connected:
                raise ConnectionError(f"Modbus port {self.port} lost: {exc}") from exc
            await self._poll_failed(address, health, str(exc), sink)
            return
        await self._poll_answered(regmap, address, health, values, sink)

    async def _poll_failed(
        self, address: str, health: UnitHealth, error: str, sink: ObservationSink
    ) -> None:
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error = error
        log.debug(
            "%s %s: poll failed (%d in a row): %s",
            self.port,
            address,
            health.consecutive_failures,
            error,
        )
        if (
            health.consecutive_failures >= self.offline_after_failures
            and health.offline is not True
        ):
            health.offline = True
            health.offline_transitions += 1
            log.warning(
                "%s %s: offline after %d failed polls (%s)",
                self.port,
                address,
                health.consecutive_failures,
                error,
            )
            data: dict[str, Scalar] = {
                "failed_polls": health.consecutive_failures,
                "error": error[:200],
            }
            await sink(Condition(address, ConditionKind.OFFLINE, active=True, data=data))
            await sink(LinkStatus(address, online=False, battery=health.last_battery))

    async def _poll_answered(
        self,
        regmap: RegisterMap,
        address: str,
        health: UnitHealth,
        values: dict[str, Any],
        sink: ObservationSink,
    ) -> None:
        if health.offline is True:
            log.info(
                "%s %s: answering again after %d failed polls",
                self.port,
                address,
                health.consecutive_failures,
            )
        health.consecutive_failures = 0
        battery = values.get("battery_pct")
        if health.offline is not False or battery != health.last_battery:
            health.last_battery = battery
            if health.offline is not False:
                health.offline = False
                await sink(Condition(address, ConditionKind.OFFLINE, active=False))
            await sink(LinkStatus(address, online=True, battery=battery))
        for reading in readings_from(regmap, address, values):
            await sink(reading)
        for condition in conditions_from(regmap, address, values):
            await sink(condition)
        # Pulses (test button): only on the rising edge of the bit.
        status = regmap.status_word(values)
        previous = health.last_status
        health.last_status = status
        for bit in regmap.status_bits:
            if bit.occurrence is None or not values[bit.name]:
                continue
            if previous is not None and previous >> bit.bit & 1:
                continue
            await sink(
                Occurrence(
                    address=address,
                    kind=bit.occurrence,
                    dedup_key=f"{address}:{bit.name}:{int(time.time())}",
                    dedup_window_s=5.0,
                    data={bit.name: True},
                )
            )

    # -- downlink --------------------------------------------------------------------

    async def execute(self, command: Command) -> None:
        """HUSH (coil 0 := 1) or SET_THRESHOLD (args: register name, raw int value)."""
        try:
            unit_id = _parse_unit_address(command.address)
        except ValueError as exc:
            raise CommandError(str(exc), recoverable=False) from None
        unit = self.units.get(unit_id)
        if unit is None:
            raise CommandError(f"{command.address} is not on bus {self.port}", recoverable=False)
        regmap = register_map(unit.profile)
        client = self._client
        if client is None or not client.connected:
            raise CommandError(f"Modbus port {self.port} not open", recoverable=True)
        try:
            if command.action is CommandAction.HUSH:
                if regmap.hush_coil is None:
                    raise CommandError(f"{unit.profile} has no hush", recoverable=False)
                response = await client.write_coil(regmap.hush_coil, True, device_id=unit_id)
            elif command.action is CommandAction.SET_THRESHOLD:
                register, value = _threshold_args(regmap, command.args)
                response = await client.write_register(register, value, device_id=unit_id)
            else:
                raise CommandError(f"{unit.profile} cannot {command.action}", recoverable=False)
        except ModbusException as exc:
            raise CommandError(f"{command.address}: {exc}", recoverable=True) from exc
        if response.isError():
            raise CommandError(f"{command.address} refused: {response}", recoverable=False)


def _raise_if_cancelling() -> None:
    """Python 3.11's ``asyncio.wait_for`` (used inside pymodbus) can swallow a
    cancellation that races with the reply; the request stays on the task, so
    honour it here or ``run`` would never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _threshold_args(regmap: RegisterMap, args: Any) -> tuple[int, int]:
    writable = regmap.writable()
    name = args.get("register")
    value = args.get("value")
    if name not in writable:
        raise CommandError(
            f"{regmap.profile}: register must be one of {sorted(writable)}, got {name!r}",
            recoverable=False,
        )
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise CommandError(
            f"threshold value must be an int 0-65535, got {value!r}", recoverable=False
        )
    return writable[name].register, value


def units_from(specs: Sequence[tuple[int, str]]) -> list[ModbusUnit]:
    """Convenience for configs: [(3, "es-sd1"), ...] -> ModbusUnit list."""
    return [ModbusUnit(uid, profile) for uid, profile in specs]
