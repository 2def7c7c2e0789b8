"""``kind: modbus`` in the site file: detectors on one RS-485 bus, any Modbus profile."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from device_drivers.kinds import DeviceConfig, DriverConfig, register_kind
from device_drivers.model import Driver

__all__ = ["ModbusDeviceConfig", "ModbusDriverConfig"]

_UNIT = re.compile(r"^unit-([0-9]{1,3})$")


class ModbusDeviceConfig(DeviceConfig):
    """A unit on the bus; ``poll_interval_s`` overrides its profile's interval."""

    poll_interval_s: Annotated[float, Field(gt=0, le=3600)] | None = None


@register_kind
class ModbusDriverConfig(DriverConfig):
    """Units on one RS-485 bus (a device path or ``socket://host:port``, RTU over TCP).

    Every device names its profile: a bus mixes detector models.
    """

    KIND = "modbus"
    TRANSPORT = "modbus"
    DEFAULT_PROFILE = None

    kind: Literal["modbus"]
    port: Annotated[str, StringConstraints(min_length=1)]
    devices: list[ModbusDeviceConfig] = Field(min_length=1)  # type: ignore[assignment]
    baudrate: int = 9600
    request_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    offline_after_failures: Annotated[int, Field(ge=1, le=100)] = 3

    @classmethod
    def normalise_address(cls, address: str) -> str:
        return address.strip().lower()

    @classmethod
    def address_error(cls, address: str) -> str | None:
        m = _UNIT.match(address)
        if m and 1 <= int(m.group(1)) <= 247:
            return None
        return f"Modbus address {address!r} must be unit-1 … unit-247"

    def _units(self) -> list[tuple[ModbusDeviceConfig, int]]:
        return [(d, int(d.address.split("-")[1])) for d in self.devices]

    def build(self) -> Driver:
        from device_drivers.modbus.driver import ModbusBusDriver, ModbusUnit

        return ModbusBusDriver(
            self.port,
            [ModbusUnit(uid, self.profile_of(d), d.poll_interval_s) for d, uid in self._units()],
            baudrate=self.baudrate,
            request_timeout_s=self.request_timeout_s,
            offline_after_failures=self.offline_after_failures,
        )

    def down_offline_after_s(self) -> float:
        """As long as its own units take to be declared offline by failed polls."""
        from device_drivers.modbus import register_map

        interval = min(
            d.poll_interval_s or register_map(self.profile_of(d)).poll_interval_s
            for d in self.devices
        )
        return self.offline_after_failures * (interval + self.request_timeout_s)
