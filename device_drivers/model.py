"""What every driver hands to the edge: typed observations free of transport detail.

Drivers speak in physical addresses (a BLE MAC, a button id, a Modbus unit on a
bus); the edge maps them to the site's device ids. Two kinds of alarm input:

* an ``Occurrence`` is a pulse (a button press, a wristband SOS). Repeats of
  one physical event carry the same ``dedup_key``; the edge keeps a durable
  ledger so one press is one event across repeats, receivers and restarts.
* a ``Condition`` is a level (the smoke bit, leakage over threshold, offline).
  Drivers report the level they observe, as often as they like; the edge keeps
  the last level durably and publishes only changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

Scalar = int | float | str | bool


class DecodeError(ValueError):
    """Bytes that do not form a valid message of the profile; never anything else."""


class CommandError(RuntimeError):
    """A downlink command could not be carried out (device unknown, transport down)."""

    def __init__(self, message: str, *, recoverable: bool) -> None:
        super().__init__(message)
        self.recoverable = recoverable


class OccurrenceKind(StrEnum):
    """Pulse events; values are the MQTT contract's event types."""

    SOS = "sos"
    FALL = "fall"
    CANCEL = "cancel"
    REMOVED = "removed"  # wristband taken off the wrist
    GEOFENCE_EXIT = "geofence_exit"
    SUPERVISION = "supervision"  # periodic check-in
    TEST = "test"  # test button on a detector


class ConditionKind(StrEnum):
    """Level conditions; values are the MQTT contract's event types."""

    SMOKE = "smoke"
    RESIDUAL_CURRENT = "residual_current"
    CABLE_TEMPERATURE = "cable_temperature"
    OVER_CURRENT = "over_current"
    DEVICE_FAULT = "device_fault"
    LOW_BATTERY = "low_battery"
    TAMPER = "tamper"
    OFFLINE = "device_offline"


@dataclass(frozen=True, slots=True)
class Occurrence:
    address: str
    kind: OccurrenceKind
    dedup_key: str
    dedup_window_s: float
    occurred_at: float | None = None  # Unix seconds when the device states it
    data: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Condition:
    address: str
    kind: ConditionKind
    active: bool
    data: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reading:
    """One telemetry value, e.g. heart_rate 72 bpm or residual_current 120 mA."""

    address: str
    metric: str
    value: float
    unit: str


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """Device health for the retained status topic (battery, signal, last seen)."""

    address: str
    online: bool
    battery: int | None = None
    rssi: int | None = None


Observation = Occurrence | Condition | Reading | LinkStatus
ObservationSink = Callable[[Observation], Awaitable[None]]


class CommandAction(StrEnum):
    ACKNOWLEDGE = "acknowledge"  # "help is coming": wristband vibrates, button LED steady
    ALARM_RECEIVED = "alarm_received"  # button LED blinks
    LOCATE = "locate"
    SET_CLOCK = "set_clock"
    HUSH = "hush"
    SET_THRESHOLD = "set_threshold"


@dataclass(frozen=True, slots=True)
class Command:
    address: str
    action: CommandAction
    args: Mapping[str, Scalar] = field(default_factory=dict)


class Driver(Protocol):
    """A running reader of one transport (a serial port, a Modbus bus, a BLE adapter).

    ``run`` reads until cancelled and raises when its transport fails; the
    edge's supervisor restarts it with backoff. ``sink`` applies back-pressure
    and never drops: a driver awaits it. Counters outlive the runs.
    """

    async def run(self, sink: ObservationSink) -> None: ...

    async def execute(self, command: Command) -> None: ...

    def counters_snapshot(self) -> Mapping[str, Mapping[str, int]]:
        """What the driver saw that did not become an observation (bad CRC, noise,
        resyncs, duplicates, decode errors, failed polls …), as monotonic counts.

        Keyed by scope: ``"line"`` for the transport as a whole, a device address
        for per-device counts. The edge exports them (health.json, Prometheus).
        """
        ...
