"""Device profiles are data: a name, a transport family and timing, plus a decoder.

A vendor's new device is a new ``Profile`` registered here (or from a plugin
module calling ``register``); no core code changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Profile:
    name: str  # e.g. "es-cb1"
    transport: str  # "serial" | "modbus" | "ble"
    description: str
    offline_after_s: float | None = None  # silence after which a device is offline
    poll_interval_s: float | None = None  # for polled transports
    decoder: Callable[..., Any] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    # downlink actions the device can carry out (``CommandAction`` values); the
    # edge refuses anything else before it reaches the wire
    commands: frozenset[str] = frozenset()


_REGISTRY: dict[str, Profile] = {}


def register(profile: Profile) -> Profile:
    if profile.name in _REGISTRY and _REGISTRY[profile.name] != profile:
        raise ValueError(f"profile {profile.name!r} already registered differently")
    _REGISTRY[profile.name] = profile
    return profile


def get(name: str) -> Profile:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown device profile {name!r}; known: {sorted(_REGISTRY)}") from None


def all_profiles() -> Mapping[str, Profile]:
    return dict(_REGISTRY)
