"""The MQTT contract: strict topics and payloads; committed schemas that cannot drift."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from gateway.contract import schemas_io
from gateway.contract.payloads import (
    CommandAction,
    CommandPayload,
    EventPayload,
    EventType,
    Phase,
    StatusPayload,
    TelemetryPayload,
    dump,
)
from gateway.contract.topics import (
    Channel,
    DeviceTopic,
    GatewayStatusTopic,
    TopicError,
    parse_topic,
    site_filter,
)


def test_device_topic_round_trip() -> None:
    topic = DeviceTopic("home-wang", "wb-1", Channel.EVENT)
    assert str(topic) == "eldersafe/v1/home-wang/wb-1/event"
    assert parse_topic(str(topic)) == topic


def test_gateway_status_topic_round_trip() -> None:
    topic = GatewayStatusTopic("home-wang", "gw-1")
    assert str(topic) == "eldersafe/v1/home-wang/gateway/gw-1/status"
    assert parse_topic(str(topic)) == topic


@pytest.mark.parametrize(
    "bad",
    [
        "eldersafe/v1/Home/wb-1/event",  # upper case
        "eldersafe/v1/home/wb_1/event",  # underscore
        "eldersafe/v1/home/wb-1/alarm",  # unknown channel
        "eldersafe/v2/home/wb-1/event",  # other version
        "eldersafe/v1/home/event",  # too short
        "eldersafe/v1/home/gateway/gw/state",  # not the gateway status
        "eldersafe/v1/" + "a" * 65 + "/wb/event",  # id too long
        "other/v1/home/wb/event",
    ],
)
def test_bad_topics_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(bad)


def test_building_a_topic_with_a_bad_id_is_refused() -> None:
    with pytest.raises(TopicError):
        DeviceTopic("home wang", "wb-1", Channel.EVENT)
    assert site_filter("home-wang", Channel.COMMAND) == "eldersafe/v1/home-wang/+/command"


def test_event_payload_round_trip_and_strictness() -> None:
    event_id = uuid.UUID("6f1c1d4e-8f0a-4d0e-9d5c-3b1f6a2e9c11")
    event = EventPayload(
        v=1,
        event_id=event_id,
        type=EventType.FALL,
        phase=Phase.PULSE,
        time=datetime(2026, 11, 22, 3, 14, tzinfo=UTC),
        profile="es-wb1",
        data={"confidence": 92},
    )
    raw = dump(event)
    assert json.loads(raw) == {
        "v": 1,
        "event_id": str(event_id),
        "type": "fall",
        "phase": "pulse",
        "time": "2026-11-22T03:14:00Z",
        "profile": "es-wb1",
        "data": {"confidence": 92},
    }
    assert EventPayload.model_validate_json(raw) == event
    for mutation in [
        {"v": 2},
        {"type": "explosion"},
        {"time": "2026-11-22T03:14:00"},  # no time zone
        {"event_id": "not-a-uuid"},
        {"extra": 1},
        {"data": {"Bad Key": 1}},
    ]:
        with pytest.raises(ValidationError):
            EventPayload.model_validate_json(json.dumps({**json.loads(raw), **mutation}))


def test_telemetry_status_and_command_payloads() -> None:
    t = TelemetryPayload.model_validate_json(
        b'{"v":1,"time":"2026-11-22T08:00:00+08:00","readings":[{"metric":"residual_current_ma",'
        b'"value":312,"unit":"mA"}]}'
    )
    assert t.readings[0].value == 312.0 and t.time.utcoffset() is not None
    with pytest.raises(ValidationError):
        TelemetryPayload.model_validate_json(b'{"v":1,"time":"2026-11-22T08:00:00Z","readings":[]}')
    with pytest.raises(ValidationError):
        TelemetryPayload.model_validate_json(
            b'{"v":1,"time":"2026-11-22T08:00:00Z","readings":[{"metric":"x","value":"12"}]}'
        )
    with pytest.raises(ValidationError):
        StatusPayload.model_validate_json(
            b'{"v":1,"time":"2026-11-22T08:00:00Z","online":true,"battery":101}'
        )
    cmd = CommandPayload(
        v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=datetime.now(UTC)
    )
    assert CommandPayload.model_validate_json(dump(cmd)) == cmd


def test_committed_json_schemas_match_the_models() -> None:
    rendered = schemas_io.render()
    committed = {p.name: p.read_text() for p in schemas_io.SCHEMA_DIR.glob("*.json")}
    assert committed == rendered, "JSON Schemas drifted from the models: run 'eldersafe schemas'"
    event_schema = json.loads(rendered["event.json"])
    assert event_schema["additionalProperties"] is False
    assert set(event_schema["required"]) >= {"v", "event_id", "type", "phase", "time", "profile"}
