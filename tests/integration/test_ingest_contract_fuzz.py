"""The whole contract under generated hostile input, against the real server (issue 6 §1-2).

Hypothesis generates a few hundred messages over every topic kind: valid
payloads, the same with one field replaced by a hostile JSON fragment (huge
integers, NaN, ±Infinity, 1e400, extreme dates, deep nesting, long strings,
odd unicode, wrong types), whole payloads of random JSON or bytes, and topics
outside the contract. They are published in one go to the real broker and the
real ``eldersafe server`` process; then the database must hold every valid
message and exactly one dead letter for each bad one, the server must keep its
PID, and a valid message sent afterwards must be stored.

What is "valid" is the contract's own verdict (the models and topic parser),
checked independently where it matters: a non-finite or 64-bit-overflowing
number, or a time outside the window, must never be judged valid, and nothing
stored may hold such a value.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from support import GATEWAY_PASSWORDS, publish_all, scalar, wait_for

from gateway.contract.payloads import (
    CommandAction,
    CommandOutcome,
    CommandResultPayload,
    EventPayload,
    EventType,
    GatewayStatusPayload,
    Phase,
    StatusPayload,
    TelemetryPayload,
)
from gateway.contract.topics import Channel, DeviceTopic, TopicError, parse_topic

SITE = "site-a"
MESSAGES = 300
HOLE = "\x01HOSTILE\x01"  # where a raw JSON fragment is spliced into a serialised payload
NOW = datetime.now(UTC)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)

OFFSETS = [timedelta(0), timedelta(hours=14), timedelta(hours=-14), timedelta(hours=5, minutes=45)]


@dataclass(frozen=True)
class Generated:
    kind: str  # telemetry, event, status, gateway, command_result, command, bad_topic
    body: Any  # a JSON-able template with at most one HOLE, or raw bytes
    hostile: str | None  # the raw JSON fragment for HOLE
    certainly_bad: bool  # the fragment is non-finite, overflowing or an out-of-window time
    topic_segment: str | None = None  # for bad_topic


def _iso(t: datetime) -> str:
    return t.isoformat()


def times() -> st.SearchStrategy[str]:
    """Mostly plausible times, some anywhere in 0001..9999 with extreme offsets."""
    near = st.integers(0, 30 * 24 * 3600).map(lambda s: _iso(NOW - timedelta(seconds=s)))
    anywhere = st.builds(
        lambda dt, off: _iso(dt.replace(tzinfo=timezone(off))),
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
        st.sampled_from(OFFSETS),
    ).filter(
        lambda s: abs(datetime.fromisoformat(s) - (NOW + timedelta(hours=24))) > timedelta(hours=1)
    )
    return st.one_of(near, near, near, anywhere)


json_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and ±Infinity included: Python's json writes them as literals
    st.text(max_size=40),
)
json_values = st.recursive(
    st.none() | json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

CERTAINLY_BAD = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    str(2**64),
    str(-(2**63) - 1),
    str(10**100),
    '"9999-12-31T23:59:59-14:00"',
    '"0001-01-01T00:00:00+14:00"',
    '"1970-01-01T00:00:00Z"',
    '"1999-12-31T23:59:59Z"',
    json.dumps(_iso(NOW + timedelta(days=3))),
]


@st.composite
def hostile_fragments(draw: st.DrawFn) -> tuple[str, bool]:
    """A raw JSON fragment and whether no field may hold it (two in three are such)."""
    if draw(st.integers(0, 2)) < 2:  # explicit: one_of() would favour the richer branch
        return draw(st.sampled_from(CERTAINLY_BAD)), True
    maybe = st.one_of(
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # deep nesting
        st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
        st.integers(200, 120_000).map(lambda n: json.dumps("x" * n)),  # long strings
        st.text(max_size=30).map(lambda s: json.dumps(s, ensure_ascii=False)),  # odd unicode
        st.text(max_size=30).map(json.dumps),
        st.sampled_from(['"\\u0000"', '"\\ud800"', '"\\udfff\\ud800"', '"\u202e\ufeff"']),
        st.sampled_from(["null", "true", "[]", "{}", '"12"', "12", "1.5", "-0", "1E5"]),
        st.sampled_from(["2026-02-30T00:00:00Z", "2026-11-22T08:00:00", "not a time"]).map(
            json.dumps
        ),
        json_values.map(lambda v: json.dumps(v)),
    )
    return draw(maybe), False


def readings() -> st.SearchStrategy[list[dict[str, Any]]]:
    reading = st.fixed_dictionaries(
        {
            "metric": st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
            "value": st.floats(allow_nan=False, allow_infinity=False, width=64),
        },
        optional={"unit": st.text(max_size=20), "time": times()},
    )
    return st.lists(reading, min_size=1, max_size=5)


def bodies(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    if kind == "telemetry":
        return st.fixed_dictionaries({"v": st.just(1), "time": times(), "readings": readings()})
    if kind == "event":
        return st.fixed_dictionaries(
            {
                "v": st.just(1),
                "event_id": st.uuids().map(str),
                "type": st.sampled_from([e.value for e in EventType]),
                "phase": st.sampled_from([p.value for p in Phase]),
                "time": times(),
                "profile": st.just("es-cb1"),
                "data": st.dictionaries(
                    st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), json_scalars, max_size=3
                ),
            }
        )
    if kind == "status":
        return st.fixed_dictionaries(
            {"v": st.just(1), "time": times(), "online": st.booleans()},
            optional={
                "battery": st.integers(-10, 110),
                "rssi": st.integers(-200, 40),
                "last_seen": times(),
                "detail": st.text(max_size=300),
            },
        )
    if kind == "gateway":
        return st.fixed_dictionaries(
            {"v": st.just(1), "online": st.booleans()},
            optional={
                "time": times(),
                "version": st.text(max_size=40),
                "drivers": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
            },
        )
    if kind in ("command_result", "command"):
        return st.fixed_dictionaries(
            {
                "v": st.just(1),
                "command_id": st.uuids().map(str),
                "action": st.sampled_from([a.value for a in CommandAction]),
                "outcome": st.sampled_from([o.value for o in CommandOutcome]),
                "time": times(),
            },
            optional={"reason": st.text(max_size=300), "via": st.text(max_size=10)},
        )
    raise AssertionError(kind)


def with_hole(body: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    """A copy of ``body`` with the value at ``path`` replaced by HOLE (created if missing)."""
    out = json.loads(json.dumps(body))
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = HOLE
    return out


def hole_paths(kind: str, body: dict[str, Any]) -> list[tuple[str | int, ...]]:
    """Where to put the fragment: any field, weighted towards numbers and times."""
    paths: list[tuple[str | int, ...]] = [(k,) for k in body] + [("extra",)]
    paths += [(k,) for k in ("time", "last_seen") if k in body] * 3
    if kind == "telemetry" and isinstance(body.get("readings"), list) and body["readings"]:
        paths += [("readings", 0, "value")] * 8 + [("readings", 0, "time")] * 4
        paths += [("readings", 0, "unit")]
    if kind == "event":
        paths += [("data", "x")] * 10
    return paths


BAD_TOPICS = [
    "gateway/event",  # the reserved device id
    "gateway/telemetry",
    "Bad/event",
    "d1/alarm",
    "a/b/c/d",
    "x" * 65 + "/event",
    "d1/command/results",
    "d1/event/",
    "/event",
]


def _mqtt_topic_char(c: str) -> bool:
    """Mosquitto refuses (as a malformed packet) control characters and non-characters."""
    o = ord(c)
    return not (0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE or 0x7F <= o <= 0x9F)


# any other character may appear in a topic the broker accepts and passes on
topic_chars = st.characters(exclude_categories=("Cc", "Cs")).filter(_mqtt_topic_char)


@st.composite
def messages(draw: st.DrawFn) -> Generated:
    kind = draw(
        st.sampled_from(
            ["telemetry", "event", "status", "gateway", "command_result", "command", "bad_topic"]
        )
    )
    if kind == "bad_topic":
        segment = draw(
            st.one_of(
                st.sampled_from(BAD_TOPICS),
                st.text(topic_chars, min_size=1, max_size=20).filter(
                    lambda s: not set(s) & {"+", "#"}
                ),
            )
        )  # fmt: skip
        return Generated(kind, draw(json_values), None, False, segment)
    body = draw(bodies(kind))
    shape = draw(st.sampled_from(["valid", "hostile", "hostile", "hostile", "random", "bytes"]))
    if shape == "valid":
        return Generated(kind, body, None, False)
    if shape == "random":
        return Generated(kind, draw(json_values), None, False)
    if shape == "bytes":
        return Generated(kind, draw(st.binary(max_size=200)), None, False)
    fragment, certainly_bad = draw(hostile_fragments())
    path = draw(st.sampled_from(hole_paths(kind, body)))
    # which fragments no field of that kind may hold: a time outside the window in a time
    # field; a non-finite number anywhere numeric; an integer beyond 64 bits in event data
    # (a telemetry value is a double: 2**64 is a real value there)
    if kind == "command":  # the server's own downlink: ingest ignores it, whatever it holds
        certain = False
    elif path[-1] in ("time", "last_seen"):
        certain = certainly_bad and fragment.startswith('"')
    elif path[-1] == "value":
        certain = fragment in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400")
    elif path == ("data", "x"):
        certain = certainly_bad and not fragment.startswith('"')
    else:
        certain = False
    return Generated(kind, with_hole(body, path), fragment, certain)


CHANNEL_OF = {
    "telemetry": Channel.TELEMETRY,
    "event": Channel.EVENT,
    "status": Channel.STATUS,
    "command_result": Channel.COMMAND_RESULT,
    "command": Channel.COMMAND,
}
MODEL_OF: dict[Channel, type[BaseModel]] = {
    Channel.TELEMETRY: TelemetryPayload,
    Channel.EVENT: EventPayload,
    Channel.STATUS: StatusPayload,
    Channel.COMMAND_RESULT: CommandResultPayload,
}


def render(g: Generated, n: int) -> tuple[str, bytes]:
    """The message as sent: a topic unique to it (so nothing valid is a duplicate) and bytes."""
    if g.kind == "bad_topic":
        topic = f"eldersafe/v1/{SITE}/{g.topic_segment}"
    elif g.kind == "gateway":
        topic = f"eldersafe/v1/{SITE}/gateway/g{n}/status"
    else:
        topic = str(DeviceTopic(SITE, f"d{n}", CHANNEL_OF[g.kind]))
    if isinstance(g.body, bytes):
        return topic, g.body
    if isinstance(g.body, dict):  # ids unique to the message (templates leave them empty)
        for key in ("event_id", "command_id"):
            if key in g.body and g.body[key] != HOLE:
                g.body[key] = str(uuid.UUID(int=n))
    text = json.dumps(g.body, ensure_ascii=False)
    if g.hostile is not None:
        text = text.replace(json.dumps(HOLE, ensure_ascii=False), g.hostile, 1)
    return topic, text.encode("utf-8", "surrogatepass")


def verdict(topic: str, payload: bytes) -> tuple[str, BaseModel | None]:
    """The contract's verdict: 'stored', 'ignored' (commands) or 'dead'."""
    try:
        t = parse_topic(topic)
    except TopicError:
        return "dead", None
    if isinstance(t, DeviceTopic) and t.channel is Channel.COMMAND:
        return "ignored", None
    model = MODEL_OF[t.channel] if isinstance(t, DeviceTopic) else GatewayStatusPayload
    try:
        return "stored", model.model_validate_json(payload)
    except ValidationError:
        return "dead", None


