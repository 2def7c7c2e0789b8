"""The WebSocket live feed (issue 8, point 3): resumable by position with nothing lost and
nothing twice, scoped to the caller, across servers through LISTEN/NOTIFY, and the
console's "displayed" confirming its notices. Both ways a frame reaches a client: written
to its transport from the fan-out (``frames_server``: uvicorn as ``eldersafe server``
configures it) and through ASGI (``api_support.api_server``, the in-process feeds)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import uvicorn
from api_support import PASSWORD, T0, api_server, raise_event, seed_tenants, uvicorn_serving
from api_support import test_settings as settings_for
from support import scalar, until, wait_for
from test_alert_engine import drain, rows
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from alerting.lifecycle import acknowledge
from alerting.model import Channel, staff_actor
from gateway.alerts.audit_verify import verify
from gateway.alerts.feed import changes_after
from gateway.alerts.feed import last_position as feed_last_position
from gateway.alerts.unit_of_work import command
from gateway.api import app as app_module
from gateway.api import live as live_module
from gateway.api.app import create_app, server_config
from gateway.api.deps import principal_from_credentials
from gateway.api.live import (
    CLOSE_BEHIND,
    Closing,
    FeedTimings,
    LiveFeed,
    Subscriber,
    changes_payload,
)
from gateway.api.principal import Principal
from gateway.api.routes import feed as feed_route
from gateway.api.security import issue_token
from gateway.api.ws_frames import FramesProtocol
from gateway.local.mosquitto import MosquittoInstance
from gateway.local.ports import free_port

pytestmark = pytest.mark.timeout(180)

Message = dict[str, Any]


def flatten(text: str | bytes) -> list[Message]:
    """A frame's messages: a ``changes`` frame is its changes, in order (never empty, each
    a ``change``); any other frame is itself."""
    msg: Message = json.loads(text)
    if msg["type"] != "changes":
        return [msg]
    changes: list[Message] = msg["changes"]
    assert changes and all(c["type"] == "change" for c in changes), msg
    return changes


async def token_of(host: str, user: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://{host}") as client:
        answer = await client.post("/api/auth/login", json={"username": user, "password": PASSWORD})
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token


class Feed:
    """A console's feed connection: every message it received, in order (a ``changes``
    frame's changes one by one)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[Message] = []
        self.frames = 0
        self.sizes: list[int] = []  # each frame's payload, bytes
        self._pending: list[Message] = []

    async def next(self, within_s: float = 10.0) -> Message:
        if not self._pending:
            frame = await asyncio.wait_for(self.ws.recv(decode=False), within_s)
            self._pending = flatten(frame)
            self.frames += 1
            self.sizes.append(len(frame))
        msg = self._pending.pop(0)
        self.received.append(msg)
        return msg

    async def until(self, done: Callable[[Message], bool], within_s: float = 20.0) -> Message:
        """Read until a message satisfies ``done`` (pings and others are kept too)."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"timed out; received {self.received[-5:]}")
            msg = await self.next(left)
            if done(msg):
                return msg

    def changes(self) -> list[Message]:
        return [m for m in self.received if m["type"] == "change"]


@asynccontextmanager
async def feed(host: str, token: str, after: int | None) -> AsyncIterator[tuple[Feed, Message]]:
    async with connect(f"ws://{host}/api/feed", open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token, "after": after}))
        client = Feed(ws)
        ready = await client.next()
        assert ready["type"] == "ready", ready
        yield client, ready


def add_devices(dsn: str, site: str, prefix: str, n: int) -> list[str]:
    """``n`` more wristbands at ``site``: each SOS of another device is another alert."""
    ids = [f"{prefix}-{i}" for i in range(n)]
    with psycopg.connect(dsn) as conn:
        for i, device in enumerate(ids):
            conn.execute(
                "INSERT INTO devices (site_id, id, profile, address) VALUES (%s, %s, 'es-wb1', %s)",
                (site, device, f"{prefix}:{i:02x}"),
            )
    return ids


def in_scope_positions(dsn: str, site: str, after: int) -> list[int]:
    """Positions of the changes of ``site``'s alerts after ``after`` in feed order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.commit_seq FROM alert_changes c JOIN alerts a ON a.id = c.alert_id"
            " WHERE a.site_id = %s AND c.commit_seq > %s ORDER BY c.commit_seq",
            (site, after),
        ).fetchall()
    return [r[0] for r in rows]


async def raise_alerts(dsn: str, site: str, devices: list[str], other: list[str]) -> None:
    """One SOS per device at ``site`` and at site-b (``other``), interleaved, taken in by
    the engine a few at a time (several transactions, as a busy district commits them)."""
    for i, device in enumerate(devices):
        await asyncio.to_thread(raise_event, dsn, site, device, "sos")
        await asyncio.to_thread(raise_event, dsn, "site-b", other[i], "sos")
        if i % 4 == 3:
            await drain(dsn, T0)
    await drain(dsn, T0)


