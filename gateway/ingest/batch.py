"""Turning raw MQTT messages into rows: strict validation, dead letters with a reason.

Pure and synchronous so it can run inside the socket read path and be tested
without a broker. Every message ends up in exactly one place: the telemetry
COPY buffer, a row list, the status map, the command-ignore count or the dead
letters. Nothing a message holds may raise out of ``Classifier.add``: whatever
goes wrong becomes that message's dead letter (issue 6 §1: no single message
may stop ingest).

Telemetry, the bulk of the traffic, goes straight into a binary COPY buffer
(PostgreSQL's ``FORMAT BINARY`` rows): no row tuple, and the encoded site and
device of a topic, a metric or a unit are cached, so a reading costs a few
appends to one bytearray. The writer then only ships the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import orjson
from pydantic import ValidationError

from gateway.contract.payloads import (
    CommandResultPayload,
    EventPayload,
    GatewayStatusPayload,
    StatusPayload,
    TelemetryPayload,
    now_utc,
)
from gateway.contract.topics import (
    Channel,
    DeviceTopic,
    GatewayStatusTopic,
    TopicError,
    parse_topic,
)
from gateway.ingest.fastpath import TelemetryFastPath


class DeadReason(StrEnum):
    """Why a message became a dead letter: a small fixed set (a metric label, a column)."""

    TOPIC = "topic"  # not one of the contract's topics (or a reserved id)
    JSON = "json"  # not a JSON document
    SCHEMA = "schema"  # JSON, but not the payload the topic calls for
    RANGE = "range"  # a number or a time outside what the contract accepts
    DATABASE = "database"  # valid by the contract, refused by the database
    INTERNAL = "internal"  # a bug of ours; the message is kept so it can be replayed


TELEMETRY_COLUMNS = "time, site_id, device_id, metric, value, unit"  # the COPY buffer's rows
EventRow = tuple[object, datetime, str, str, str, str, str, str]  # data as JSON text
StatusRow = tuple[str, str, bool, int | None, int | None, str | None, datetime]
CommandResultRow = tuple[
    object, str, str, str, str, str | None, str | None, object | None, datetime
]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    kind: DeadReason
    dup: bool = False  # MQTT DUP flag: a redelivery, not a new occurrence


# pydantic error types that mean "a value out of the accepted range", not "wrong shape"
_RANGE_ERRORS = frozenset(
    {
        "finite_number",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "time_window",
        "int_out_of_range",
    }
)
_JSON_ERRORS = frozenset({"json_invalid", "json_type"})

_validate_telemetry = TelemetryPayload.model_validate_json
_validate_event = EventPayload.model_validate_json
_validate_status = StatusPayload.model_validate_json
_validate_gateway = GatewayStatusPayload.model_validate_json
_validate_command_result = CommandResultPayload.model_validate_json


def classify_error(exc: ValidationError) -> tuple[DeadReason, str]:
    """The reason class and a short reason text (the most specific errors first)."""
    errors = exc.errors(include_url=False, include_input=False)
    types = {e["type"] for e in errors}
    if types & _JSON_ERRORS:
        kind = DeadReason.JSON
    elif types & _RANGE_ERRORS:
        kind = DeadReason.RANGE
    else:
        kind = DeadReason.SCHEMA
    # a union reports one "*_type" error per branch; the specific one says more
    errors.sort(key=lambda e: e["type"].endswith("_type"))
    first = errors[:3]
    parts = [f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in first]
    more = len(errors) - len(first)
    text = "invalid payload: " + "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
    return kind, text


_ORDINAL_2000 = datetime(2000, 1, 1).toordinal()  # PostgreSQL's timestamp epoch
_ROW_HEAD = struct.Struct("!hiq").pack  # 6 columns; time: 8 bytes, µs since 2000 UTC
_VALUE = struct.Struct("!id").pack  # value: 8 bytes, float8


def pg_time(t: datetime) -> int:
    """Microseconds since 2000-01-01 UTC, exactly (no float), for a binary COPY timestamptz."""
    offset = t.utcoffset()
    seconds = (
        (t.toordinal() - _ORDINAL_2000) * 86400 + t.hour * 3600 + t.minute * 60 + t.second
        - (offset.days * 86400 + offset.seconds if offset is not None else 0)
    )  # fmt: skip
    return seconds * 1_000_000 + t.microsecond - (offset.microseconds if offset is not None else 0)


def _text_field(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(4, "big") + raw


def model_rows(
    msg: TelemetryPayload,
    fields: bytes,
    texts: dict[str, bytes],
    text: Callable[[str], bytes],
) -> bytearray:
    """The COPY rows of a validated payload (the path of what the fast path hands back)."""
    default_time = pg_time(msg.time)
    rows = bytearray()
    for r in msg.readings:
        rows += _ROW_HEAD(6, 8, default_time if r.time is None else pg_time(r.time))
        rows += fields
        rows += texts.get(r.metric) or text(r.metric)
        rows += _VALUE(8, r.value)
        rows += texts.get(r.unit) or text(r.unit)
    return rows


@dataclass
class Batch:
    copy: bytearray = field(default_factory=bytearray)  # telemetry rows, binary COPY format
    telemetry_rows: int = 0
    events: list[EventRow] = field(default_factory=list)
    statuses: dict[tuple[str, str], StatusRow] = field(default_factory=dict)
    command_results: list[CommandResultRow] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    sites: dict[str, int] = field(default_factory=dict)  # stored messages per site
    acks: dict[int, list[int]] = field(default_factory=dict)  # epoch -> packet ids
    raw: list[tuple[str, bytes, bool]] = field(default_factory=list)  # to isolate a poison one
    messages: int = 0
    ignored: int = 0
    arrived: float = 0.0  # monotonic time its first message was read (the ingest lag)

    def __bool__(self) -> bool:
        return self.messages > 0


class Classifier:
    """Validates one message into a ``Batch``; caches parsed topics (devices repeat)."""

    def __init__(self, topic_cache_size: int = 200_000) -> None:
        self._fast = TelemetryFastPath()
        self._topics: dict[str, tuple[DeviceTopic | GatewayStatusTopic, bytes]] = {}
        self._telemetry: dict[str, tuple[str, bytes]] = {}  # topic -> its site, COPY prefix
        self._texts: dict[str, bytes] = {}  # metric or unit -> its COPY field
        self._cache_size = topic_cache_size

    def _topic(self, topic: str) -> tuple[DeviceTopic | GatewayStatusTopic, bytes]:
        """The parsed topic and, for a device, its site and device as COPY fields."""
        cached = self._topics.get(topic)
        if cached is None:
            t = parse_topic(topic)
            fields = b""
            if type(t) is DeviceTopic:
                fields = _text_field(t.site) + _text_field(t.device)
            if len(self._topics) >= self._cache_size:
                self._topics.clear()
                self._telemetry.clear()
            cached = self._topics[topic] = (t, fields)
            if type(t) is DeviceTopic and t.channel is Channel.TELEMETRY:
                self._telemetry[topic] = (t.site, fields)
        return cached

    def is_event(self, topic: str) -> bool:
        """Whether ``topic`` is a device's event channel (the alarm path); never raises."""
        if topic in self._telemetry:  # the bulk of the traffic answers here
            return False
        try:
            t = self._topic(topic)[0]
        except Exception:  # a bad topic is a dead letter of the bulk lane
            return False
        return type(t) is DeviceTopic and t.channel is Channel.EVENT

    def _text(self, value: str) -> bytes:
        field_ = self._texts.get(value)
        if field_ is None:
            if len(self._texts) >= self._cache_size:
                self._texts.clear()
            field_ = self._texts[value] = _text_field(value)
        return field_

    def add(self, batch: Batch, topic: str, payload: bytes, dup: bool = False) -> None:
        """Put one message into ``batch``; never raises."""
        batch.messages += 1
        batch.raw.append((topic, payload, dup))
        telemetry = self._telemetry.get(topic)
        if telemetry is not None:  # the bulk of the traffic: a known topic, the fast path
            fast = self._fast.rows(payload, telemetry[1])  # never raises
            if fast is not None:
                batch.copy += fast[0]
                batch.telemetry_rows += fast[1]
                sites = batch.sites
                sites[telemetry[0]] = sites.get(telemetry[0], 0) + 1
                return
        try:
            t, fields = self._topic(topic)
        except TopicError as exc:
            batch.dead.append(DeadLetter(topic, payload, str(exc), DeadReason.TOPIC, dup))
            return
        except Exception as exc:
            batch.dead.append(internal_dead_letter(topic, payload, exc, dup))
            return
        try:
            site = self._rows(batch, t, fields, payload)
        except ValidationError as exc:
            kind, reason = classify_error(exc)
            batch.dead.append(DeadLetter(topic, payload, reason, kind, dup))
            return
        except Exception as exc:
            batch.dead.append(internal_dead_letter(topic, payload, exc, dup))
            return
        if site is not None:
            sites = batch.sites
            sites[site] = sites.get(site, 0) + 1

    def _rows(
        self, batch: Batch, t: DeviceTopic | GatewayStatusTopic, fields: bytes, payload: bytes
    ) -> str | None:
        """Validate and append the rows; return the site whose message is stored (or None)."""
        if type(t) is DeviceTopic:
            channel = t.channel
            if channel is Channel.TELEMETRY:
                fast = self._fast.rows(payload, fields)
                if fast is None:  # refused or unusual: the model decides (and says why)
                    msg = _validate_telemetry(payload)
                    fast = model_rows(msg, fields, self._texts, self._text), len(msg.readings)
                batch.copy += fast[0]  # appended whole: a failure leaves the batch untouched
                batch.telemetry_rows += fast[1]
            elif channel is Channel.EVENT:
                ev = _validate_event(payload)
                data = orjson.dumps(ev.data).decode()  # before appending: it may raise
                batch.events.append(
                    (ev.event_id, ev.time, t.site, t.device, ev.type.value, ev.phase.value,
                     ev.profile, data)
                )  # fmt: skip
            elif channel is Channel.STATUS:
                st = _validate_status(payload)
                self._status(
                    batch, (t.site, t.device, st.online, st.battery, st.rssi, st.detail, st.time)
                )
            elif channel is Channel.COMMAND_RESULT:
                cr = _validate_command_result(payload)
                batch.command_results.append(
                    (cr.command_id, t.site, t.device, cr.action.value, cr.outcome.value,
                     cr.reason, cr.via, cr.alert_id, cr.time)
                )  # fmt: skip
            else:  # our own downlink commands: not ingest's to store
                batch.ignored += 1
                return None
            return t.site
        assert isinstance(t, GatewayStatusTopic)
        gw = _validate_gateway(payload)
        detail = ",".join(f"{k}={v}" for k, v in sorted(gw.drivers.items())) or gw.version
        when = gw.time or now_utc()
        self._status(batch, (t.site, f"gateway:{t.gateway}", gw.online, None, None, detail, when))
        return t.site

    @staticmethod
    def _status(batch: Batch, row: StatusRow) -> None:
        key = (row[0], row[1])
        old = batch.statuses.get(key)
        if old is None or old[6] <= row[6]:
            batch.statuses[key] = row


def internal_dead_letter(topic: str, payload: bytes, exc: BaseException, dup: bool) -> DeadLetter:
    return DeadLetter(
        topic, payload, f"internal error: {type(exc).__name__}: {exc}"[:1000],
        DeadReason.INTERNAL, dup,
    )  # fmt: skip
