"""The `es-wb1` profile as data (DEVICES.md 1): registered on import."""

from __future__ import annotations

from device_drivers.profiles import Profile, register
from device_drivers.wristband import gatt
from device_drivers.wristband.advert import COMPANY_ID, NAME_PREFIX, decode_advert
from device_drivers.wristband.state import DEDUP_WINDOW_S

ES_WB1 = register(
    Profile(
        name="es-wb1",
        transport="ble",
        description="Smart wristband: SOS button, fall detection, heart rate, SpO2, steps",
        offline_after_s=300.0,
        decoder=decode_advert,
        commands=frozenset({"acknowledge", "locate", "set_clock"}),
        params={
            "company_id": COMPANY_ID,
            "name_prefix": NAME_PREFIX,
            "dedup_window_s": DEDUP_WINDOW_S,
            "alarm_flag_max_s": 600.0,
            "alarm_service_uuid": gatt.ALARM_SERVICE_UUID,
            "alarm_event_uuid": gatt.ALARM_EVENT_UUID,
            "command_uuid": gatt.COMMAND_UUID,
        },
    )
)
