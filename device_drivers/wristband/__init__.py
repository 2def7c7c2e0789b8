"""`es-wb1` smart wristband over BLE: pure codecs, a bleak driver, the profile.

Importing the package registers the ``es-wb1`` profile.
"""

from device_drivers.wristband.advert import WristbandAdvert, decode_advert
from device_drivers.wristband.driver import WristbandDriver, WristbandStats, normalize_address
from device_drivers.wristband.gatt import AlarmEvent, AlarmType, HeartRateMeasurement
from device_drivers.wristband.profile import ES_WB1

__all__ = [
    "ES_WB1",
    "AlarmEvent",
    "AlarmType",
    "HeartRateMeasurement",
    "WristbandAdvert",
    "WristbandDriver",
    "WristbandStats",
    "decode_advert",
    "normalize_address",
]
