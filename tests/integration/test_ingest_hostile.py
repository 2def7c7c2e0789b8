"""Hostile input against the real server, broker and database (issue 6 §1, §2, §5).

Every case here was stored silently or stopped ingest before: a huge integer,
non-finite numbers, times that are not real times, the reserved device id.
Each bad message must become exactly one dead letter with its reason class,
the server must keep its PID, and valid messages sent after it are stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import urllib.request
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
from support import GATEWAY_PASSWORDS, publish_all, scalar, until, wait_for

from gateway.contract.payloads import (
    CommandAction,
    CommandOutcome,
    CommandResultPayload,
    EventPayload,
    EventType,
    Phase,
    dump,
)
from gateway.ingest.batch import Batch, DeadLetter, DeadReason
from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import IngestStore
from gateway.local.ports import free_port
from gateway.mqtt.codec import Publish

SITE = "site-a"
PASSWORD = GATEWAY_PASSWORDS["gw-site-a"]


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def event_json(event_id: uuid.UUID, time: str, data: str = "{}") -> bytes:
    """An event with raw JSON fragments spliced in (to send what no serialiser would)."""
    return (
        f'{{"v":1,"event_id":"{event_id}","type":"sos","phase":"pulse",'
        f'"time":"{time}","profile":"es-cb1","data":{data}}}'
    ).encode()


def telemetry_json(time: str, value: str, reading_time: str | None = None) -> bytes:
    rt = f',"time":"{reading_time}"' if reading_time else ""
    return (
        f'{{"v":1,"time":"{time}","readings":[{{"metric":"temp","value":{value},"unit":"C"{rt}}}]}}'
    ).encode()


def valid_event(device: str = "btn-1") -> tuple[str, bytes, int, uuid.UUID]:
    event_id = uuid.uuid4()
    payload = EventPayload(
        v=1,
        event_id=event_id,
        type=EventType.SOS,
        phase=Phase.PULSE,
        time=datetime.now(UTC),
        profile="es-cb1",
        data={"n": 1},
    )
    return (f"eldersafe/v1/{SITE}/{device}/event", dump(payload), 1, event_id)


def dead_letters(dsn: str) -> dict[bytes, tuple[str, str, str, int, int]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT payload, topic, reason, reason_class, payload_length, occurrences"
            " FROM dead_letters"
        ).fetchall()
    return {bytes(r[0]): (r[1], r[2], r[3], r[4], r[5]) for r in rows}


def metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_a_huge_integer_is_a_dead_letter_and_ingest_goes_on(broker, database, make_server) -> None:
    """The crash loop of issue 6 §1: an event holding 2**64, then a valid event."""
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    assert server.proc is not None
    pid = server.proc.pid
    poison = event_json(uuid.uuid4(), iso(datetime.now(UTC)), '{"n":18446744073709551616}')
    topic, good, qos, good_id = valid_event()
    assert publish_all(broker.port, "gw-site-a", PASSWORD, [(topic, poison, 1)]) == [0]
    wait_for(lambda: scalar(database, "SELECT count(*) FROM dead_letters") == 1, 20, "dead letter")
    assert publish_all(broker.port, "gw-site-a", PASSWORD, [(topic, good, qos)]) == [0]
    wait_for(
        lambda: (
            scalar(database, "SELECT count(*) FROM device_events WHERE event_id = %s", (good_id,))
            == 1
        ),
        20,
        "the valid event after the poison one",
    )
    dead = dead_letters(database)
    assert list(dead) == [poison]
    assert dead[poison][2] == "range" and "64 bits" in dead[poison][1]
    assert server.proc.poll() is None and server.proc.pid == pid, server.log_tail()
    assert scalar(database, "SELECT count(*) FROM device_events") == 1


def test_values_and_times_that_are_not_real_are_refused(broker, database, make_server) -> None:
    """Issue 6 §2, case by case: each one dead letter with its reason class; the good ones kept."""
    metrics_port = free_port()
    server = make_server(database, broker.port, ELDERSAFE_METRICS_PORT=str(metrics_port))
    server.start()
    server.wait_session()
    assert server.proc is not None
    pid = server.proc.pid
    now = datetime.now(UTC)
    ok_time = iso(now - timedelta(minutes=1))
    tele = f"eldersafe/v1/{SITE}/wb-1/telemetry"
    ev = f"eldersafe/v1/{SITE}/btn-1/event"
    st = f"eldersafe/v1/{SITE}/wb-1/status"
    gw = f"eldersafe/v1/{SITE}/gateway/gw-1/status"
    cr = f"eldersafe/v1/{SITE}/wb-1/command/result"
    command_id = uuid.uuid4()

    def result(time: str) -> bytes:
        return (
            f'{{"v":1,"command_id":"{command_id}","action":"locate","outcome":"executed",'
            f'"time":"{time}"}}'
        ).encode()

    # (topic, payload, reason class) — each is sent through the real path, raw bytes
    bad = [
        (tele, telemetry_json(ok_time, "NaN"), "range"),
        (tele, telemetry_json(ok_time, "Infinity"), "range"),
        (tele, telemetry_json(ok_time, "-Infinity"), "range"),
        (tele, telemetry_json(ok_time, "1e400"), "range"),
        (tele, telemetry_json("1999-12-31T23:59:59Z", "1"), "range"),
        (tele, telemetry_json(ok_time, "2", reading_time="9999-12-31T23:59:59-14:00"), "range"),
        (tele, telemetry_json(ok_time, "3", reading_time="0001-01-01T00:00:00+14:00"), "range"),
        (ev, event_json(uuid.uuid4(), ok_time, '{"x":NaN}'), "range"),
        (ev, event_json(uuid.uuid4(), ok_time, '{"x":Infinity}'), "range"),
        (ev, event_json(uuid.uuid4(), ok_time, '{"x":1e400}'), "range"),
        (ev, event_json(uuid.uuid4(), ok_time, '{"x":-9223372036854775809}'), "range"),
        (ev, event_json(uuid.uuid4(), ok_time, '{"x":"a\\u0000b"}'), "schema"),
        (ev, event_json(uuid.uuid4(), "9999-12-31T23:59:59-14:00"), "range"),
        (ev, event_json(uuid.uuid4(), "0001-01-01T00:00:00+14:00"), "range"),
        (ev, event_json(uuid.uuid4(), iso(now + timedelta(hours=25))), "range"),
        (ev, event_json(uuid.uuid4(), "2000-01-01T05:00:00+08:00"), "range"),  # 1999 in UTC
        (st, f'{{"v":1,"online":true,"time":"{iso(now + timedelta(days=2))}"}}'.encode(), "range"),
        (
            st,
            f'{{"v":1,"online":true,"time":"{ok_time}","last_seen":"1970-01-01T00:00:00Z"}}'.encode(),
            "range",
        ),
        (gw, b'{"v":1,"online":true,"time":"9999-12-31T23:59:59Z"}', "range"),
        (cr, result("9999-12-31T23:59:59Z"), "range"),
        # the reserved device id: the gateway-status branch of a site is no device
        (f"eldersafe/v1/{SITE}/gateway/event", valid_event()[1], "topic"),
        (f"eldersafe/v1/{SITE}/gateway/telemetry", telemetry_json(ok_time, "1"), "topic"),
    ]
    good_id = uuid.uuid4()
    good = [
        (tele, telemetry_json(ok_time, "21.5"), 1),
        (tele, telemetry_json(ok_time, "1e300", reading_time=iso(now + timedelta(hours=23))), 1),
        (ev, event_json(good_id, iso(now + timedelta(hours=23)), '{"x":9223372036854775807}'), 1),
        (st, f'{{"v":1,"online":true,"time":"{ok_time}"}}'.encode(), 1),
        (gw, b'{"v":1,"online":true,"time":"2000-01-01T00:00:00Z"}', 1),
    ]
    messages = [(t, p, 1) for t, p, _ in bad] + good
    assert all(rc == 0 for rc in publish_all(broker.port, "gw-site-a", PASSWORD, messages))
    wait_for(
        lambda: (
            scalar(database, "SELECT count(*) FROM dead_letters") == len(bad)
            and scalar(database, "SELECT count(*) FROM device_status") == 2
            and scalar(database, "SELECT count(*) FROM device_events") == 1
            and scalar(database, "SELECT count(*) FROM telemetry") == 2
        ),
        20,
        "every message in its place",
    )
    dead = dead_letters(database)
    for topic, payload, kind in bad:
        stored_topic, reason, reason_class, length, occurrences = dead[payload]
        assert (stored_topic, reason_class, length, occurrences) == (
            topic,
            kind,
            len(payload),
            1,
        ), reason
    with psycopg.connect(database) as conn:
        values = [r[0] for r in conn.execute("SELECT value FROM telemetry ORDER BY value")]
        assert values == [21.5, 1e300]
        assert conn.execute("SELECT data FROM device_events").fetchone() == (
            {"x": 9223372036854775807},
        )
        # every stored time can be read back (year 10000 could not)
        conn.execute("SELECT time FROM telemetry UNION ALL SELECT time FROM device_events")
    for kind in ("range", "schema", "topic"):
        expected = sum(1 for *_, k in bad if k == kind)
        assert metric(metrics_port, "eldersafe_dead_letters_total", f'reason="{kind}"') == expected
    assert server.proc.poll() is None and server.proc.pid == pid, server.log_tail()


def test_unregistered_site_is_kept_and_flagged(broker, database, make_server) -> None:
    """Issue 6 §2: an SOS from a site nobody registered is stored, and the site is recorded."""
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO organisations VALUES ('bureau-x', NULL, 'bureau', 'Bureau')")
        conn.execute("INSERT INTO sites (id, organisation_id, kind, name) VALUES"
                     " ('site-b', 'bureau-x', 'home', 'Registered home')")  # fmt: skip
    metrics_port = free_port()
    server = make_server(database, broker.port, ELDERSAFE_METRICS_PORT=str(metrics_port))
    server.start()
    server.wait_session()
    a_topic, a_payload, _, a_id = valid_event()
    b_payload = EventPayload.model_validate_json(valid_event()[1]).model_copy(
        update={"event_id": uuid.uuid4()}
    )
    assert publish_all(broker.port, "gw-site-a", PASSWORD, [(a_topic, a_payload, 1)] * 1) == [0]
    assert publish_all(
        broker.port,
        "gw-site-b",
        GATEWAY_PASSWORDS["gw-site-b"],
        [("eldersafe/v1/site-b/btn-1/event", dump(b_payload), 1)],
    ) == [0]
    wait_for(lambda: scalar(database, "SELECT count(*) FROM device_events") == 2, 20, "events")
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT site_id, messages FROM unregistered_sources").fetchall() == [
            ("site-a", 1)
        ]
        assert conn.execute(
            "SELECT site_id FROM device_events WHERE event_id = %s", (a_id,)
        ).fetchone() == ("site-a",)
    assert scalar(database, "SELECT count(*) FROM dead_letters") == 0
    assert metric(metrics_port, "eldersafe_ingest_unregistered_site_messages_total") == 1.0


def test_command_results_are_stored_once(broker, database, make_server) -> None:
    """Issue 6 §5: the edge's answer to a command id is one row, however often it arrives."""
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    command_id, alert_id = uuid.uuid4(), uuid.uuid4()
    result = CommandResultPayload(
        v=1,
        command_id=command_id,
        action=CommandAction.ALARM_RECEIVED,
        outcome=CommandOutcome.EXECUTED,
        time=datetime.now(UTC),
        via="wristband",
        alert_id=alert_id,
    )
    refused = CommandResultPayload(
        v=1,
        command_id=uuid.uuid4(),
        action=CommandAction.HUSH,
        outcome=CommandOutcome.REFUSED,
        time=datetime.now(UTC),
        reason="es-ef1 has no hush",
    )
    topic = f"eldersafe/v1/{SITE}/wb-1/command/result"
    messages = [(topic, dump(result), 1)] * 3 + [(f"eldersafe/v1/{SITE}/ef-1/command/result",
                                                  dump(refused), 1)]  # fmt: skip
    assert publish_all(broker.port, "gw-site-a", PASSWORD, messages) == [0] * 4
    wait_for(lambda: scalar(database, "SELECT count(*) FROM command_results") == 2, 20, "results")
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT command_id, site_id, device_id, action, outcome, reason, via, alert_id"
            " FROM command_results ORDER BY outcome"
        ).fetchall()
    assert rows == [
        (command_id, SITE, "wb-1", "alarm_received", "executed", None, "wristband", alert_id),
        (refused.command_id, SITE, "ef-1", "hush", "refused", "es-ef1 has no hush", None, None),
    ]
    assert scalar(database, "SELECT count(*) FROM dead_letters") == 0


