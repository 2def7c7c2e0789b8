"""Driver factory: site config → driver slots for the supervisor and command routes.

The edge knows no driver kind by name: each ``drivers[]`` entry is the model its
kind registered in ``device_drivers.kinds`` and builds its own driver (importing
its transport libraries lazily, so an edge with only call buttons pays nothing
for bleak, bumble or pymodbus).
"""

from __future__ import annotations

from device_drivers.kinds import DriverConfig
from device_drivers.model import Driver
from gateway.edge.commands import Route
from gateway.edge.config import EdgeConfig
from gateway.edge.supervisor import DriverSlot

__all__ = ["Route", "build", "build_driver", "down_offline_after_s"]


def build_driver(config: DriverConfig) -> Driver:
    return config.build()


def down_offline_after_s(config: DriverConfig) -> float | None:
    """How long a driver may be down before its devices count as offline (per kind)."""
    return config.down_offline_after_s()


def build(config: EdgeConfig) -> tuple[list[DriverSlot], dict[str, list[Route]]]:
    """Driver slots for the supervisor and command routes (device id → drivers)."""
    slots: list[DriverSlot] = []
    routes: dict[str, list[Route]] = {}
    for drv in config.drivers:
        slots.append(DriverSlot(drv.name, build_driver(drv), down_offline_after_s(drv)))
        for dev in drv.devices:
            routes.setdefault(dev.id, []).append(Route(drv.name, dev.address))
    return slots, routes
