"""``kind: callbutton`` in the site file: es-cb1 buttons behind one serial receiver."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from device_drivers.callbutton.codec import RECEIVER_ADDRESS
from device_drivers.callbutton.profile import PROFILE as _PROFILE
from device_drivers.kinds import DeviceConfig, DriverConfig, register_kind
from device_drivers.model import Driver

__all__ = ["CallButtonDriverConfig"]

_BUTTON = re.compile(r"^[0-9a-f]{8}$")


# Default timings are the profile's (DEVICES.md 2).


@register_kind
class CallButtonDriverConfig(DriverConfig):
    """es-cb1 buttons behind one serial receiver (a device path or pyserial URL).

    The receiver itself is a device (address ``receiver``): its silence is an
    alarm input, and it is the one device that goes offline with the driver —
    buttons keep their own hourly supervision.
    """

    KIND = "callbutton"
    TRANSPORT = "serial"
    DEFAULT_PROFILE = "es-cb1"

    kind: Literal["callbutton"]
    port: Annotated[str, StringConstraints(min_length=1)]
    baudrate: int = 9600
    receiver_offline_after_s: Annotated[float, Field(gt=0)] = _PROFILE.offline_after_s or 90.0
    button_supervision_s: Annotated[float, Field(gt=0)] = _PROFILE.params["button_supervision_s"]
    dedup_window_s: Annotated[float, Field(gt=0)] = _PROFILE.params["dedup_window_s"]

    @classmethod
    def normalise_address(cls, address: str) -> str:
        return address.strip().lower()

    @classmethod
    def address_error(cls, address: str) -> str | None:
        if address == RECEIVER_ADDRESS or _BUTTON.match(address):
            return None
        return f"button address {address!r} is not 8 hex digits (or {RECEIVER_ADDRESS!r})"

    def check(self) -> None:
        receivers = [d for d in self.devices if d.address == RECEIVER_ADDRESS]
        if len(receivers) != 1:
            raise ValueError(
                f"callbutton driver {self.name!r} needs exactly one device with address "
                f"{RECEIVER_ADDRESS!r} (the receiver; its offline state is an alarm input)"
            )

    def build(self) -> Driver:
        from device_drivers.callbutton.driver import CallButtonReceiverDriver

        return CallButtonReceiverDriver(
            self.port,
            buttons=[d.address for d in self.devices if d.address != RECEIVER_ADDRESS],
            baudrate=self.baudrate,
            receiver_offline_after_s=self.receiver_offline_after_s,
            button_supervision_s=self.button_supervision_s,
            dedup_window_s=self.dedup_window_s,
        )

    def down_offline_after_s(self) -> float:
        return self.receiver_offline_after_s

    def offline_when_down(self, device: DeviceConfig) -> bool:
        return device.address == RECEIVER_ADDRESS