async def test_a_console_cut_off_gets_every_missed_alert_once_and_nothing_of_another_unit(
    database: str,
) -> None:
    seed_tenants(database)
    missed = add_devices(database, "site-a", "wb-a", 20)
    seam = add_devices(database, "site-a", "wb-s", 10)
    other = add_devices(database, "site-b", "wb-b", 30)
    async with api_server(database) as host:
        token = await token_of(host, "duty-a")
        async with feed(host, token, None) as (console, ready):
            assert ready["position"] is None  # nothing in the log yet
            raise_event(database, "site-a", "wb-a", "sos")
            await drain(database, T0)
            first = await console.until(lambda m: m["type"] == "change")
            assert first["alert"]["site"]["id"] == "site-a" and first["action"] == "opened"
            last = first["position"]

        # cut off: 20 alerts of this unit and 20 of station-b are raised meanwhile
        await raise_alerts(database, "site-a", missed, other[:20])
        missed_ids = {
            str(r) for r in [scalar(database, "SELECT id FROM alerts WHERE device_id = %s", (d,))
                             for d in missed]
        }  # fmt: skip
        assert len(missed_ids) == 20

        # reconnect with the last position while 10 more of each are being raised
        async with feed(host, token, last) as (console, ready):
            assert ready["position"] == last
            more = asyncio.create_task(raise_alerts(database, "site-a", seam, other[20:]))
            seen: set[str] = set()

            def all_in(m: Message) -> bool:
                if m["type"] == "change":
                    seen.add(m["alert_id"])
                return missed_ids <= seen and len(seen) >= 30

            await console.until(all_in, within_s=60)
            await more
            # a marker raised last: once it is here, nothing of before can still come
            raise_event(database, "site-a", "wb-a", "fall")
            await drain(database, T0)
            # (an alert's transaction logs "opened" and its first rung, "escalated")
            await console.until(
                lambda m: m.get("action") == "escalated" and m["alert"]["type"] == "fall"
            )

        changes = console.changes()
        positions = [m["position"] for m in changes]
        assert len(positions) == len(set(positions)), "a change arrived twice"
        expected = in_scope_positions(database, "site-a", last)
        assert positions == expected, "lost or out of order"
        assert {m["alert"]["site"]["id"] for m in changes} == {"site-a"}
        assert {m["alert_id"] for m in changes if m["action"] == "opened"} >= missed_ids
        opened = [m for m in changes if m["action"] == "opened"]
        assert len(opened) == 31  # 20 missed, 10 at the seam, the marker
        assert all(not m["alert"]["masked"] and "timeline" not in m["alert"] for m in changes)


async def test_displayed_confirms_the_persons_console_notice_and_audits_it(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    raise_event(database, "site-b", "wb-b", "sos")
    await drain(database, T0)
    alert_a = str(scalar(database, "SELECT id FROM alerts WHERE site_id = 'site-a'"))
    alert_b = str(scalar(database, "SELECT id FROM alerts WHERE site_id = 'site-b'"))
    notice = "SELECT status FROM notifications WHERE alert_id = %s AND person_id = %s"
    assert scalar(database, notice, (alert_a, "staff:duty-a")) == "pending"
    async with api_server(database) as host:
        token = await token_of(host, "duty-a")
        async with feed(host, token, None) as (console, _):
            # malformed input: an error each, and the connection stays up
            for bad in ("not json", '{"type": "displayed"}', '["displayed"]',
                        '{"type": "displayed", "alert_ids": ["x"]}', '{"type": "shout"}',
                        json.dumps({"type": "displayed", "alert_ids": [alert_a] * 501})):
                await console.ws.send(bad)
                error = await console.until(lambda m: m["type"] != "ping")
                assert error["type"] == "error" and error["detail"], (bad, error)
            await console.ws.send(b"\x00binary")
            assert (await console.next())["type"] == "error"

            # shown: duty-a's notice of their alert; station-b's alert is not theirs
            shown = {"type": "displayed", "alert_ids": [alert_a, alert_b]}
            await console.ws.send(json.dumps(shown))
            await until(lambda: scalar(database, notice, (alert_a, "staff:duty-a")) == "confirmed",
                        10, "the console notice confirmed")  # fmt: skip
            # shown again: nothing more (the error answers once the repeat was handled)
            await console.ws.send(json.dumps({"type": "displayed", "alert_ids": [alert_a]}))
            await console.ws.send("{}")
            assert (await console.until(lambda m: m["type"] != "ping"))["type"] == "error"
    assert scalar(database, notice, (alert_b, "staff:duty-b")) == "pending"
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT confirmed_at, closed_reason FROM notifications WHERE alert_id = %s", (alert_a,)
        ).fetchone()
        assert row is not None and row[0] == T0 and "console" in row[1]
        audit = conn.execute(
            "SELECT actor, channel, detail->>'by', detail->>'person' FROM alert_audit"
            " WHERE alert_id = %s AND action = 'noted'", (alert_a,)
        ).fetchall()
        assert audit == [("staff:duty-a", "console", "shown on the console", "staff:duty-a")]
        assert conn.execute("SELECT count(*) FROM alert_audit WHERE alert_id = %s AND"
                            " action = 'noted'", (alert_b,)).fetchone() == (0,)  # fmt: skip
    read, problems = verify(database)
    assert read > 0 and problems == ()