def test_dead_letters_keep_a_bounded_prefix_and_count_repeats(
    broker, database, make_server
) -> None:
    """Issue 6 §5: a huge payload keeps 4 KiB, its full length and a digest; a repeat is a count."""
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    topic = f"eldersafe/v1/{SITE}/wb-1/telemetry"
    huge = b'{"v":1,"junk":"' + b"x" * 300_000 + b'"}'
    assert publish_all(broker.port, "gw-site-a", PASSWORD, [(topic, huge, 1)] * 2) == [0, 0]
    wait_for(
        lambda: scalar(database, "SELECT sum(occurrences) FROM dead_letters") == 2, 20, "repeats"
    )
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT topic, payload, payload_length, digest, occurrences, reason_class"
            " FROM dead_letters"
        ).fetchall()
    digest = hashlib.sha256(topic.encode() + b"\x00" + huge).digest()
    assert rows == [(topic, huge[:4096], len(huge), digest, 2, "schema")]


def test_hostile_json_through_the_real_parser(broker, database, make_server) -> None:
    """NaN literals, deep nesting and invalid UTF-8 through the server's own JSON parser."""
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    assert server.proc is not None
    topic = f"eldersafe/v1/{SITE}/btn-1/event"
    nested = b"[" * 100_000 + b"]" * 100_000
    bad = [
        orjson.dumps({"v": 1}) + b"\xff",
        b'{"v":1,"data":' + nested + b"}",
        b"NaN",
        b'"\\ud800"',
        '{"v":1,"profile":"\u202e\ufeff\U0001f6a8"}'.encode(),
    ]
    _, good, _, good_id = valid_event()
    messages = [(topic, p, 1) for p in bad] + [(topic, good, 1)]
    assert publish_all(broker.port, "gw-site-a", PASSWORD, messages) == [0] * len(messages)
    wait_for(
        lambda: (
            scalar(database, "SELECT count(*) FROM dead_letters") == len(bad)
            and scalar(
                database, "SELECT count(*) FROM device_events WHERE event_id = %s", (good_id,)
            )
            == 1
        ),
        20,
        "dead letters and the good event",
    )
    assert server.proc.poll() is None, server.log_tail()


