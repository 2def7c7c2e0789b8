"""Payload models of the MQTT contract, version 1.

JSON with a version field ``v``; unknown fields are refused (``extra=forbid``)
and types are strict, so a producer's mistake becomes a dead letter with a
reason rather than a silently reinterpreted value. The committed JSON Schemas
in ``schemas/`` are generated from these models (``eldersafe schemas``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

Metric = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Unit = Annotated[str, StringConstraints(max_length=16)]
DataKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Scalar = bool | int | float | Annotated[str, StringConstraints(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EventType(StrEnum):
    """Discrete device events; the alert engine maps them to alert types (GB 38600 risks)."""

    SOS = "sos"
    FALL = "fall"
    CANCEL = "cancel"
    REMOVED = "removed"
    GEOFENCE_EXIT = "geofence_exit"
    SUPERVISION = "supervision"
    TEST = "test"
    SMOKE = "smoke"
    RESIDUAL_CURRENT = "residual_current"
    CABLE_TEMPERATURE = "cable_temperature"
    OVER_CURRENT = "over_current"
    DEVICE_FAULT = "device_fault"
    LOW_BATTERY = "low_battery"
    TAMPER = "tamper"
    DEVICE_OFFLINE = "device_offline"


class Phase(StrEnum):
    """``raise``/``clear`` for level conditions (smoke bit set/cleared), ``pulse`` for a press."""

    RAISE = "raise"
    CLEAR = "clear"
    PULSE = "pulse"


class EventPayload(_Strict):
    """``…/{device}/event``, QoS 1. ``event_id`` is stable across repeats and retries."""

    v: Literal[1]
    event_id: uuid.UUID
    type: EventType
    phase: Phase
    time: AwareDatetime
    profile: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")]
    data: dict[DataKey, Scalar] = Field(default_factory=dict, max_length=32)


class ReadingItem(_Strict):
    metric: Metric
    value: float
    unit: Unit = ""
    time: AwareDatetime | None = None  # defaults to the message's time


class TelemetryPayload(_Strict):
    """``…/{device}/telemetry``: one reading or a batch (up to 1000)."""

    v: Literal[1]
    time: AwareDatetime
    readings: list[ReadingItem] = Field(min_length=1, max_length=1000)


class StatusPayload(_Strict):
    """``…/{device}/status``, retained: the device's health as the edge sees it."""

    v: Literal[1]
    time: AwareDatetime
    online: bool
    battery: Annotated[int, Field(ge=0, le=100)] | None = None
    rssi: Annotated[int, Field(ge=-150, le=20)] | None = None
    last_seen: AwareDatetime | None = None
    detail: Annotated[str, StringConstraints(max_length=256)] | None = None


class GatewayStatusPayload(_Strict):
    """``…/gateway/{gateway}/status``, retained: birth (online) and last will (offline)."""

    v: Literal[1]
    time: AwareDatetime | None = None
    online: bool
    version: Annotated[str, StringConstraints(max_length=32)] | None = None
    drivers: dict[Annotated[str, StringConstraints(max_length=64)], str] = Field(
        default_factory=dict, max_length=256
    )


class CommandAction(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    ALARM_RECEIVED = "alarm_received"
    LOCATE = "locate"
    SET_CLOCK = "set_clock"
    HUSH = "hush"
    SET_THRESHOLD = "set_threshold"


class CommandPayload(_Strict):
    """``…/{device}/command``, QoS 1: downlink to a device through its gateway."""

    v: Literal[1]
    command_id: uuid.UUID
    action: CommandAction
    time: AwareDatetime
    args: dict[DataKey, Scalar] = Field(default_factory=dict, max_length=16)
    alert_id: uuid.UUID | None = None


class CommandOutcome(StrEnum):
    """How the edge answered a command id (a redelivered command repeats its first answer)."""

    EXECUTED = "executed"  # the device took it (written and acknowledged on its link)
    REFUSED = "refused"  # not carried out: unknown device, action beyond its profile, bad args
    UNREACHABLE = "unreachable"  # the device or its line did not answer after the retries


class CommandResultPayload(_Strict):
    """``…/{device}/command/result``, QoS 1: the edge's answer to one ``command_id``.

    It is how the console learns that the elder's wristband really vibrated
    ("help is coming") or that the button's LED lit.
    """

    v: Literal[1]
    command_id: uuid.UUID
    action: CommandAction
    outcome: CommandOutcome
    time: AwareDatetime
    reason: Annotated[str, StringConstraints(max_length=256)] | None = None
    via: Annotated[str, StringConstraints(max_length=64)] | None = None  # the driver that did it
    alert_id: uuid.UUID | None = None


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "event": EventPayload,
    "telemetry": TelemetryPayload,
    "status": StatusPayload,
    "gateway-status": GatewayStatusPayload,
    "command": CommandPayload,
    "command-result": CommandResultPayload,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The published JSON Schemas, one per payload, keyed by file stem."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in PAYLOAD_MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://eldersafe.invalid/schemas/v1/{name}.json"
        out[name] = schema
    return out


def dump(model: BaseModel) -> bytes:
    """Serialise a payload the way every producer in the project does."""
    return model.model_dump_json(exclude_none=True).encode()


def now_utc() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)