async def test_bad_auth_unknown_positions_and_huge_frames_are_refused(database: str) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "fall")
    await drain(database, T0)
    async with api_server(database) as host:
        token = await token_of(host, "duty-a")

        async def closed_with(first: str | bytes) -> tuple[int | None, str, list[str]]:
            async with connect(f"ws://{host}/api/feed", open_timeout=10) as ws:
                await ws.send(first)
                got = []
                with contextlib.suppress(ConnectionClosed):
                    async for text in ws:
                        got.append(str(text))
                return ws.close_code, ws.close_reason or "", got

        code, reason, _ = await closed_with(json.dumps({"type": "auth", "token": "nonsense"}))
        assert code == 4401 and "invalid token" in reason
        code, reason, _ = await closed_with('{"token": "x"}')
        assert code == 4401 and "type" in reason
        code, reason, _ = await closed_with(b"\x01")
        assert code == 4401
        for after in ("12", -1, 1.5, True, 2**63):
            code, _, _ = await closed_with(
                json.dumps({"type": "auth", "token": token, "after": after})
            )
            assert code == 4400, after
        code, _, got = await closed_with(
            json.dumps({"type": "auth", "token": token, "after": 10**9})
        )
        assert code == 4410 and [json.loads(m) for m in got] == [{"type": "reset"}]
        # over uvicorn's ws_max_size (64 KiB): refused by the server, 1009
        async with feed(host, token, None) as (console, _):
            await console.ws.send(json.dumps({"type": "pong", "pad": "x" * 70_000}))
            with pytest.raises(ConnectionClosed) as closed:
                await console.until(lambda m: False, within_s=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def api_up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


ENGINE = {"ELDERSAFE_ENGINE_CLOCK": "database", "ELDERSAFE_ENGINE_POLL_S": "0.05"}


async def test_an_acknowledgement_through_one_server_reaches_a_console_on_another(
    database: str, broker: MosquittoInstance, make_server: Any
) -> None:
    """Two real ``eldersafe server`` processes: the console is connected to B, staff act
    through A's HTTP API; A's commit reaches B's reader through LISTEN/NOTIFY (B's
    fallback poll is 5 s, so anything near 1 s can only be the notification)."""
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-x", 3)
    server_a = make_server(database, broker.port, "server", **ENGINE)
    server_b = make_server(database, broker.port, "server-2", **ENGINE)
    for server in (server_a, server_b):
        server.start()
    for server in (server_a, server_b):
        await asyncio.to_thread(wait_for, lambda s=server: api_up(s.api_port), 60, "the API")
    host_a, host_b = f"127.0.0.1:{server_a.api_port}", f"127.0.0.1:{server_b.api_port}"
    token = await token_of(host_a, "duty-a")
    delays: list[float] = []
    answered: list[float] = []
    async with (
        feed(host_b, token, None) as (console, _),
        httpx.AsyncClient(base_url=f"http://{host_a}",
                          headers={"Authorization": f"Bearer {token}"}) as api_a,
    ):  # fmt: skip
        for device in devices:
            raise_event(database, "site-a", device, "sos")
            opened = await console.until(
                lambda m, d=device: m.get("action") == "opened" and m["alert"]["device_id"] == d
            )
            alert_id = opened["alert_id"]
            started = time.perf_counter()
            answer = await api_a.post(f"/api/alerts/{alert_id}/acknowledge")
            assert answer.status_code == 200, answer.text
            answered.append(time.perf_counter() - started)
            acked = await console.until(
                lambda m, a=alert_id: m.get("action") == "acknowledged" and m["alert_id"] == a
            )
            delays.append(time.perf_counter() - started)
            assert acked["alert"]["status"] == "acknowledged"
            assert acked["alert"]["acknowledged_by"] == "staff:duty-a"
    print(f"acknowledge through A -> console on B: {[round(d * 1000) for d in delays]} ms"
          f" (A answered after {[round(d * 1000) for d in answered]} ms)")
    assert max(delays) < 1.0, delays


async def principal_of(conn: psycopg.AsyncConnection[Any], dsn: str, staff: str) -> Principal:
    """``staff`` as the feed's route authenticates them (a token of theirs, then
    ``deps.principal_from_credentials``)."""
    settings = settings_for(dsn)
    version = scalar(dsn, "SELECT token_version FROM staff WHERE id = %s", (staff,))
    token, _ = issue_token(settings.api_token_secret.get_secret_value(), staff, version,
                           timedelta(minutes=10))  # fmt: skip
    return await principal_from_credentials(conn, settings, token, None)


async def joined(live: LiveFeed, dsn: str, staff: str) -> Subscriber:
    """A subscriber of ``live`` as the WebSocket route makes one (with ``after: null``)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        me = await principal_of(conn, dsn, staff)

        async def nothing_sent_directly(text: str) -> None:
            raise AssertionError(f"with after null everything goes through the outbox: {text}")

        return await live.join(conn, me, None, nothing_sent_directly)


async def test_a_change_committed_behind_an_open_transaction_is_shown_at_once(
    database: str,
) -> None:
    """Forced: an acknowledgement's transaction inserts its change and stays open while a
    later alert is taken in and committed. The later alert reaches the console at once
    (nothing waits for the open transaction); the acknowledgement, committed last,
    arrives after it with a higher position and is not lost."""
    seed_tenants(database)
    (later,) = add_devices(database, "site-a", "wb-l", 1)
    raise_event(database, "site-a", "wb-a", "sos")
    await drain(database, T0)
    alert_id = scalar(database, "SELECT id FROM alerts WHERE device_id = 'wb-a'")
    live = LiveFeed(database, FeedTimings(fallback_poll_s=30.0))
    await live.start()
    try:
        sub = await joined(live, database, "duty-a")
        assert [json.loads(m)["type"] for m in await sub.next_messages(0)] == ["ready"]
        async with await psycopg.AsyncConnection.connect(database) as held:
            async with held.transaction():
                await command(held, alert_id, lambda a: acknowledge(staff_actor("duty-a"),
                              Channel.CONSOLE), T0 + timedelta(seconds=20))  # fmt: skip
                cur = await held.execute("SELECT position FROM alert_changes"
                                         " WHERE action = 'acknowledged'")  # fmt: skip
                (inserted_at,) = await cur.fetchone() or (None,)
                raise_event(database, "site-a", later, "sos")
                await drain(database, T0 + timedelta(seconds=21))
                got = await received(sub, 2)
                assert [(m["alert"]["device_id"], m["action"]) for m in got] == [
                    (later, "opened"), (later, "escalated")]  # fmt: skip
                inserted_after = scalar(database, "SELECT min(position) FROM alert_changes"
                                        " WHERE alert_id = %s", (got[0]["alert_id"],))  # fmt: skip
                assert inserted_at is not None and inserted_after > inserted_at  # the interleaving
            acked = await received(sub, 1)
        assert [(m["alert_id"], m["action"]) for m in acked] == [(str(alert_id), "acknowledged")]
        assert acked[0]["position"] > got[-1]["position"]
        assert await sub.next_messages(0) == []
    finally:
        await live.stop()


async def received(sub: Subscriber, n: int, within_s: float = 10) -> list[Message]:
    """The next ``n`` messages of a subscriber's outbox (fails on a deadline)."""
    got: list[Message] = []
    async with asyncio.timeout(within_s):
        while len(got) < n:
            got += [c for m in await sub.next_messages(within_s) for c in flatten(m)]
    assert len(got) == n, got
    return got


HOLD_IN_COMMIT = """
CREATE FUNCTION test_hold_in_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('test.hold_in_commit', true) = 'on' THEN
        PERFORM pg_advisory_xact_lock(%(key)s);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER zz_test_hold_in_commit AFTER INSERT ON alert_changes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_hold_in_commit();
"""
FORGED = ("INSERT INTO alert_changes (alert_id, seq, time, action, alert)"
          " VALUES (gen_random_uuid(), 1, now(), 'opened', '{}')")  # fmt: skip
WAITING_ON = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted AND locktype = 'advisory'
               AND objid = %s AND objsubid = 1)
