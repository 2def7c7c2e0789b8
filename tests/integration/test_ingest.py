"""Ingest against the real broker and database: exact rows, one row per event id, dead letters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
from support import GATEWAY_PASSWORDS, publish_all, scalar, wait_for

from gateway.contract.payloads import EventPayload, EventType, Phase, TelemetryPayload, dump


def telemetry(
    site: str, device: str, t: datetime, values: dict[str, float]
) -> tuple[str, bytes, int]:
    payload = TelemetryPayload(
        v=1, time=t, readings=[{"metric": k, "value": v, "unit": "x"} for k, v in values.items()]
    )
    return (f"eldersafe/v1/{site}/{device}/telemetry", dump(payload), 1)


def event(
    site: str, device: str, event_id: uuid.UUID, etype: EventType, t: datetime
) -> tuple[str, bytes, int]:
    payload = EventPayload(
        v=1,
        event_id=event_id,
        type=etype,
        phase=Phase.PULSE,
        time=t,
        profile="es-cb1",
        data={"seq": 7},
    )
    return (f"eldersafe/v1/{site}/{device}/event", dump(payload), 1)


def test_valid_invalid_and_duplicate_messages_land_exactly(broker, database, make_server) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()

    t0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    good_telemetry = [
        telemetry("site-a", "wb-1", t0 + timedelta(seconds=i), {"heart_rate": 70 + i, "spo2": 97})
        for i in range(20)
    ]
    ids = [uuid.uuid4() for _ in range(5)]
    events = [event("site-a", "btn-1", i, EventType.SOS, t0) for i in ids]
    bad = [
        ("eldersafe/v1/site-a/wb-1/telemetry", b"{not json", 1),  # malformed JSON
        (
            "eldersafe/v1/site-a/wb-1/telemetry",
            b'{"v":1,"time":"2026-11-22T08:00:00Z","readings":[]}',
            1,
        ),
        (
            "eldersafe/v1/site-a/wb-1/event",
            orjson.dumps({"v": 2, "event_id": str(uuid.uuid4())}),
            1,
        ),
        (
            "eldersafe/v1/site-a/wb-1/status",
            b'{"v":1,"online":"yes","time":"2026-11-22T08:00:00Z"}',
            1,
        ),
        (
            "eldersafe/v1/site-a/wb-1/telemetry",
            b'{"v":1,"time":"2026-11-22T08:00:00","readings":[{"metric":"x","value":1}]}',
            1,
        ),  # naive time
        ("eldersafe/v1/site-a/Bad_Device/telemetry", good_telemetry[0][1], 1),  # wrong id
        ("eldersafe/v1/site-a/wb-1/unknown", b"{}", 1),  # wrong channel
        ("eldersafe/v1/site-a/x/y/z/w", b"{}", 1),  # no place in the contract
    ]
    status = (
        "eldersafe/v1/site-a/wb-1/status",
        b'{"v":1,"online":true,"battery":81,"rssi":-60,"time":"2026-11-22T08:00:00Z"}',
        1,
    )
    # every event twice, telemetry twice too (a redelivery must add nothing)
    messages = good_telemetry + events + events + good_telemetry[:5] + bad + [status]
    rcs = publish_all(broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], messages)
    assert all(rc == 0 for rc in rcs)

    try:
        wait_for(
            lambda: scalar(database, "SELECT count(*) FROM dead_letters") == len(bad),
            20,
            "dead letters",
        )
    except AssertionError:
        with psycopg.connect(database) as conn:
            print(conn.execute("SELECT topic, reason FROM dead_letters").fetchall())
            print(conn.execute("SELECT count(*) FROM telemetry").fetchall())
        print(server.log_tail())
        raise
    wait_for(lambda: scalar(database, "SELECT count(*) FROM device_status") == 1, 20, "status")
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT time, site_id, device_id, metric, value, unit FROM telemetry"
            " ORDER BY time, metric"
        ).fetchall()
        expected = sorted(
            [
                (t0 + timedelta(seconds=i), "site-a", "wb-1", "heart_rate", float(70 + i), "x")
                for i in range(20)
            ]
            + [(t0 + timedelta(seconds=i), "site-a", "wb-1", "spo2", 97.0, "x") for i in range(20)],
            key=lambda r: (r[0], r[3]),
        )
        assert rows == expected
        event_rows = conn.execute(
            "SELECT event_id, site_id, device_id, type, phase, profile, data"
            " FROM device_events ORDER BY event_id"
        ).fetchall()
        assert event_rows == sorted(
            [(i, "site-a", "btn-1", "sos", "pulse", "es-cb1", {"seq": 7}) for i in ids]
        )
        dead = conn.execute(
            "SELECT topic, payload, reason FROM dead_letters ORDER BY id"
        ).fetchall()
        assert sorted((t, bytes(p)) for t, p, _ in dead) == sorted((t, p) for t, p, _ in bad)
        reasons = {bytes(p): r for _, p, r in dead}
        assert "invalid payload" in reasons[b"{not json"]
        assert "does not match" in reasons[good_telemetry[0][1]]
        assert "unknown channel" in reasons[b"{}"] or "no place" in reasons[b"{}"]
        assert conn.execute("SELECT online, battery, rssi FROM device_status").fetchone() == (
            True,
            81,
            -60,
        )
    assert server.proc is not None and server.proc.poll() is None, "the consumer kept going"
