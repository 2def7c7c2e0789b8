"""A vendor the project does not ship: the Acme AS-200 smoke detector (Modbus RTU).

Test-only, and written as a vendor would write it: a register map (data), a
pure decoder returning the vendor's frozen state, and one call registering the
profile. A site file names this module under ``plugins:``; nothing in
``gateway/`` or ``device_drivers/`` knows it.

Register map (holding registers from 0x0100, unlike es-sd1's from 0):
  0x0100  temperature, 0.5 °C steps, signed
  0x0101  smoke density, 0.001 dB/m
  0x0102  alarm word: bit 7 smoke, bit 0 head fault, bit 2 battery low, bit 6 silenced
  0x0103  battery, mV
Coil 0x0010 silences the sounder (hush).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from device_drivers.modbus import register_modbus_profile
from device_drivers.modbus.registers import (
    RegisterField,
    RegisterMap,
    Role,
    StatusBit,
    decode_values,
)
from device_drivers.model import ConditionKind

PROFILE_NAME = "acme-as200"
BASE = 0x0100
HUSH_COIL = 0x0010
SMOKE_BIT, FAULT_BIT, BATTERY_LOW_BIT, SILENCED_BIT = 7, 0, 2, 6

AS200 = RegisterMap(
    profile=PROFILE_NAME,
    poll_start=BASE,
    poll_count=4,
    poll_interval_s=1.0,
    status_register=BASE + 2,
    fields=(
        RegisterField(BASE + 0, "temperature_c", "°C", 0.5, signed=True),
        RegisterField(BASE + 1, "smoke_density_db_m", "dB/m", 0.001),
        RegisterField(BASE + 2, "alarm_word", role=Role.STATUS),
        RegisterField(BASE + 3, "battery_mv", "mV"),
    ),
    status_bits=(
        StatusBit(SMOKE_BIT, "smoke", ConditionKind.SMOKE),
        StatusBit(FAULT_BIT, "head_fault", ConditionKind.DEVICE_FAULT),
        StatusBit(BATTERY_LOW_BIT, "battery_low", ConditionKind.LOW_BATTERY),
        StatusBit(SILENCED_BIT, "silenced"),
    ),
    condition_data={ConditionKind.SMOKE: ("smoke_density_db_m", "temperature_c", "silenced")},
    hush_coil=HUSH_COIL,
)


@dataclass(frozen=True, slots=True)
class AS200State:
    """One poll of an AS-200, in engineering units."""

    smoke: bool
    head_fault: bool
    battery_low: bool
    silenced: bool
    temperature_c: float
    smoke_density_db_m: float
    battery_mv: int


def decode_as200(registers: Sequence[int]) -> AS200State:
    """Registers 0x0100-0x0103 → state; DecodeError on a block that is not one."""
    values = decode_values(AS200, registers)
    return AS200State(
        smoke=values["smoke"],
        head_fault=values["head_fault"],
        battery_low=values["battery_low"],
        silenced=values["silenced"],
        temperature_c=values["temperature_c"],
        smoke_density_db_m=values["smoke_density_db_m"],
        battery_mv=values["battery_mv"],
    )


PROFILE = register_modbus_profile(
    AS200, "Acme AS-200 smoke detector (Modbus RTU)", {"hush"}, decoder=decode_as200
)