def test_a_message_the_database_refuses_is_isolated(broker, database, make_server) -> None:
    """A valid message the database refuses (here: a real CHECK constraint) is one dead letter;
    the rest of its batch is stored and the server keeps its PID."""
    with psycopg.connect(database) as conn:
        conn.execute(
            "ALTER TABLE device_events ADD CONSTRAINT no_poison CHECK (profile <> 'poison')"
        )
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    assert server.proc is not None
    pid = server.proc.pid
    now = iso(datetime.now(UTC))
    messages, poison, good_ids = [], [], []
    for i in range(400):
        event_id = uuid.uuid4()
        payload = event_json(event_id, now, f'{{"i":{i}}}')
        if i in (7, 250, 251):
            payload = payload.replace(b'"es-cb1"', b'"poison"')
            poison.append(payload)
        else:
            good_ids.append(event_id)
        messages.append((f"eldersafe/v1/{SITE}/btn-{i % 9}/event", payload, 1))
    assert set(publish_all(broker.port, "gw-site-a", PASSWORD, messages)) == {0}
    wait_for(
        lambda: (
            scalar(database, "SELECT count(*) FROM device_events") == len(good_ids)
            and scalar(database, "SELECT count(*) FROM dead_letters") == len(poison)
        ),
        30,
        "the good events and the refused ones as dead letters",
    )
    dead = dead_letters(database)
    assert sorted(dead) == sorted(poison)
    assert {d[2] for d in dead.values()} == {"database"}
    assert all("no_poison" in d[1] for d in dead.values())
    with psycopg.connect(database) as conn:
        stored = {r[0] for r in conn.execute("SELECT event_id FROM device_events")}
        assert conn.execute("SELECT count(*) FROM event_ledger").fetchone() == (len(good_ids),)
    assert stored == set(good_ids)
    assert server.proc.poll() is None and server.proc.pid == pid, server.log_tail()


