"""es-cb1: wireless call buttons behind a serial receiver (DEVICES.md section 2).

Importing the package registers the profile and ``kind: callbutton``; the
layers are ``codec`` (bytes <-> dataclasses), ``framing`` (byte stream ->
frames) and ``driver`` (serial port, dedup, offline timers).
"""

from __future__ import annotations

from device_drivers.callbutton.kind import CallButtonDriverConfig
from device_drivers.callbutton.profile import PROFILE

__all__ = ["PROFILE", "CallButtonDriverConfig"]
