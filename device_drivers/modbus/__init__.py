"""es-ef1 (electrical-fire detector) and es-sd1 (smoke detector) on Modbus RTU.

Importing the package registers both profiles. ``registers`` holds the maps as
data and the pure decoders; ``driver`` polls a bus.
"""

from __future__ import annotations

from functools import partial

from device_drivers.modbus.registers import ES_EF1, ES_SD1, RegisterMap, decode_block
from device_drivers.profiles import Profile, register


def _profile(regmap: RegisterMap, description: str, commands: frozenset[str]) -> Profile:
    return register(
        Profile(
            name=regmap.profile,
            transport="modbus",
            description=description,
            poll_interval_s=regmap.poll_interval_s,
            decoder=partial(decode_block, regmap),
            commands=commands,
            params={
                "driver": "device_drivers.modbus.driver:ModbusBusDriver",
                "register_map": regmap,
                "baudrate": 9600,
                "offline_after_failed_polls": 3,
            },
        )
    )


# DEVICES.md 3: only es-sd1 has the hush coil; es-ef1 has writable thresholds
ES_EF1_PROFILE = _profile(
    ES_EF1,
    "Electrical-fire detector: residual current, cable temperature",
    frozenset({"set_threshold"}),
)
ES_SD1_PROFILE = _profile(
    ES_SD1, "Photoelectric smoke detector, networked", frozenset({"hush"})
)

__all__ = ["ES_EF1_PROFILE", "ES_SD1_PROFILE"]