class _FaultyStore(IngestStore):
    """The real store, with a fault injected: a bug of ours that raises on one message."""

    async def write(self, batch: Batch) -> None:
        if any(e[6] == "bug" for e in batch.events):
            raise TypeError("injected: cannot adapt this row")
        await super().write(batch)


async def test_any_exception_while_writing_becomes_a_dead_letter(database: str) -> None:
    """Not only database errors: whatever a write raises isolates the message (reason
    'internal'), every other message of the batch is stored and all are acknowledged."""
    store = _FaultyStore(database)
    pipeline = IngestPipeline(store)
    writer = asyncio.create_task(pipeline.run())
    now = iso(datetime.now(UTC))
    good, bad = [], []
    for i in range(100):
        event_id = uuid.uuid4()
        payload = event_json(event_id, now)
        if i in (0, 50, 99):
            payload = payload.replace(b'"es-cb1"', b'"bug"')
            bad.append(payload)
        else:
            good.append(event_id)
        # one batch: all delivered before the writer runs
        pipeline.on_publish(1, Publish(f"eldersafe/v1/{SITE}/btn-1/event", payload, 1, i + 1))
    try:
        await until(lambda: pipeline.acked >= 100, 20, "the batch acknowledged", interval=0.01)
    finally:
        writer.cancel()
        await store.close()
    assert pipeline.batches_written == 1
    dead = dead_letters(database)
    assert sorted(dead) == sorted(bad)
    assert {d[2] for d in dead.values()} == {"internal"}
    assert all("TypeError" in d[1] for d in dead.values())
    stored = scalar(database, "SELECT count(*) FROM device_events")
    assert stored == len(good)


async def test_a_redelivered_dead_letter_is_not_counted_again(database: str) -> None:
    """The MQTT DUP flag marks a redelivery (the first copy may have been stored before a
    crash): same digest, no new occurrence. A fresh repeat of the same bytes is counted."""
    store = IngestStore(database)
    topic, payload = f"eldersafe/v1/{SITE}/wb-1/telemetry", b"\x00not json\xff" * 1000
    first = DeadLetter(topic, payload, "invalid payload", DeadReason.JSON)
    try:
        await store.write(Batch(dead=[first]))
        await store.write(Batch(dead=[replace(first, dup=True)]))
        assert scalar(database, "SELECT occurrences FROM dead_letters") == 1
        await store.write(Batch(dead=[first]))
        await store.write(Batch(dead=[first, replace(first, dup=True)]))
    finally:
        await store.close()
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT occurrences, payload_length, length(payload), last_received_at > received_at"
            " FROM dead_letters"
        ).fetchall()
    assert rows == [(3, len(payload), 4096, True)]
