"""Turning raw MQTT messages into rows: strict validation, dead letters with a reason.

Pure and synchronous so it can run inside the socket read path and be tested
without a broker. Every message ends up in exactly one place: a row list, the
status map, the command-ignore count or the dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import orjson
from pydantic import ValidationError

from gateway.contract.payloads import (
    EventPayload,
    GatewayStatusPayload,
    StatusPayload,
    TelemetryPayload,
)
from gateway.contract.topics import (
    Channel,
    DeviceTopic,
    GatewayStatusTopic,
    TopicError,
    parse_topic,
)

TelemetryRow = tuple[datetime, str, str, str, float, str]
EventRow = tuple[object, datetime, str, str, str, str, str, str]  # data as JSON text
StatusRow = tuple[str, str, bool, int | None, int | None, str | None, datetime]
DeadLetter = tuple[str, bytes, str]

_validate_telemetry = TelemetryPayload.model_validate_json
_validate_event = EventPayload.model_validate_json
_validate_status = StatusPayload.model_validate_json
_validate_gateway = GatewayStatusPayload.model_validate_json


def _reason(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[:3]
    parts = [f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in first]
    more = exc.error_count() - len(first)
    return "invalid payload: " + "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


@dataclass
class Batch:
    telemetry: list[TelemetryRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    statuses: dict[tuple[str, str], StatusRow] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    acks: dict[int, list[int]] = field(default_factory=dict)  # epoch -> packet ids
    raw: list[tuple[str, bytes]] = field(default_factory=list)  # to isolate a poison message
    messages: int = 0
    ignored: int = 0

    def __bool__(self) -> bool:
        return self.messages > 0


class Classifier:
    """Validates one message into a ``Batch``; caches parsed topics (devices repeat)."""

    def __init__(self, topic_cache_size: int = 200_000) -> None:
        self._topics: dict[str, DeviceTopic | GatewayStatusTopic] = {}
        self._cache_size = topic_cache_size

    def _topic(self, topic: str) -> DeviceTopic | GatewayStatusTopic:
        t = self._topics.get(topic)
        if t is None:
            t = parse_topic(topic)
            if len(self._topics) >= self._cache_size:
                self._topics.clear()
            self._topics[topic] = t
        return t

    def add(self, batch: Batch, topic: str, payload: bytes) -> None:
        batch.messages += 1
        batch.raw.append((topic, payload))
        try:
            t = self._topic(topic)
        except TopicError as exc:
            batch.dead.append((topic, payload, str(exc)))
            return
        try:
            if type(t) is DeviceTopic:
                channel = t.channel
                if channel is Channel.TELEMETRY:
                    msg = _validate_telemetry(payload)
                    site, device, default_time = t.site, t.device, msg.time
                    batch.telemetry.extend(
                        [
                            (r.time or default_time, site, device, r.metric, r.value, r.unit)
                            for r in msg.readings
                        ]
                    )
                elif channel is Channel.EVENT:
                    ev = _validate_event(payload)
                    batch.events.append(
                        (
                            ev.event_id,
                            ev.time,
                            t.site,
                            t.device,
                            ev.type.value,
                            ev.phase.value,
                            ev.profile,
                            orjson.dumps(ev.data).decode(),
                        )
                    )
                elif channel is Channel.STATUS:
                    st = _validate_status(payload)
                    self._status(
                        batch,
                        (t.site, t.device, st.online, st.battery, st.rssi, st.detail, st.time),
                    )
                else:  # our own downlink commands: not ingest's to store
                    batch.ignored += 1
            else:
                assert isinstance(t, GatewayStatusTopic)
                gw = _validate_gateway(payload)
                detail = ",".join(f"{k}={v}" for k, v in sorted(gw.drivers.items())) or gw.version
                when = gw.time or datetime.now().astimezone()
                self._status(
                    batch, (t.site, f"gateway:{t.gateway}", gw.online, None, None, detail, when)
                )
        except ValidationError as exc:
            batch.dead.append((topic, payload, _reason(exc)))

    @staticmethod
    def _status(batch: Batch, row: StatusRow) -> None:
        key = (row[0], row[1])
        old = batch.statuses.get(key)
        if old is None or old[6] <= row[6]:
            batch.statuses[key] = row