def digest(topic: str, payload: bytes) -> bytes:
    return hashlib.sha256(topic.encode() + b"\x00" + payload).digest()


def _templates() -> dict[str, dict[str, Any]]:
    t = _iso(NOW - timedelta(minutes=5))
    return {
        "telemetry": {
            "v": 1, "time": t, "readings": [{"metric": "m", "value": 1.0, "unit": "u", "time": t}]
        },
        "event": {
            "v": 1, "event_id": "", "type": "sos", "phase": "pulse", "time": t,
            "profile": "es-cb1", "data": {"x": 1},
        },
        "status": {"v": 1, "time": t, "online": True, "last_seen": t},
        "gateway": {"v": 1, "time": t, "online": True},
        "command_result": {
            "v": 1, "command_id": "", "action": "locate", "outcome": "executed", "time": t
        },
    }  # fmt: skip


NUMBER_PATHS = {"telemetry": [("readings", 0, "value")], "event": [("data", "x")]}
TIME_PATHS = {
    "telemetry": [("time",), ("readings", 0, "time")],
    "event": [("time",)],
    "status": [("time",), ("last_seen",)],
    "gateway": [("time",)],
    "command_result": [("time",)],
}
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]


def systematic() -> list[Generated]:
    """Every certainly-bad fragment in every number and time field of every payload kind."""
    out = []
    for kind, body in _templates().items():
        for path in TIME_PATHS[kind]:
            out += [Generated(kind, with_hole(body, path), f, True) for f in CERTAINLY_BAD
                    if f.startswith('"')]  # fmt: skip
        for path in NUMBER_PATHS.get(kind, []):
            fragments = CERTAINLY_BAD if kind == "event" else NON_FINITE
            out += [Generated(kind, with_hole(body, path), f, True) for f in fragments
                    if not f.startswith('"')]  # fmt: skip
    return out