"""
FEED_LOCK = 0x66656564  # the key of migration 0007's numbering lock


async def test_a_change_is_numbered_only_after_the_one_committing_before_it_is_visible(
    database: str,
) -> None:
    """Forced: T1 is held inside its COMMIT after its change was numbered (a deferred
    trigger of the test's, named to fire after the numbering, waits on a lock the test
    holds), and T2 commits a change meanwhile. T2 must wait for T1 to become visible: a
    T2 numbered higher and visible first would let a reader pass T1's number for good.
    Fails when the numbering trigger is gone, numbers at insert, or lets go of its lock
    before the commit ends."""
    test_key = 4242
    async with (
        await psycopg.AsyncConnection.connect(database, autocommit=True) as control,
        await psycopg.AsyncConnection.connect(database) as t1,
        await psycopg.AsyncConnection.connect(database, autocommit=True) as t2,
        await psycopg.AsyncConnection.connect(database, autocommit=True) as reader,
    ):
        await control.execute(HOLD_IN_COMMIT % {"key": test_key})
        await control.execute("SELECT pg_advisory_lock(%s)", (test_key,))
        before = await feed_last_position(reader)
        await t1.execute("SET LOCAL test.hold_in_commit = 'on'")
        await t1.execute(FORGED)
        cur = await t1.execute("SELECT pg_current_xact_id()::text")
        (t1_xid,) = await cur.fetchone() or ("",)
        t1_pid, t2_pid = t1.info.backend_pid, t2.info.backend_pid
        committing = asyncio.create_task(t1.commit())
        second: asyncio.Task[Any] | None = None

        def pid_waits_on(pid: int, key: int) -> bool:
            return bool(scalar(database, WAITING_ON, (pid, key)))

        try:
            await until(lambda: pid_waits_on(t1_pid, test_key), 10,
                        "T1 held in its commit, its change numbered")  # fmt: skip
            second = asyncio.create_task(t2.execute(FORGED))
            await until(lambda: second.done() or pid_waits_on(t2_pid, FEED_LOCK), 10,
                        "T2 committed or waiting")  # fmt: skip
            assert not second.done(), "T2 committed a change while T1 was still mid-commit"
            assert await changes_after(reader, before) == []  # neither is visible yet
        finally:
            await control.execute("SELECT pg_advisory_unlock(%s)", (test_key,))
            await asyncio.wait_for(committing, 10)
            if second is not None:
                await asyncio.wait_for(second, 10)
        both = await changes_after(reader, before)
        assert len(both) == 2 and both[0].position < both[1].position
        first_xid = scalar(database, "SELECT xid::text FROM alert_changes WHERE commit_seq = %s",
                           (both[0].position,))  # fmt: skip
        assert first_xid == t1_xid


async def test_a_slow_client_is_closed_and_neither_holds_the_reader_nor_grows(
    database: str,
) -> None:
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-y", 10)
    live = LiveFeed(database, FeedTimings(outbox_limit=5))
    await live.start()
    try:
        slow = await joined(live, database, "duty-a")  # never reads
        fast = await joined(live, database, "sup-a")
        received: list[Message] = []

        async def read_fast(n: int) -> None:
            while len(received) < n:
                received.extend(c for m in await fast.next_messages(10) for c in flatten(m))

        # one alert at a time, each read by the reader before the next: a frame each
        for i, device in enumerate(devices):
            raise_event(database, "site-a", device, "sos")
            await drain(database, T0)
            await asyncio.wait_for(read_fast(1 + 2 * (i + 1)), 30)  # ready, (opened, escalated)
        assert [m["type"] for m in received].count("change") == 20
        assert slow.closing is not None and slow.closing.code == CLOSE_BEHIND
        with pytest.raises(Closing):
            await slow.next_messages(0)
        assert fast.closing is None
    finally:
        await live.stop()


async def test_a_read_goes_to_each_client_as_one_frame_encoded_once_per_scope_and_tier(
    database: str,
) -> None:
    """Forced: the reader is held (its lock taken) while three alerts commit, so its next
    read holds six changes. Each client gets them in ONE ``changes`` frame, in commit
    order; two clients of one scope and tier share the very same string (encoded once);
    the street's client gets its own, masked, frame."""
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-f", 3)
    live = LiveFeed(database)
    await live.start()
    try:
        subs = [await joined(live, database, "duty-a"),
                await joined(live, database, "sup-a"),
                await joined(live, database, "street-1")]
        for sub in subs:
            assert [json.loads(m)["type"] for m in await sub.next_messages(0)] == ["ready"]
        async with live._lock:
            for device in devices:
                raise_event(database, "site-a", device, "sos")
            await drain(database, T0)
        expected = in_scope_positions(database, "site-a", 0)
        assert len(expected) == 6
        frames = [await sub.next_messages(10) for sub in subs]
        assert [len(f) for f in frames] == [1, 1, 1], frames
        duty_a, sup_a, street = (f[0] for f in frames)
        assert duty_a is sup_a  # one scope and tier: one string for both
        assert duty_a.isascii() and street.isascii()  # encoded per client: a plain copy
        for text, masked in ((duty_a, False), (street, True)):
            changes = flatten(text)
            assert [c["position"] for c in changes] == expected
            assert {c["alert"]["masked"] for c in changes} == {masked}
    finally:
        await live.stop()


