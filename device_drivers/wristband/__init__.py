"""`es-wb1` smart wristband over BLE: pure codecs, the alarm state machine, a bleak driver.

Importing the package registers the ``es-wb1`` profile and ``kind: wristband``
without importing bleak (about 0.1 s, and a dependency an edge with only call
buttons does not need); ``WristbandDriver`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from device_drivers.wristband.advert import WristbandAdvert, decode_advert
from device_drivers.wristband.gatt import AlarmEvent, AlarmType, HeartRateMeasurement
from device_drivers.wristband.kind import WristbandDriverConfig
from device_drivers.wristband.profile import ES_WB1
from device_drivers.wristband.state import WristbandStats, normalize_address

if TYPE_CHECKING:
    from device_drivers.wristband.driver import WristbandDriver

__all__ = [
    "ES_WB1",
    "AlarmEvent",
    "AlarmType",
    "HeartRateMeasurement",
    "WristbandAdvert",
    "WristbandDriver",
    "WristbandDriverConfig",
    "WristbandStats",
    "decode_advert",
    "normalize_address",
]


def __getattr__(name: str) -> Any:
    if name == "WristbandDriver":
        from device_drivers.wristband.driver import WristbandDriver

        return WristbandDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
