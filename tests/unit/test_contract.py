"""The MQTT contract: strict topics and payloads; committed schemas that cannot drift."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.contract import schemas_io
from gateway.contract.payloads import (
    CommandAction,
    CommandOutcome,
    CommandPayload,
    CommandResultPayload,
    EventPayload,
    EventType,
    GatewayStatusPayload,
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


# -- issue 6 §2: values that are not real numbers or real times ----------------------

_EVENT = (
    '{{"v":1,"event_id":"6f1c1d4e-8f0a-4d0e-9d5c-3b1f6a2e9c11","type":"sos","phase":"pulse",'
    '"time":"{time}","profile":"es-cb1","data":{data}}}'
)


def _event(time: str = "2026-11-22T08:00:00Z", data: str = "{}") -> bytes:
    return _EVENT.format(time=time, data=data).encode()


def _error_types(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {e["type"] for e in exc.value.errors()}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryPayload.model_validate_json(
            '{"v":1,"time":"2026-11-22T08:00:00Z","readings":[{"metric":"x","value":'
            + literal
            + "}]}"
        )
    assert "finite_number" in _error_types(exc)
    with pytest.raises(ValidationError) as exc:
        EventPayload.model_validate_json(_event(data='{"x":' + literal + "}"))
    assert "finite_number" in _error_types(exc)


@pytest.mark.parametrize("n", [2**64, 2**63, -(2**63) - 1, 10**400])
def test_integers_beyond_64_bits_are_refused_not_rounded(n: int) -> None:
    with pytest.raises(ValidationError) as exc:
        EventPayload.model_validate_json(_event(data=f'{{"n":{n}}}'))
    assert _error_types(exc) == {"int_out_of_range"}
    with pytest.raises(ValidationError):
        CommandPayload(
            v=1, command_id=uuid.uuid4(), action=CommandAction.LOCATE, time=datetime.now(UTC),
            args={"n": n},
        )  # fmt: skip
    assert EventPayload.model_validate_json(_event(data=f'{{"n":{2**63 - 1}}}')).data == {
        "n": 2**63 - 1
    }


@pytest.mark.parametrize(
    "time",
    [
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "0001-01-01T00:00:00+14:00",  # 1 BC in UTC
        "1999-12-31T23:59:59Z",
        "2000-01-01T07:59:59+08:00",  # 1999 in UTC
        "1970-01-01T00:00:00Z",  # a clock that never synced
    ],
)
def test_times_outside_the_window_are_refused(time: str) -> None:
    with pytest.raises(ValidationError):
        EventPayload.model_validate_json(_event(time=time))
    with pytest.raises(ValidationError):
        StatusPayload.model_validate_json(f'{{"v":1,"online":true,"time":"{time}"}}')
    with pytest.raises(ValidationError):
        StatusPayload.model_validate_json(
            f'{{"v":1,"online":true,"time":"2026-11-22T08:00:00Z","last_seen":"{time}"}}'
        )
    with pytest.raises(ValidationError):
        GatewayStatusPayload.model_validate_json(f'{{"v":1,"online":true,"time":"{time}"}}')
    with pytest.raises(ValidationError):
        TelemetryPayload.model_validate_json(
            '{"v":1,"time":"2026-11-22T08:00:00Z","readings":[{"metric":"x","value":1,'
            f'"time":"{time}"}}]}}'
        )


def test_the_window_follows_the_clock_at_validation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upper bound is the validating process's clock + 24 h, read at each validation."""
    from gateway.contract import payloads

    t = "2030-06-01T12:00:00Z"
    monkeypatch.setattr(
        payloads, "clock", lambda: datetime(2030, 5, 31, 11, 59, 59, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValidationError) as exc:
        EventPayload.model_validate_json(_event(time=t))
    assert _error_types(exc) == {"time_window"}
    monkeypatch.setattr(
        payloads, "clock", lambda: datetime(2030, 5, 31, 12, 0, 0, tzinfo=UTC).timestamp()
    )
    assert EventPayload.model_validate_json(_event(time=t)).time == datetime(
        2030, 6, 1, 12, tzinfo=UTC
    )
    with pytest.raises(ValidationError) as exc:
        TelemetryPayload.model_validate_json(
            '{"v":1,"time":"2030-05-31T12:00:00Z","readings":[{"metric":"x","value":1},'
            '{"metric":"x","value":2,"time":"2030-06-01T12:00:01Z"}]}'
        )
    assert "readings.1.time" in str(exc.value)
    monkeypatch.setattr(
        payloads, "clock", lambda: datetime(2030, 5, 31, 12, 0, 1, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValidationError):  # the model the edge builds is checked the same way
        CommandResultPayload(
            v=1, command_id=uuid.uuid4(), action=CommandAction.LOCATE,
            outcome=CommandOutcome.EXECUTED, time=datetime(2030, 6, 1, 12, 0, 2, tzinfo=UTC),
        )  # fmt: skip


def test_text_the_database_cannot_hold_is_refused() -> None:
    with pytest.raises(ValidationError):
        EventPayload.model_validate_json(_event(data='{"x":"a\\u0000"}'))
    with pytest.raises(ValidationError):
        StatusPayload.model_validate_json(
            '{"v":1,"online":true,"time":"2026-11-22T08:00:00Z","detail":"\\u0000"}'
        )
    with pytest.raises(ValidationError):  # a lone surrogate is not UTF-8
        EventPayload.model_validate_json(_event(data='{"x":"\\ud800"}'))


def test_dead_letter_reason_classes() -> None:
    from gateway.ingest.batch import Batch, Classifier, DeadReason

    classifier = Classifier()
    batch = Batch()
    cases = {
        ("eldersafe/v1/home/gateway/event", _event()): DeadReason.TOPIC,  # reserved id
        ("eldersafe/v1/home/BAD/event", _event()): DeadReason.TOPIC,
        ("eldersafe/v1/home/btn/event", b"{nope"): DeadReason.JSON,
        ("eldersafe/v1/home/btn/event", b"[]"): DeadReason.SCHEMA,
        ("eldersafe/v1/home/btn/event", _event(data='{"x":true,"y":[1]}')): DeadReason.SCHEMA,
        ("eldersafe/v1/home/btn/event", _event(data='{"x":1e400}')): DeadReason.RANGE,
        ("eldersafe/v1/home/btn/event", _event(time="1999-01-01T00:00:00Z")): DeadReason.RANGE,
    }
    for (topic, payload), _ in cases.items():
        classifier.add(batch, topic, payload)
    assert [d.kind for d in batch.dead] == list(cases.values())
    assert batch.messages == len(cases) and not batch.events
    assert "reserved" in batch.dead[0].reason


def test_a_command_result_becomes_a_row_and_a_command_is_ignored() -> None:
    from gateway.ingest.batch import Batch, Classifier

    result = CommandResultPayload(
        v=1, command_id=uuid.uuid4(), action=CommandAction.HUSH, outcome=CommandOutcome.REFUSED,
        time=datetime.now(UTC), reason="not an es-sd1",
    )  # fmt: skip
    command = CommandPayload(
        v=1, command_id=uuid.uuid4(), action=CommandAction.HUSH, time=datetime.now(UTC)
    )
    batch = Batch()
    classifier = Classifier()
    classifier.add(batch, "eldersafe/v1/home/ef-1/command/result", dump(result))
    classifier.add(batch, "eldersafe/v1/home/ef-1/command", dump(command))
    assert not batch.dead and batch.ignored == 1 and batch.sites == {"home": 1}
    assert batch.command_results == [
        (result.command_id, "home", "ef-1", "hush", "refused", "not an es-sd1", None, None,
         result.time)
    ]  # fmt: skip


@given(
    at=st.datetimes(min_value=datetime(2030, 5, 29), max_value=datetime(2030, 6, 3)),
    offset_s=st.integers(-86399, 86399),
)
def test_the_window_fast_path_agrees_with_exact_comparison(at: datetime, offset_s: int) -> None:
    """``check_window`` compares wall-clock fields first; it must decide like an exact
    comparison of instants for every offset."""
    from datetime import timedelta, timezone

    from gateway.contract import payloads

    now = datetime(2030, 5, 31, 12, 0, 0, 250_000, tzinfo=UTC)
    value = at.replace(tzinfo=timezone(timedelta(seconds=offset_s)))
    late = value > now + timedelta(hours=24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(payloads, "clock", now.timestamp)
        limit = payloads.window_limit()
    try:
        payloads.check_window("time", value, limit)
        refused = False
    except Exception:
        refused = True
    assert refused == late


def test_binary_copy_rows_hold_exact_times_and_values() -> None:
    """The classifier writes PostgreSQL's binary COPY rows itself: check them field by field."""
    import struct
    from datetime import timedelta, timezone

    from gateway.ingest.batch import Batch, Classifier, pg_time

    pg_epoch = datetime(2000, 1, 1, tzinfo=UTC)
    for t in [
        datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8))),
        datetime(2000, 1, 1, tzinfo=timezone(timedelta(hours=-14))),
        datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=45, microseconds=1))),
    ]:
        assert pg_time(t) == (t - pg_epoch) // timedelta(microseconds=1)
    batch = Batch()
    Classifier().add(
        batch,
        "eldersafe/v1/home-1/wb-1/telemetry",
        b'{"v":1,"time":"2026-11-22T08:00:00Z","readings":['
        b'{"metric":"spo2","value":97.5,"unit":"%","time":"2026-11-22T16:00:00.5+08:00"},'
        b'{"metric":"hr","value":-1e300}]}',
    )
    assert batch.telemetry_rows == 2 and not batch.dead
    rows, pos = [], 0
    data = bytes(batch.copy)
    while pos < len(data):
        (count,) = struct.unpack_from("!h", data, pos)
        pos += 2
        fields = []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", data, pos)
            fields.append(data[pos + 4 : pos + 4 + n])
            pos += 4 + n
        rows.append(fields)
    at = pg_epoch + timedelta(microseconds=struct.unpack("!q", rows[0][0])[0])
    assert at == datetime(2026, 11, 22, 8, 0, 0, 500000, tzinfo=UTC)
    assert [r[1:4] for r in rows] == [[b"home-1", b"wb-1", b"spo2"], [b"home-1", b"wb-1", b"hr"]]
    assert [struct.unpack("!d", r[4])[0] for r in rows] == [97.5, -1e300]
    assert [r[5] for r in rows] == [b"%", b""]
    at = pg_epoch + timedelta(microseconds=struct.unpack("!q", rows[1][0])[0])
    assert at == datetime(2026, 11, 22, 8, 0, tzinfo=UTC)  # the message's time
