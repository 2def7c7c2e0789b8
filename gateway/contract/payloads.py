"""Payload models of the MQTT contract, version 1.

JSON with a version field ``v``; unknown fields are refused (``extra=forbid``)
and types are strict, so a producer's mistake becomes a dead letter with a
reason rather than a silently reinterpreted value. The committed JSON Schemas
in ``schemas/`` are generated from these models (``eldersafe schemas``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# The time window of every time a device or gateway reports (what the server
# stores): not before 2000 (a clock that never synced, or garbage) and not more
# than a day ahead of the validating process's own clock. Times outside it
# would sort wrongly, escape retention, or not even be storable (year 10000).
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_AHEAD = timedelta(hours=24)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# The clock the window is measured against (POSIX seconds), read at each
# validation, not at import: a long-running server keeps a current window.
clock: Callable[[], float] = time.time
_ORDINAL_1970 = datetime(1970, 1, 1).toordinal()
_DAY_S = 86400
_DAY_US = _DAY_S * 1_000_000


def window_limit() -> int:
    """Now + 24 h, in microseconds since 0001-01-01 UTC (the scale ``check_window`` works on)."""
    return round((clock() + MAX_AHEAD.total_seconds()) * 1e6) + _ORDINAL_1970 * _DAY_US


_NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold U+0000
Metric = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Unit = Annotated[str, StringConstraints(max_length=16, pattern=_NO_NUL)]
DataKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Text = Annotated[str, StringConstraints(max_length=256, pattern=_NO_NUL)]
Scalar = bool | int | FiniteFloat | Text
ReportedTime = Annotated[
    AwareDatetime,
    Field(
        ge=EARLIEST_TIME,
        description="with a UTC offset; from 2000-01-01T00:00Z to 24 h after the receiver's now",
    ),
]


def check_window(field: str | tuple[object, ...], value: datetime | None, limit: int) -> None:
    """Refuse a time after ``limit`` (from ``window_limit``); the lower bound is native.

    Ingest's hot path: comparing aware datetimes costs a call of the offset's
    ``utcoffset`` per comparison, so the wall-clock fields are compared first.
    An offset is less than a day, so a local time a day before the limit is
    always before it in UTC. Integers throughout: exact to the microsecond.
    """
    if value is None:
        return
    local = (
        value.toordinal() * _DAY_S + value.hour * 3600 + value.minute * 60 + value.second
    ) * 1_000_000 + value.microsecond
    if local <= limit - _DAY_US:
        return
    offset = value.utcoffset()
    assert offset is not None  # AwareDatetime
    if local - (offset.days * _DAY_S + offset.seconds) * 1_000_000 - offset.microseconds > limit:
        raise PydanticCustomError(
            "time_window",
            "{field} {value} is more than 24 h ahead of the receiver's clock",
            {
                "field": field if isinstance(field, str) else ".".join(map(str, field)),
                "value": value.isoformat(),
            },
        )


def check_scalars(values: object) -> object:
    """Integers in ``data``/``args`` must fit 64 bits (jsonb and every consumer's int64).

    Without this a huge integer would fall through to the float branch of the
    union and be stored silently rounded.
    """
    if isinstance(values, dict):
        for key, v in values.items():
            if type(v) is int and not INT64_MIN <= v <= INT64_MAX:
                raise PydanticCustomError(
                    "int_out_of_range",
                    "{key}: integer does not fit in 64 bits",
                    {"key": str(key)[:64]},
                )
    return values


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
    time: ReportedTime
    profile: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")]
    data: dict[DataKey, Scalar] = Field(default_factory=dict, max_length=32)

    @field_validator("data", mode="before")
    @classmethod
    def refuse_huge_ints(cls, value: object) -> object:
        return check_scalars(value)

    @model_validator(mode="after")
    def refuse_future_time(self) -> EventPayload:
        check_window("time", self.time, window_limit())
        return self


class ReadingItem(_Strict):
    metric: Metric
    value: FiniteFloat
    unit: Unit = ""
    time: ReportedTime | None = None  # defaults to the message's time


class TelemetryPayload(_Strict):
    """``…/{device}/telemetry``: one reading or a batch (up to 1000)."""

    v: Literal[1]
    time: ReportedTime
    readings: list[ReadingItem] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def refuse_future_time(self) -> TelemetryPayload:
        # one clock read per message, not per reading (ingest's hot path)
        limit = window_limit()
        check_window("time", self.time, limit)
        surely_in = limit - _DAY_US  # check_window's first test, inlined: up to 1000 readings
        for i, reading in enumerate(self.readings):
            t = reading.time
            if t is not None and (
                (t.toordinal() * _DAY_S + t.hour * 3600 + t.minute * 60 + t.second) * 1_000_000
                + t.microsecond
                > surely_in
            ):
                check_window(("readings", i, "time"), t, limit)
        return self


class StatusPayload(_Strict):
    """``…/{device}/status``, retained: the device's health as the edge sees it."""

    v: Literal[1]
    time: ReportedTime
    online: bool
    battery: Annotated[int, Field(ge=0, le=100)] | None = None
    rssi: Annotated[int, Field(ge=-150, le=20)] | None = None
    last_seen: ReportedTime | None = None
    detail: Text | None = None

    @model_validator(mode="after")
    def refuse_future_time(self) -> StatusPayload:
        limit = window_limit()
        check_window("time", self.time, limit)
        check_window("last_seen", self.last_seen, limit)
        return self


class GatewayStatusPayload(_Strict):
    """``…/gateway/{gateway}/status``, retained: birth (online) and last will (offline)."""

    v: Literal[1]
    time: ReportedTime | None = None
    online: bool
    version: Annotated[str, StringConstraints(max_length=32, pattern=_NO_NUL)] | None = None
    drivers: dict[Annotated[str, StringConstraints(max_length=64, pattern=_NO_NUL)], Text] = Field(
        default_factory=dict, max_length=256
    )

    @model_validator(mode="after")
    def refuse_future_time(self) -> GatewayStatusPayload:
        check_window("time", self.time, window_limit())
        return self


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
    time: AwareDatetime  # not windowed: an edge with a wrong clock must still obey commands
    args: dict[DataKey, Scalar] = Field(default_factory=dict, max_length=16)
    alert_id: uuid.UUID | None = None

    @field_validator("args", mode="before")
    @classmethod
    def refuse_huge_ints(cls, value: object) -> object:
        return check_scalars(value)


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
    time: ReportedTime
    reason: Text | None = None
    via: Annotated[str, StringConstraints(max_length=64, pattern=_NO_NUL)] | None = None  # driver
    alert_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def refuse_future_time(self) -> CommandResultPayload:
        check_window("time", self.time, window_limit())
        return self


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
    return datetime.now(UTC)
