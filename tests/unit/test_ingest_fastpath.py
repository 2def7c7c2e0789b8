"""The telemetry fast path accepts only what the contract's model accepts, with the same rows.

Generated payloads are valid ones as edges send them and near-valid ones (one
part broken: an extra key, a bool for a number, NaN, a time outside the
window, an odd time format, a long unit, …). For each: whatever the fast path
accepts, ``TelemetryPayload.model_validate_json`` accepts and its rows are the
same bytes; whatever the model refuses, the fast path refuses; and every
payload of the common shape is taken by the fast path itself.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.contract import payloads
from gateway.contract.payloads import TelemetryPayload
from gateway.ingest.batch import Batch, Classifier, model_rows
from gateway.ingest.fastpath import TelemetryFastPath, _text_field

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
FIELDS = _text_field("home-1") + _text_field("wb-1")


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths measure the window against the same injected clock."""
    monkeypatch.setattr(payloads, "clock", lambda: NOW.timestamp())


def model_result(payload: bytes) -> tuple[bytearray, int] | None:
    try:
        msg = TelemetryPayload.model_validate_json(payload)
    except ValidationError:
        return None
    texts: dict[str, bytes] = {}

    def text(value: str) -> bytes:
        return texts.setdefault(value, _text_field(value))

    return model_rows(msg, FIELDS, texts, text), len(msg.readings)


offsets = st.sampled_from(["Z", "+00:00", "-00:00", "+08:00", "-05:30", "+14:00", "-12:00"])
fractions = st.sampled_from(["", ".0", ".5", ".123", ".000001", ".999999"])


@st.composite
def times(draw: st.DrawFn, near_limits: bool = False) -> str:
    """A time in the common shape, mostly inside the window, some at or past its edges."""
    if near_limits:
        base = draw(
            st.sampled_from([datetime(2000, 1, 1, tzinfo=UTC), NOW + timedelta(hours=24), NOW])
        )
        at = base + timedelta(microseconds=draw(st.integers(-2, 2)))
    else:
        at = NOW - timedelta(seconds=draw(st.integers(0, 30 * 86400)))
    offset = draw(offsets)
    tz = (
        UTC
        if offset in ("Z", "+00:00", "-00:00")
        else timezone(
            (1 if offset[0] == "+" else -1)
            * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:]))
        )
    )
    local = at.astimezone(tz)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = draw(fractions)
    if near_limits:
        fraction = f".{local.microsecond:06d}"
    return text + fraction + offset


metrics = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
units = st.sampled_from(["", "bpm", "%", "C", "mV", "°C", "m/s²", "x" * 16, "µS/cm"])
values = st.one_of(
    # beyond ±2**63 the fast path hands a number to pydantic (near-valid cases test those)
    st.floats(-1e18, 1e18, allow_nan=False, allow_infinity=False, width=64),
    st.integers(-(2**53), 2**53),
)


@st.composite
def readings(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {"metric": draw(metrics), "value": draw(values)}
    if draw(st.booleans()):
        item["unit"] = draw(units)
    choice = draw(st.integers(0, 2))
    if choice == 1:
        item["time"] = draw(times())
    elif choice == 2:
        item["time"] = None
    return item


@st.composite
def valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "v": 1,
        "time": draw(times()),
        "readings": draw(st.lists(readings(), min_size=1, max_size=5)),
    }


odd_values = st.sampled_from(
    [True, False, None, "1", [], {}, 2**63, -(2**63) - 1, 2**64, 10**30, 1e300, -0.0]
)
odd_times = st.sampled_from(
    [
        "2026-11-23T12:00:00",  # naive
        "2026-11-23t12:00:00z",
        "2026-11-23 12:00:00Z",
        "2026-11-23T12:00:00.1234567Z",
        "2026-11-23T12:00:60Z",
        "2026-11-23T24:00:00Z",
        "2026-02-30T12:00:00Z",
        "2026-11-23T12:00:00+24:00",
        "2026-11-23T12:00:00+05:60",
        "2026-11-23T12:00Z",
        "2026-11-23",
        "20261123T120000Z",
        "1999-12-31T23:59:59.999999Z",
        "2000-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00+14:00",
        "2026-11-23T12:00:00,5Z",
        "２０２６-11-23T12:00:00Z",
        1700000000,
        None,
        "",
    ]
)


