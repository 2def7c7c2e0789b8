"""es-ef1 / es-sd1 register maps as data, and pure decoding of a polled block.

A map is a table of ``RegisterField`` rows (register, name, scale, signedness,
unit, "not fitted" sentinel) plus the meaning of each status bit. A vendor's
variant is a new table, not new code. Field names double as metric names and as
the attribute names of the frozen state dataclasses, so one table drives the
decoder, the Readings and the Conditions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from device_drivers.model import (
    Condition,
    ConditionKind,
    DecodeError,
    OccurrenceKind,
    Reading,
    Scalar,
)

__all__ = [
    "ES_EF1",
    "ES_SD1",
    "REGISTER_MAPS",
    "ElectricalFireState",
    "RegisterField",
    "RegisterMap",
    "Role",
    "SmokeDetectorState",
    "StatusBit",
    "conditions_from",
    "decode_block",
    "decode_values",
    "readings_from",
]


class Role(StrEnum):
    STATUS = "status"  # the bitfield register
    MEASUREMENT = "measurement"  # becomes a Reading every poll
    SETTING = "setting"  # read/write configuration (thresholds)
    INFO = "info"  # firmware version and the like


@dataclass(frozen=True, slots=True)
class RegisterField:
    register: int  # offset from 0 (the PDU address)
    name: str  # metric name and state attribute
    unit: str = ""
    scale: float = 1.0  # engineering value = raw * scale
    signed: bool = False
    words: int = 1  # 2 = uint32/int32, high word first
    not_fitted: int | None = None  # raw value meaning "channel not fitted" -> None
    role: Role = Role.MEASUREMENT
    write_name: str | None = None  # name accepted by SET_THRESHOLD, if writable


@dataclass(frozen=True, slots=True)
class StatusBit:
    bit: int
    name: str  # state attribute
    condition: ConditionKind | None = None  # level condition it drives
    occurrence: OccurrenceKind | None = None  # pulse on the rising edge


@dataclass(frozen=True, slots=True)
class RegisterMap:
    profile: str
    poll_start: int
    poll_count: int
    poll_interval_s: float
    status_register: int
    fields: tuple[RegisterField, ...]
    status_bits: tuple[StatusBit, ...]
    #: extra state values attached to each condition's data
    condition_data: Mapping[ConditionKind, tuple[str, ...]] = field(default_factory=dict)
    #: residual current early warning, as a fraction of the alarm threshold
    early_warning_fraction: float | None = None
    hush_coil: int | None = None

    def writable(self) -> dict[str, RegisterField]:
        return {f.write_name: f for f in self.fields if f.write_name}

    def status_word(self, values: Mapping[str, Any]) -> int:
        """The raw status bitfield out of decoded values, whatever the vendor named it."""
        for f in self.fields:
            if f.register == self.status_register:
                return int(values[f.name])
        raise KeyError(f"{self.profile}: no field at status register {self.status_register}")

    def field_named(self, name: str) -> RegisterField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


_C = ConditionKind

ES_EF1 = RegisterMap(
    profile="es-ef1",
    poll_start=0,
    poll_count=13,
    poll_interval_s=2.0,
    status_register=0,
    fields=(
        RegisterField(0, "status", role=Role.STATUS),
        RegisterField(1, "residual_current_ma", "mA"),
        RegisterField(2, "cable_temp_c_1", "°C", 0.1, signed=True, not_fitted=0x8000),
        RegisterField(3, "cable_temp_c_2", "°C", 0.1, signed=True, not_fitted=0x8000),
        RegisterField(4, "cable_temp_c_3", "°C", 0.1, signed=True, not_fitted=0x8000),
        RegisterField(5, "cable_temp_c_4", "°C", 0.1, signed=True, not_fitted=0x8000),
        RegisterField(6, "voltage_v", "V", 0.1),
        RegisterField(7, "current_a", "A", 0.01),
        RegisterField(8, "power_w", "W"),
        RegisterField(9, "energy_kwh", "kWh", 0.01, words=2),
        RegisterField(
            11,
            "residual_current_threshold_ma",
            "mA",
            role=Role.SETTING,
            write_name="residual_current_threshold",
        ),
        RegisterField(
            12,
            "temperature_threshold_c",
            "°C",
            0.1,
            role=Role.SETTING,
            write_name="temperature_threshold",
        ),
    ),
    status_bits=(
        StatusBit(0, "residual_current_alarm", _C.RESIDUAL_CURRENT),
        StatusBit(1, "temperature_alarm", _C.CABLE_TEMPERATURE),
        StatusBit(2, "over_current_alarm", _C.OVER_CURRENT),
        StatusBit(3, "detector_fault", _C.DEVICE_FAULT),
        StatusBit(4, "sensor_open_circuit", _C.DEVICE_FAULT),
        StatusBit(5, "self_test_running"),
    ),
    condition_data={
        _C.RESIDUAL_CURRENT: (
            "residual_current_ma",
            "residual_current_threshold_ma",
            "residual_current_early_warning",
        ),
        _C.CABLE_TEMPERATURE: (
            "cable_temp_c_1",
            "cable_temp_c_2",
            "cable_temp_c_3",
            "cable_temp_c_4",
            "temperature_threshold_c",
        ),
        _C.OVER_CURRENT: ("current_a",),
    },
    early_warning_fraction=0.8,
    hush_coil=0,
)

ES_SD1 = RegisterMap(
    profile="es-sd1",
    poll_start=0,
    poll_count=5,
    poll_interval_s=1.0,
    status_register=0,
    fields=(
        RegisterField(0, "status", role=Role.STATUS),
        RegisterField(1, "smoke_obscuration_db_m", "dB/m", 0.01),
        RegisterField(2, "temperature_c", "°C", 0.1, signed=True),
        RegisterField(3, "battery_pct", "%"),
        RegisterField(4, "firmware", role=Role.INFO),
    ),
    status_bits=(
        StatusBit(0, "smoke_alarm", _C.SMOKE),
        StatusBit(1, "fault", _C.DEVICE_FAULT),
        StatusBit(2, "battery_low", _C.LOW_BATTERY),
        StatusBit(3, "tamper", _C.TAMPER),
        StatusBit(4, "test_pressed", occurrence=OccurrenceKind.TEST),
        StatusBit(5, "silenced"),
    ),
    condition_data={
        _C.SMOKE: ("smoke_obscuration_db_m", "temperature_c", "silenced"),
        _C.LOW_BATTERY: ("battery_pct",),
    },
    hush_coil=0,
)

REGISTER_MAPS: dict[str, RegisterMap] = {m.profile: m for m in (ES_EF1, ES_SD1)}


@dataclass(frozen=True, slots=True)
class ElectricalFireState:
    """One poll of an es-ef1 (registers 0-12), in engineering units."""

    status: int
    residual_current_alarm: bool
    temperature_alarm: bool
    over_current_alarm: bool
    detector_fault: bool
    sensor_open_circuit: bool
    self_test_running: bool
    residual_current_ma: int
    cable_temp_c_1: float | None
    cable_temp_c_2: float | None
    cable_temp_c_3: float | None
    cable_temp_c_4: float | None
    voltage_v: float
    current_a: float
    power_w: int
    energy_kwh: float
    residual_current_threshold_ma: int
    temperature_threshold_c: float
    residual_current_early_warning: bool  # >= 80 % of the device's own threshold


@dataclass(frozen=True, slots=True)
class SmokeDetectorState:
    """One poll of an es-sd1 (registers 0-4), in engineering units."""

    status: int
    smoke_alarm: bool
    fault: bool
    battery_low: bool
    tamper: bool
    test_pressed: bool
    silenced: bool
    smoke_obscuration_db_m: float
    temperature_c: float
    battery_pct: int
    firmware: int


State = ElectricalFireState | SmokeDetectorState
_STATE_TYPES: dict[str, type[ElectricalFireState] | type[SmokeDetectorState]] = {
    "es-ef1": ElectricalFireState,
    "es-sd1": SmokeDetectorState,
}


def _raw(f: RegisterField, regs: Sequence[int], start: int) -> int:
    value = 0
    for i in range(f.words):
        value = (value << 16) | regs[f.register - start + i]
    return value


def _scaled(f: RegisterField, raw: int) -> int | float | None:
    if f.not_fitted is not None and raw == f.not_fitted:
        return None
    bits = 16 * f.words
    if f.signed and raw & (1 << (bits - 1)):
        raw -= 1 << bits
    if f.scale == 1.0:
        return raw
    return round(raw * f.scale, 10)  # 234 * 0.1 -> 23.4, not 23.400000000000002


def decode_values(regmap: RegisterMap, regs: Sequence[int]) -> dict[str, Any]:
    """Register block -> {name: value} including status bits and derived fields."""
    if len(regs) != regmap.poll_count:
        raise DecodeError(
            f"{regmap.profile}: expected {regmap.poll_count} registers, got {len(regs)}"
        )
    for r in regs:
        if not isinstance(r, int) or not 0 <= r <= 0xFFFF:
            raise DecodeError(f"{regmap.profile}: register value {r!r} is not a uint16")
    values: dict[str, Any] = {}
    for f in regmap.fields:
        values[f.name] = _scaled(f, _raw(f, regs, regmap.poll_start))
    status = regs[regmap.status_register - regmap.poll_start]
    for b in regmap.status_bits:
        values[b.name] = bool(status >> b.bit & 1)
    if regmap.early_warning_fraction is not None:
        threshold = values["residual_current_threshold_ma"]
        values["residual_current_early_warning"] = bool(
            threshold and values["residual_current_ma"] >= regmap.early_warning_fraction * threshold
        )
    return values


def decode_block(regmap: RegisterMap, regs: Sequence[int]) -> State:
    """Register block -> the profile's frozen state dataclass; DecodeError on bad input."""
    state_type = _STATE_TYPES[regmap.profile]
    values = decode_values(regmap, regs)
    names = {f.name for f in fields(state_type)}
    return state_type(**{k: v for k, v in values.items() if k in names})


def readings_from(regmap: RegisterMap, address: str, values: Mapping[str, Any]) -> list[Reading]:
    """Every measured value of one poll; channels not fitted are left out."""
    return [
        Reading(address, f.name, float(values[f.name]), f.unit)
        for f in regmap.fields
        if f.role is Role.MEASUREMENT and values.get(f.name) is not None
    ]


def conditions_from(
    regmap: RegisterMap, address: str, values: Mapping[str, Any]
) -> list[Condition]:
    """The level of every condition the status bits drive, active or not."""
    bits_by_condition: dict[ConditionKind, list[StatusBit]] = {}
    for b in regmap.status_bits:
        if b.condition is not None:
            bits_by_condition.setdefault(b.condition, []).append(b)
    out = []
    for kind, bits in bits_by_condition.items():
        data: dict[str, Scalar] = {b.name: values[b.name] for b in bits}
        for name in regmap.condition_data.get(kind, ()):
            if values.get(name) is not None:
                data[name] = values[name]
        out.append(Condition(address, kind, any(values[b.name] for b in bits), data))
    return out
