"""The `es-cb1` profile as data (DEVICES.md 2): registered on import."""

from __future__ import annotations

from device_drivers.callbutton.codec import decode_frame
from device_drivers.profiles import Profile, register

PROFILE = register(
    Profile(
        name="es-cb1",
        transport="serial",
        description="One-key call buttons through a 9600 8N1 serial receiver",
        offline_after_s=90.0,
        decoder=decode_frame,
        commands=frozenset({"acknowledge", "alarm_received"}),
        params={
            "driver": "device_drivers.callbutton.driver:CallButtonReceiverDriver",
            "baudrate": 9600,
            "dedup_window_s": 60.0,
            "button_supervision_s": 3600.0,
            "repeats_per_event": 3,
        },
    )
)
