"""The WebSocket live feed (issue 8, point 3): resumable by position with nothing lost and
nothing twice, scoped to the caller, across servers through LISTEN/NOTIFY, and the
console's "displayed" confirming its notices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
from api_support import PASSWORD, T0, api_server, raise_event, seed_tenants
from support import scalar
from test_alert_engine import drain
from websockets.asyncio.client import ClientConnection, connect

pytestmark = pytest.mark.timeout(180)

Message = dict[str, Any]


async def token_of(host: str, user: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://{host}") as client:
        answer = await client.post("/api/auth/login", json={"username": user, "password": PASSWORD})
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token


class Feed:
    """A console's feed connection: every message it received, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[Message] = []

    async def next(self, within_s: float = 10.0) -> Message:
        text = await asyncio.wait_for(self.ws.recv(), within_s)
        msg: Message = json.loads(text)
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
            "SELECT c.position FROM alert_changes c JOIN alerts a ON a.id = c.alert_id,"
            " (SELECT xid, position FROM alert_changes WHERE position = %s) last"
            " WHERE a.site_id = %s AND (c.xid, c.position) > (last.xid, last.position)"
            " ORDER BY c.xid, c.position",
            (after, site),
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