def gather() -> list[Generated]:
    collected: list[Generated] = systematic()

    @settings(
        max_examples=MESSAGES,
        derandomize=True,  # the same messages every run
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(messages())
    def collect(g: Generated) -> None:
        collected.append(g)

    collect()
    return collected


def test_generated_hostile_messages_over_the_whole_contract(broker, database, make_server) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    assert server.proc is not None
    pid = server.proc.pid

    sent: dict[tuple[str, bytes], tuple[str, BaseModel | None]] = {}
    generated = gather()
    for n, g in enumerate(generated):
        topic, payload = render(g, n)
        outcome, model = verdict(topic, payload)
        if g.certainly_bad:
            assert outcome == "dead", f"the contract accepted {g.hostile} in {payload[:300]!r}"
        sent[(topic, payload)] = (outcome, model)
    outcomes = [o for o, _ in sent.values()]
    # the run covers every outcome in numbers (a guard against a generator gone lame)
    assert outcomes.count("dead") > 100 and outcomes.count("stored") > 30, outcomes

    rcs = publish_all(
        broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"],
        [(t, p, 1) for t, p in sent], timeout=60,
    )  # fmt: skip
    assert set(rcs) == {0}

    dead = {digest(t, p) for (t, p), (o, _) in sent.items() if o == "dead"}
    telemetry: dict[str, int] = {}
    events, statuses, results = set(), set(), set()
    for (topic, _), (_outcome, model) in sent.items():
        device = (
            topic.split("/")[3] if "/gateway/" not in topic else "gateway:" + topic.split("/")[4]
        )
        if isinstance(model, TelemetryPayload):
            keys = {(r.metric, r.time or model.time) for r in model.readings}
            telemetry[device] = len(keys)
        elif isinstance(model, EventPayload):
            events.add(model.event_id)
        elif isinstance(model, StatusPayload | GatewayStatusPayload):
            statuses.add(device)
        elif isinstance(model, CommandResultPayload):
            results.add(model.command_id)

    def settled() -> bool:
        return (
            scalar(database, "SELECT count(*) FROM dead_letters") == len(dead)
            and scalar(database, "SELECT count(*) FROM device_events") == len(events)
            and scalar(database, "SELECT count(*) FROM device_status") == len(statuses)
            and scalar(database, "SELECT count(*) FROM command_results") == len(results)
            and scalar(database, "SELECT count(*) FROM telemetry") == sum(telemetry.values())
        )

    try:
        wait_for(settled, 60, "every generated message in its place")
    except AssertionError:
        print(server.log_tail())
        raise
    with psycopg.connect(database) as conn:
        assert {bytes(r[0]) for r in conn.execute("SELECT digest FROM dead_letters")} == dead
        assert conn.execute("SELECT max(occurrences) FROM dead_letters").fetchone() == (1,)
        assert {r[0] for r in conn.execute("SELECT event_id FROM device_events")} == events
        assert {r[0] for r in conn.execute("SELECT device_id FROM device_status")} == statuses
        assert {r[0] for r in conn.execute("SELECT command_id FROM command_results")} == results
        assert (
            dict(
                conn.execute(
                    "SELECT device_id, count(*) FROM telemetry GROUP BY device_id"
                ).fetchall()
            )
            == telemetry
        )
        # nothing stored is a non-real number or a time outside the window
        for (value,) in conn.execute("SELECT value FROM telemetry"):
            assert math.isfinite(value)
        latest = datetime.now(UTC) + timedelta(hours=24)
        for (t,) in conn.execute(
            "SELECT time FROM telemetry UNION ALL SELECT time FROM device_events"
            " UNION ALL SELECT time FROM device_status UNION ALL SELECT time FROM command_results"
        ):
            assert EARLIEST <= t <= latest
    assert server.proc.poll() is None and server.proc.pid == pid, server.log_tail()

    # and ingest goes on: a valid message sent afterwards is stored
    after = EventPayload(
        v=1, event_id=uuid.uuid4(), type=EventType.SOS, phase=Phase.PULSE,
        time=datetime.now(UTC), profile="es-cb1",
    )  # fmt: skip
    publish_all(
        broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"],
        [(f"eldersafe/v1/{SITE}/btn-after/event", after.model_dump_json().encode(), 1)],
    )  # fmt: skip
    wait_for(
        lambda: (
            scalar(
                database,
                "SELECT count(*) FROM device_events WHERE event_id = %s",
                (after.event_id,),
            )
            == 1
        ),
        20,
        "the event sent after the generated ones",
    )
    assert server.proc.poll() is None and server.proc.pid == pid