@st.composite
def near_valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with one part broken."""
    doc = draw(valid_docs())
    reading = doc["readings"][0]
    breakage = draw(st.integers(0, 17))
    if breakage == 0:
        doc["extra"] = 1
    elif breakage == 1:
        del doc[draw(st.sampled_from(["v", "time", "readings"]))]
    elif breakage == 2:
        doc["v"] = draw(st.sampled_from([2, 0, True, 1.0, "1", None]))
    elif breakage == 3:
        doc["time"] = draw(odd_times)
    elif breakage == 4:
        reading["time"] = draw(odd_times)
    elif breakage == 5:
        reading["value"] = draw(odd_values)
    elif breakage == 6:
        reading["metric"] = draw(
            st.sampled_from(["", "A", "1a", "a-b", "a" * 65, "a" * 64, "é", "a\n", 5, None])
        )
    elif breakage == 7:
        reading["unit"] = draw(
            st.sampled_from(["x" * 17, "a\x00", None, 1, "é" * 16, "é" * 17, "\U0001f600" * 16])
        )
    elif breakage == 8:
        reading["extra"] = "x"
    elif breakage == 9:
        del reading[draw(st.sampled_from(["metric", "value"]))]
    elif breakage == 10:
        doc["readings"] = []
    elif breakage == 11:
        doc["readings"] = doc["readings"] * 1001
    elif breakage == 12:
        doc["readings"] = draw(st.sampled_from([None, {}, "x", 1]))
    elif breakage == 13:
        doc["readings"][0] = draw(st.sampled_from([None, [], "x", 1]))
    elif breakage == 14:
        doc["time"] = draw(times(near_limits=True))
    elif breakage == 15:
        doc["readings"] = doc["readings"] * 1000
    elif breakage == 17:
        reading["value"] = draw(st.floats(width=64) | st.integers())
    elif breakage == 16:
        reading["time"] = draw(times(near_limits=True))
    return doc


def check(payload: bytes) -> tuple[bytearray, int] | None:
    fast = TelemetryFastPath().rows(payload, FIELDS)
    model = model_result(payload)
    if fast is not None:
        assert model is not None, "the fast path accepted what the model refuses"
        assert fast == model, "the fast path's rows differ from the model's"
    return model


@settings(max_examples=400, deadline=None)
@given(valid_docs())
def test_fast_path_takes_every_valid_payload_with_the_models_rows(doc: dict[str, Any]) -> None:
    payload = json.dumps(doc).encode()
    model = check(payload)
    assert model is not None
    assert TelemetryFastPath().rows(payload, FIELDS) == model


@settings(max_examples=800, deadline=None)
@given(near_valid_docs())
def test_fast_path_accepts_only_what_the_model_accepts(doc: dict[str, Any]) -> None:
    check(json.dumps(doc, allow_nan=True).encode())


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
@example(b'{"v":1,"time":"2026-11-23T12:00:00Z","readings":[{"metric":"a","value":NaN}]}')
@example(b'{"v":1,"time":"2026-11-23T12:00:00Z","readings":[{"metric":"a","value":1e400}]}')
@example(b'{"v":1,"time":"2026-11-23T12:00:00Z","v":1,"readings":[{"metric":"a","value":1}]}')
@example(
    b'{"v":1,"time":"2026-11-23T12:00:00Z","readings":[{"metric":"a","metric":"b","value":1}]}'
)
@example(
    b'{"v":1,"time":"2026-11-23T12:00:00Z","readings":[{"metric":"a","value":1,"unit":"\\u0000"}]}'
)
def test_fast_path_on_any_bytes(payload: bytes) -> None:
    check(payload)


def test_classifier_refusals_keep_the_models_reason() -> None:
    """A payload the fast path hands back is one dead letter with pydantic's reason."""
    batch = Batch()
    Classifier().add(
        batch,
        "eldersafe/v1/home-1/wb-1/telemetry",
        b'{"v":1,"time":"2026-11-23T12:00:00Z","readings":[{"metric":"a","value":true}]}',
    )
    assert batch.telemetry_rows == 0 and len(batch.dead) == 1
    assert "readings.0.value" in batch.dead[0].reason
