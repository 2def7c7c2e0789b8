"""Driver factory: site config → the driver objects of ``device_drivers`` (imported lazily).

Lazy imports keep an edge with only call buttons free of bleak/bumble/pymodbus
start-up cost and of their failures.
"""

from __future__ import annotations

import contextlib
from typing import Any

from device_drivers.model import Command, Driver, ObservationSink
from gateway.edge.commands import Route
from gateway.edge.config import (
    CallButtonDriverConfig,
    DriverConfig,
    EdgeConfig,
    ModbusDriverConfig,
    WristbandDriverConfig,
)
from gateway.edge.supervisor import DriverSlot


class BumbleWristbandDriver:
    """A wristband driver on a bumble HCI transport: opens the central per run.

    The central (one BLE "adapter") belongs to one run of the driver, so a
    restart after a crash starts from a fresh transport.
    """

    def __init__(self, config: WristbandDriverConfig) -> None:
        self.config = config
        self._inner: Any = None

    async def run(self, sink: ObservationSink) -> None:
        from device_drivers.wristband import WristbandDriver
        from simulators.ble.backend import BumbleCentral, BumbleClient, BumbleScanner

        assert self.config.bumble_transport is not None
        central = await BumbleCentral.open(self.config.bumble_transport)
        try:
            self._inner = WristbandDriver(
                [d.address for d in self.config.devices],
                scanner_backend=BumbleScanner,
                client_backend=BumbleClient,
                backend_kwargs=central.bleak_kwargs(),
                offline_after_s=self.config.offline_after_s,
            )
            await self._inner.run(sink)
        finally:
            self._inner = None
            with contextlib.suppress(Exception):
                await central.close()

    async def execute(self, command: Command) -> None:
        from device_drivers.model import CommandError

        inner = self._inner
        if inner is None:
            raise CommandError("BLE adapter not running", recoverable=True)
        await inner.execute(command)


def build_driver(config: DriverConfig) -> Driver:
    if isinstance(config, CallButtonDriverConfig):
        from device_drivers.callbutton.driver import CallButtonReceiverDriver

        return CallButtonReceiverDriver(
            config.port,
            buttons=[d.address for d in config.devices if d.address != "receiver"],
            baudrate=config.baudrate,
            receiver_offline_after_s=config.receiver_offline_after_s,
            button_supervision_s=config.button_supervision_s,
            dedup_window_s=config.dedup_window_s,
        )
    if isinstance(config, ModbusDriverConfig):
        from device_drivers.modbus.driver import ModbusBusDriver, ModbusUnit

        units = [
            ModbusUnit(int(d.address.split("-")[1]), d.profile or "", d.poll_interval_s)
            for d in config.devices
        ]
        return ModbusBusDriver(
            config.port,
            units,
            baudrate=config.baudrate,
            request_timeout_s=config.request_timeout_s,
            offline_after_failures=config.offline_after_failures,
        )
    if config.backend == "bumble":
        return BumbleWristbandDriver(config)
    from device_drivers.wristband import WristbandDriver

    return WristbandDriver(
        [d.address for d in config.devices], offline_after_s=config.offline_after_s
    )


def down_offline_after_s(config: DriverConfig) -> float:
    """How long a driver may be down before its devices count as offline (per class)."""
    if isinstance(config, CallButtonDriverConfig):
        return config.receiver_offline_after_s
    if isinstance(config, ModbusDriverConfig):
        from device_drivers.modbus.registers import REGISTER_MAPS

        interval = min(
            d.poll_interval_s or REGISTER_MAPS[d.profile or ""].poll_interval_s
            for d in config.devices
        )
        return config.offline_after_failures * (interval + config.request_timeout_s)
    return config.offline_after_s


def build(config: EdgeConfig) -> tuple[list[DriverSlot], dict[str, list[Route]]]:
    """Driver slots for the supervisor and command routes (device id → drivers)."""
    slots: list[DriverSlot] = []
    routes: dict[str, list[Route]] = {}
    for drv in config.drivers:
        slots.append(DriverSlot(drv.name, build_driver(drv), down_offline_after_s(drv)))
        for dev in drv.devices:
            routes.setdefault(dev.id, []).append(Route(drv.name, dev.address))
    return slots, routes