async def test_a_big_read_is_cut_into_frames_and_nothing_is_lost_between_them(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame's changes stop at ``FRAME_BYTES`` (here: one change a frame), in the
    catch-up and the fan-out alike: every change once, in order, across the frames."""
    monkeypatch.setattr(live_module, "FRAME_BYTES", 1)
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-g", 4)
    for device in devices[:2]:
        raise_event(database, "site-a", device, "sos")
    await drain(database, T0)
    live = LiveFeed(database)
    await live.start()
    try:
        first = changes_of(database, devices[0])[0]
        frames: list[list[Message]] = []

        async def send(text: str) -> None:
            frames.append(flatten(text))

        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            me = await principal_of(conn, database, "duty-a")
            sub = await live.join(conn, me, first, send)
        async with live._lock:  # the next read holds both alerts' changes
            for device in devices[2:]:
                raise_event(database, "site-a", device, "sos")
            await drain(database, T0)
        queued: list[list[Message]] = []
        final = last_position(database)
        while not queued or queued[-1][-1]["position"] != final:
            queued += [flatten(m) for m in await sub.next_messages(10)]
        assert [len(f) for f in frames] == [1, 1, 1, 1]  # ready, then 3 changes
        assert [len(f) for f in queued] == [1, 1, 1, 1]
        positions = [m["position"] for f in frames[1:] + queued for m in f]
        assert positions == in_scope_positions(database, "site-a", first)
    finally:
        await live.stop()


async def test_a_read_and_its_views_cover_the_same_stretch_of_the_log(database: str) -> None:
    """The reader's changes and their views come from two statements in one round trip
    (``changes_with_views``): the views' statement must pick the very stretch of the log
    the changes' statement returned (after the position, up to the limit), at the log's
    start, middle and end, or a change would go out without its alert. A position the
    log does not hold is refused."""
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-v", 5)
    for device in devices:
        raise_event(database, "site-a", device, "sos")
        await drain(database, T0)  # one transaction each: each alert's changes side by side
    with psycopg.connect(database) as conn:
        log = conn.execute(
            "SELECT commit_seq, alert_id FROM alert_changes ORDER BY commit_seq"
        ).fetchall()
    assert len({alert for _, alert in log}) == 5 and len(log) >= 10
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        me = await principal_of(conn, database, "duty-a")
        for start in range(len(log) - 1):
            position = log[start][0]
            changes, views = await live_module.changes_with_views(conn, [me], position, 3)
            window = log[start + 1 : start + 4]
            assert [(c.position, c.alert_id) for c in changes] == window
            mine = views[me.units, me.organisation_kind]
            assert set(mine) == {alert for _, alert in window}
        with pytest.raises(LookupError):
            await live_module.changes_with_views(conn, [me], log[-1][0] + 10, 3)


def test_a_frame_is_ascii_json_meaning_the_same_text() -> None:
    """Names in Chinese, an accent, a character outside the BMP (a surrogate pair in JSON)
    and JSON's own escapes: the frame is ASCII and parses to the very same values."""
    alert = {"name": "张三丰", "note": "café 😀", "quoted": 'a "b" \\ c\n'}
    element = orjson.dumps({"type": "change", "position": 1, "alert": alert})
    payload = changes_payload([element, element])
    assert payload.isascii()
    assert json.loads(payload) == {"type": "changes", "changes": [orjson.loads(element)] * 2}


def last_position(dsn: str) -> int:
    """The last change in feed order."""
    return int(scalar(dsn, "SELECT max(commit_seq) FROM alert_changes"))


def changes_of(dsn: str, device: str) -> list[int]:
    """Positions of the changes of ``device``'s alert, in feed order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.commit_seq FROM alert_changes c JOIN alerts a ON a.id = c.alert_id"
            " WHERE a.device_id = %s ORDER BY c.commit_seq", (device,)
        ).fetchall()  # fmt: skip
    return [r[0] for r in rows]


async def test_the_reader_moving_during_a_catch_up_leaves_no_gap_and_no_duplicate(
    database: str,
) -> None:
    """Forced: while a reconnecting client is being sent its catch-up (without the reader's
    lock), another alert commits and the reader fans it out to everyone else. The client
    gets it from the last stretch of its catch-up, once, and the next from the fan-out."""
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-z", 5)
    live = LiveFeed(database)
    await live.start()
    try:
        for device in devices[:3]:
            raise_event(database, "site-a", device, "sos")
        await drain(database, T0)
        last = last_position(database)
        await until(lambda: live.position == last, 10, "the reader at the end")
        resume_from = changes_of(database, devices[0])[0]  # the client saw the first change
        direct: list[int] = []

        async def send(text: str) -> None:
            first = len(direct)
            direct.extend(m["position"] if m["type"] == "change" else -1 for m in flatten(text))
            if first == 1:  # mid catch-up: another alert, and the reader fans it out
                raise_event(database, "site-a", devices[3], "sos")
                await drain(database, T0)
                moved = last_position(database)
                await until(lambda: live.position == moved, 10, "the reader past it")

        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            me = await principal_of(conn, database, "duty-a")
            sub = await live.join(conn, me, resume_from, send)
        raise_event(database, "site-a", devices[4], "sos")
        await drain(database, T0)
        final = last_position(database)
        queued: list[int] = []
        while final not in queued:
            queued += [c["position"] for m in await sub.next_messages(10) for c in flatten(m)]
        assert direct[0] == -1  # ready
        received = direct[1:] + queued
        expected = in_scope_positions(database, "site-a", resume_from)
        assert len(expected) == 2 * len(devices) - 1  # opened and escalated each, but one
        assert received == expected, "a change lost, doubled or out of order at the seam"
    finally:
        await live.stop()


async def test_a_client_ahead_of_this_servers_reader_skips_what_it_already_has(
    database: str,
) -> None:
    """A position this server's reader has not reached yet (the client came from a server
    that is ahead): nothing up to it is sent again, everything after it is. The reader
    is kept behind by committing without its notification (the wake trigger disabled)
    while its fallback poll is 30 s."""
    seed_tenants(database)
    live = LiveFeed(database, FeedTimings(fallback_poll_s=30.0))
    await live.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("ALTER TABLE alert_changes DISABLE TRIGGER alert_changes_wake")
        raise_event(database, "site-a", "wb-a", "sos")
        await drain(database, T0)
        opened, escalated = changes_of(database, "wb-a")
        assert live.position is None  # the reader has not read them
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            me = await principal_of(conn, database, "duty-a")
            sent: list[Message] = []

            async def send(text: str) -> None:
                sent.extend(flatten(text))

            sub = await live.join(conn, me, opened, send)
        assert [(m["type"], m["position"]) for m in sent] == [("ready", opened),
                                                               ("change", escalated)]
        assert sub.floor == escalated and live.position is None
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("ALTER TABLE alert_changes ENABLE TRIGGER alert_changes_wake")
        raise_event(database, "site-a", "wb-a", "fall")
        await drain(database, T0)
        got = await received(sub, 2)
        assert [m["position"] for m in got] == changes_of(database, "wb-a")[2:]
        assert live.position == last_position(database)
    finally:
        await live.stop()


@pytest.mark.parametrize("raw", [True, False], ids=["frames written from the fan-out", "ASGI"])
async def test_pings_come_and_a_revoked_login_is_closed_at_the_next(
    database: str, monkeypatch: pytest.MonkeyPatch, raw: bool
) -> None:
    """Credentials are checked again at every ping: a changed password or a disabled
    account (its token_version raised) ends the feed, as it ends HTTP access at once."""
    monkeypatch.setattr(feed_route, "PING_EVERY_S", 0.2)
    seed_tenants(database)
    async with served(database, raw) as (host, _):
        token = await token_of(host, "duty-a")
        async with feed(host, token, None) as (console, _):
            assert (await console.next())["type"] == "ping"
            await console.ws.send('{"type": "pong"}')
            assert (await console.next())["type"] == "ping"  # a pong needs no answer
            with psycopg.connect(database) as conn:
                conn.execute("UPDATE staff SET token_version = token_version + 1"
                             " WHERE id = 'duty-a'")  # fmt: skip
            with pytest.raises(ConnectionClosed) as closed:
                await console.until(lambda m: False, within_s=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
            assert "log in again" in closed.value.rcvd.reason


async def test_a_reader_whose_place_left_the_log_resets_its_clients_and_goes_on(
    database: str,
) -> None:
    seed_tenants(database)
    raise_event(database, "site-a", "wb-a", "sos")
    await drain(database, T0)
    live = LiveFeed(database)
    await live.start()
    try:
        before = await joined(live, database, "duty-a")
        with psycopg.connect(database) as conn:  # as a retention job might
            conn.execute("DELETE FROM alert_changes WHERE commit_seq = %s", (live.position,))
        raise_event(database, "site-a", "wb-a", "fall")
        await drain(database, T0)
        with pytest.raises(Closing) as closing:
            while True:
                await before.next_messages(10)
        assert closing.value.code == 4410 and closing.value.last == ('{"type":"reset"}',)
        after = await joined(live, database, "duty-a")
        raise_event(database, "site-b", "wb-b", "sos")
        raise_event(database, "site-a", "wb-a", "tamper")
        await drain(database, T0)
        got: list[Message] = []
        while not any(m.get("action") == "escalated" for m in got):
            got += [c for m in await after.next_messages(10) for c in flatten(m)]
        assert {m["alert"]["type"] for m in got if m["type"] == "change"} == {"tamper"}
    finally:
        await live.stop()


@asynccontextmanager
async def frames_server(
    dsn: str, send_buffer: int | None = None
) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """The app served as ``eldersafe server`` serves it (``app.server_config``: our
    WebSocket protocol, each frame written to the clients' transports from the fan-out),
    on a free loopback port in this loop: its ``host:port`` and the uvicorn server.
    ``send_buffer`` as in ``api_support.api_server``."""
    port = free_port()
    app = create_app(settings_for(dsn, api_port=port))
    async with uvicorn_serving(server_config(app, "127.0.0.1", port), send_buffer) as server:
        yield f"127.0.0.1:{port}", server


@asynccontextmanager
async def served(
    dsn: str, raw: bool, send_buffer: int | None = None
) -> AsyncIterator[tuple[str, uvicorn.Server | None]]:
    """The API with frames written from the fan-out (``raw``) or through ASGI."""
    if raw:
        async with frames_server(dsn, send_buffer) as (host, server):
            yield host, server
    else:
        async with api_server(dsn, send_buffer=send_buffer) as host:
            yield host, None


class SilentClient:
    """A feed client on a plain socket with a small receive buffer that reads only when
    told to: while it does not, its TCP window shuts and the server's writes pile up.
    Its frames are read by the ``websockets`` library's parser."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.ws: ClientProtocol | None = None

    async def open(self, host: str, token: str, after: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        address, port = host.split(":")
        await loop.sock_connect(self.sock, (address, int(port)))
        self.ws = ws = ClientProtocol(parse_uri(f"ws://{host}/api/feed"), max_size=None)
        ws.send_request(ws.connect())
        await loop.sock_sendall(self.sock, b"".join(ws.data_to_send()))
        while ws.state is State.CONNECTING:
            ws.receive_data(await loop.sock_recv(self.sock, 4096))
        ws.send_text(json.dumps({"type": "auth", "token": token, "after": after}).encode())
        await loop.sock_sendall(self.sock, b"".join(ws.data_to_send()))

    async def read_until_closed(self, within_s: float) -> tuple[list[Message], int | None]:
        """Everything it was sent, in order (a ``changes`` frame's changes one by one),
        and the code of the server's close frame."""
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        got: list[Message] = []
        async with asyncio.timeout(within_s):
            while self.ws.close_rcvd is None:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    break
                self.ws.receive_data(data)
                for event in self.ws.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                        got += flatten(event.data)
        return got, None if self.ws.close_rcvd is None else self.ws.close_rcvd.code

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return str(host), int(port)


def all_positions(dsn: str) -> list[int]:
    return [r[0] for r in rows(dsn, "SELECT commit_seq FROM alert_changes ORDER BY commit_seq")]


@pytest.mark.parametrize("raw", [True, False], ids=["frames written from the fan-out", "ASGI"])
async def test_a_client_that_reads_nothing_is_let_go_and_holds_up_no_one(
    database: str, monkeypatch: pytest.MonkeyPatch, raw: bool
) -> None:
    """A peer whose TCP window stays shut: the server's writes to it pile up (in its
    transport, or its outbox behind a send that waits), it goes over its bound, and its
    handler ends within the close grace though no close frame can reach it; a console
    beside it gets every change meanwhile. Where frames are written from the fan-out
    the connection itself is cut off too (a graceful close would wait for the peer)."""
    feeds: list[LiveFeed] = []

    class SmallBounds(LiveFeed):
        def __init__(self, dsn: str) -> None:
            super().__init__(dsn, FeedTimings(outbox_limit=100, write_buffer_limit=16 * 1024))
            feeds.append(self)

    monkeypatch.setattr(app_module, "LiveFeed", SmallBounds)
    monkeypatch.setattr(feed_route, "CLOSE_WITHIN_S", 0.5)
    monkeypatch.setattr(FramesProtocol, "abort_after_s", 0.5)
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-q", 400)
    async with served(database, raw, send_buffer=4096) as (host, server):
        live = feeds[0]
        token = await token_of(host, "duty-a")
        stuck = SilentClient()
        await stuck.open(host, token)
        await until(lambda: live.clients == 1, 10, "the stuck client joined")
        try:
            async with feed(host, token, None) as (console, _):
                raised = 0
                while live.clients == 2 or raised == 0:
                    assert raised < len(devices), "the stuck client still served"
                    for device in devices[raised : raised + 20]:
                        raise_event(database, "site-a", device, "sos")
                    raised += 20
                    await drain(database, T0)
                    if raised == 20:
                        await until(lambda: live.clients == 2, 10, "both clients joined")
                        assert all((s.raw is not None) is raw for s in live._subscribers)
                await until(lambda: live.clients == 1, 10, "the stuck client handler ended")
                final = last_position(database)
                await console.until(lambda m: m.get("position") == final, within_s=30)
                assert [m["position"] for m in console.changes()] == all_positions(database)
                print(f"the stuck client was let go after {raised} alerts")
            if server is not None:

                def connected() -> bool:
                    return any(isinstance(c, FramesProtocol) and c.client == stuck.address
                               for c in server.server_state.connections)  # fmt: skip

                await until(lambda: not connected(), 10, "the stuck connection cut off")
        finally:
            stuck.sock.close()


async def test_a_client_that_stops_reading_is_closed_behind_and_resumes_from_its_last_position(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced: a client served by writes from the fan-out stops reading (a shut TCP
    window) while alerts are raised until its transport holds more than its bound. It is
    closed 4429; when it reads again it finds the frames written before in order, then
    that close; reconnecting with its last position it gets the rest: every change once."""
    feeds: list[LiveFeed] = []

    class SmallBuffer(LiveFeed):
        def __init__(self, dsn: str) -> None:
            super().__init__(dsn, FeedTimings(write_buffer_limit=16 * 1024))
            feeds.append(self)

    monkeypatch.setattr(app_module, "LiveFeed", SmallBuffer)
    monkeypatch.setattr(FramesProtocol, "abort_after_s", 120.0)  # it will read: no cut-off
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-r", 400)
    async with frames_server(database, send_buffer=4096) as (host, _):
        live = feeds[0]
        token = await token_of(host, "duty-a")
        client = SilentClient()
        try:
            await client.open(host, token)
            await until(lambda: live.clients == 1, 10, "the client joined")
            (sub,) = live._subscribers
            assert sub.raw is not None
            raised = 0
            while sub.closing is None:
                assert raised < len(devices), "never over its bound"
                for device in devices[raised : raised + 20]:
                    raise_event(database, "site-a", device, "sos")
                raised += 20
                await drain(database, T0)
                end = last_position(database)
                await until(lambda e=end: live.position == e, 10, "the reader at the end")
            assert sub.closing.code == CLOSE_BEHIND
            got, code = await client.read_until_closed(30)
        finally:
            client.sock.close()
        assert code == CLOSE_BEHIND
        assert got[0]["type"] == "ready"
        before = [m["position"] for m in got[1:]]
        everything = all_positions(database)
        assert before and before == everything[: len(before)], "not in order, or a gap"
        assert len(before) < len(everything)  # it was closed before the end
        async with feed(host, token, before[-1]) as (console, _):
            await console.until(lambda m: m.get("position") == everything[-1], within_s=30)
        assert before + [m["position"] for m in console.changes()] == everything
        print(f"closed behind after {len(before)} of {len(everything)} changes")


async def test_frames_written_from_the_fan_out_are_whole_and_the_same_as_through_asgi(
    database: str,
) -> None:
    """A real server as ``eldersafe server`` configures it and real ``websockets`` clients
    (their parser reads every frame): the reader is held while 60 alerts commit, so its
    next read is one frame over 65,535 bytes (the 8-byte length form); then one alert, a
    frame of a few KiB (the 2-byte form); ``ready`` is the 7-bit form. Names and
    addresses are Chinese, escaped. Two clients of one scope and tier get the same
    frames; the street's are masked; every client gets exactly its scope's changes, in
    order, as a client served through ASGI does."""
    seed_tenants(database)
    devices = add_devices(database, "site-a", "wb-w", 61)
    async with frames_server(database) as (host, server), api_server(database) as asgi_host:
        tokens = {user: await token_of(host, user) for user in ("duty-a", "sup-a", "street-1")}
        async with (
            feed(host, tokens["duty-a"], None) as (duty_a, _),
            feed(host, tokens["sup-a"], None) as (sup_a, _),
            feed(host, tokens["street-1"], None) as (street, _),
            feed(asgi_host, tokens["duty-a"], None) as (through_asgi, _),
        ):
            live: LiveFeed = server.config.app.state.live  # type: ignore[union-attr]
            assert live.clients == 3 and all(s.raw is not None for s in live._subscribers)
            async with live._lock:
                for device in devices[:60]:
                    raise_event(database, "site-a", device, "sos")
                await drain(database, T0)
            raise_event(database, "site-a", devices[60], "sos")
            await drain(database, T0)
            final = last_position(database)
            for client in (duty_a, sup_a, street, through_asgi):
                await client.until(lambda m: m.get("position") == final, within_s=30)
        print(f"frames of {duty_a.sizes} bytes")
        ready, held, last = duty_a.sizes  # one frame each
        assert ready < 126 and held > 65_535 and 125 < last < 65_536
        expected = in_scope_positions(database, "site-a", 0)
        assert len(expected) == 122
        for client in (duty_a, sup_a, street, through_asgi):
            assert [m["position"] for m in client.changes()] == expected
        assert duty_a.received == through_asgi.received  # the same messages either way
        assert [m for m in sup_a.received if m["type"] != "ready"] == [
            m for m in duty_a.received if m["type"] != "ready"
        ]
        shown = duty_a.changes()[0]["alert"]
        assert shown["site"]["name"] == "王家" and not shown["masked"]
        assert all(m["alert"]["masked"] for m in street.changes())
