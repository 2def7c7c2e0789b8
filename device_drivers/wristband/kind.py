"""``kind: wristband`` in the site file: es-wb1 wristbands through one BLE adapter."""

from __future__ import annotations

import contextlib
import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from device_drivers.kinds import DriverConfig, register_kind
from device_drivers.model import Command, CommandError, Driver, ObservationSink
from device_drivers.wristband.profile import ES_WB1 as _PROFILE

__all__ = ["BumbleWristbandDriver", "WristbandDriverConfig"]

_MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


@register_kind
class WristbandDriverConfig(DriverConfig):
    """es-wb1 wristbands through one adapter: BlueZ, or bumble (a USB HCI dongle, or a
    controller in another process such as the simulators' virtual link)."""

    KIND = "wristband"
    TRANSPORT = "ble"
    DEFAULT_PROFILE = "es-wb1"

    kind: Literal["wristband"]
    backend: Literal["bluez", "bumble"] = "bluez"
    bumble_transport: str | None = None  # e.g. usb:0, tcp-client:127.0.0.1:9100
    offline_after_s: Annotated[float, Field(gt=0)] = _PROFILE.offline_after_s or 300.0

    @classmethod
    def normalise_address(cls, address: str) -> str:
        return address.strip().upper()

    @classmethod
    def address_error(cls, address: str) -> str | None:
        if _MAC.match(address):
            return None
        return f"BLE address {address!r} is not AA:BB:CC:DD:EE:FF"

    @model_validator(mode="after")
    def _backend(self) -> WristbandDriverConfig:
        if (self.backend == "bumble") != (self.bumble_transport is not None):
            raise ValueError("bumble_transport is required with backend bumble, and only then")
        return self

    def build(self) -> Driver:
        if self.backend == "bumble":
            return BumbleWristbandDriver(self)
        from device_drivers.wristband.driver import WristbandDriver

        return WristbandDriver(
            [d.address for d in self.devices], offline_after_s=self.offline_after_s
        )

    def down_offline_after_s(self) -> float:
        return self.offline_after_s


class BumbleWristbandDriver:
    """The wristband driver on a bumble HCI transport: opens the central per run.

    The central (one BLE "adapter") belongs to one run of the driver, so a
    restart after a crash starts from a fresh transport. The counters outlive
    the runs.
    """

    def __init__(self, config: WristbandDriverConfig) -> None:
        from device_drivers.wristband.state import WristbandStats

        self.config = config
        self.stats = WristbandStats()
        self._inner: Driver | None = None

    async def run(self, sink: ObservationSink) -> None:
        from device_drivers.ble.bumble_backend import BumbleCentral, BumbleClient, BumbleScanner
        from device_drivers.wristband.driver import WristbandDriver

        assert self.config.bumble_transport is not None
        central = await BumbleCentral.open(self.config.bumble_transport)
        try:
            self._inner = WristbandDriver(
                [d.address for d in self.config.devices],
                scanner_backend=BumbleScanner,
                client_backend=BumbleClient,
                backend_kwargs=central.bleak_kwargs(),
                offline_after_s=self.config.offline_after_s,
                stats=self.stats,
            )
            await self._inner.run(sink)
        finally:
            self._inner = None
            with contextlib.suppress(Exception):
                await central.close()

    async def execute(self, command: Command) -> None:
        inner = self._inner
        if inner is None:
            raise CommandError("BLE adapter not running", recoverable=True)
        await inner.execute(command)

    def counters_snapshot(self) -> dict[str, dict[str, int]]:
        return {"line": self.stats.as_dict()}
