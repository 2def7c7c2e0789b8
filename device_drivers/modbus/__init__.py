"""es-ef1 (electrical-fire detector) and es-sd1 (smoke detector) on Modbus RTU.

Importing the package registers both profiles and the ``kind: modbus`` driver.
``registers`` holds the maps as data and the pure decoders; ``driver`` polls a
bus. Another vendor's Modbus detector is a ``RegisterMap`` registered with
``register_modbus_profile`` (from a plugin module): no code here changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from device_drivers.modbus.registers import ES_EF1, ES_SD1, RegisterMap, decode_block
from device_drivers.profiles import Profile, get, register

TRANSPORT = "modbus"


def register_modbus_profile(
    regmap: RegisterMap,
    description: str,
    commands: Iterable[str],
    *,
    decoder: Callable[..., Any] | None = None,
    offline_after_failed_polls: int = 3,
) -> Profile:
    """Register a Modbus RTU device profile: its register map is the whole driver-side story.

    ``decoder`` turns a polled block into the vendor's own frozen state (for
    tools and tests); the bus driver itself works from the map.
    """
    return register(
        Profile(
            name=regmap.profile,
            transport=TRANSPORT,
            description=description,
            poll_interval_s=regmap.poll_interval_s,
            decoder=decoder or partial(decode_block, regmap),
            commands=frozenset(commands),
            params={
                "driver": "device_drivers.modbus.driver:ModbusBusDriver",
                "register_map": regmap,
                "baudrate": 9600,
                "offline_after_failed_polls": offline_after_failed_polls,
            },
        )
    )


def register_map(profile: str) -> RegisterMap:
    """The register map of a registered Modbus profile (KeyError / ValueError otherwise)."""
    regmap = get(profile).params.get("register_map")
    if not isinstance(regmap, RegisterMap):
        raise ValueError(f"profile {profile!r} is not a Modbus profile")
    return regmap


# DEVICES.md 3: only es-sd1 has the hush coil; es-ef1 has writable thresholds
ES_EF1_PROFILE = register_modbus_profile(
    ES_EF1,
    "Electrical-fire detector: residual current, cable temperature",
    {"set_threshold"},
)
ES_SD1_PROFILE = register_modbus_profile(
    ES_SD1, "Photoelectric smoke detector, networked", {"hush"}
)

# The site file's ``kind: modbus``: validates devices against the profiles above.
from device_drivers.modbus.kind import ModbusDriverConfig  # noqa: E402

__all__ = [
    "ES_EF1_PROFILE",
    "ES_SD1_PROFILE",
    "TRANSPORT",
    "ModbusDriverConfig",
    "register_map",
    "register_modbus_profile",
]
