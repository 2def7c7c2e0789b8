"""The live feed's server side: one reader per server process fans the change log out to
its WebSocket clients, each filtered to the caller's scope and masked as for them.

Why one reader: every server LISTENs on ``alert_changes`` (the trigger of migration 0006
notifies at each commit that grew the log, whichever server made the change), and one
task reads the new changes from its own position together with their views (one round
trip, ``changes_with_views``) and offers them to the clients. Clients never query the
log on a notification, so 200 consoles cost one read, not 200.

Why the seam has no gap and no duplicate: positions are commit-ordered numbers
(``gateway.alerts.feed``), so "after P" is plain ``> P``. The reader only moves under
``_lock``. A (re)connecting client catches up from its position to the end of the log
without the lock (a long catch-up must not stall the reader), then under the lock over
whatever the reader passed meanwhile, and is added to the fan-out in the same critical
section with that catch-up's end as its floor: the fan-out sends it only changes above
its floor, and every change up to the floor came from the catch-up. A client whose
position is ahead of this server's reader (it came from a faster server) simply has
that position as its floor.

Why one frame per batch: a read's changes go to a client as ONE ``changes`` message,
encoded once per (scope, masking tier) and shared by every client of that key. Each
WebSocket frame costs the one event loop a pass through Starlette, uvicorn and the
framing; one frame per change per client was 20,000 frames/s at 200 consoles and 50
alerts/s (bench/README.md, api.py). A busy loop reads bigger batches, so the frame rate
falls as the load rises.

Why frames written from the fan-out: a WebSocket frame from the server is not masked, so
a frame built once for a key is the same bytes for each of its clients. Where the server
offers it (``ws_frames``: uvicorn with our protocol, as ``eldersafe server`` runs), the
fan-out writes those bytes to each client's transport itself: no task wake-up, ASGI send
chain, framing or encode per client (they were half of the loop at 200 consoles). Where
it does not (an in-process ASGI client), the frame goes to the client's outbox and its
send task sends the same shared text through ASGI.

Why a bound per client: the reader never waits on a client. A client whose transport
holds more than ``write_buffer_limit`` unsent bytes (raw writes), or whose outbox holds
more than ``outbox_limit`` changes (through ASGI), is closed with a reason and reconnects
from its last position, so a slow phone costs bounded memory and never delays the others.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from prometheus_client import Counter, Gauge
from psycopg.rows import dict_row

from alerting.model import AuditAction, AuditEntry, Channel, DetailValue
from gateway.alerts.feed import Change, changes_after, last_position, request_changes_after
from gateway.alerts.store import PgAlertTransaction
from gateway.api.principal import Principal
from gateway.api.views import ALERT_SELECT, view_from_row
from gateway.api.ws_frames import RawFrames, text_frame
from gateway.restarting import run_forever

log = logging.getLogger(__name__)

FEED_CLIENTS = Gauge("eldersafe_api_feed_clients", "WebSocket feed clients connected")
FEED_MESSAGES = Counter("eldersafe_api_feed_messages_total", "change messages offered to clients")
FEED_CLOSED = Counter(
    "eldersafe_api_feed_closed_total",
    "feed connections the server closed, by reason (auth, malformed, reset, behind, shutdown)",
    ["reason"],
)
FEED_CLIENT_ERRORS = Counter(
    "eldersafe_api_feed_client_errors_total", "malformed messages from feed clients"
)
FEED_CONFIRMED = Counter(
    "eldersafe_api_feed_confirmed_total", "console notices confirmed by a 'displayed' message"
)

# Close codes of the feed (RFC 6455 §7.4.2: 4000-4999 are the application's).
CLOSE_UNAUTHORIZED = 4401  # bad, missing or expired credentials
CLOSE_MALFORMED = 4400  # the auth message was not one
CLOSE_RESET = 4410  # the position is unknown here: reload, reconnect with after null
CLOSE_BEHIND = 4429  # the client fell too far behind: reconnect with its last position
CLOSE_RESTART = 1012  # the server is stopping: reconnect (to any server) with the position


def message(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


def change_element(change: Change, alert: orjson.Fragment) -> bytes:
    """One change as the protocol's ``change`` object, its view already encoded."""
    return orjson.dumps({"type": "change", "position": change.position,
                         "alert_id": str(change.alert_id), "seq": change.seq,
                         "action": change.action, "alert": alert})  # fmt: skip


_NON_ASCII = re.compile(rb"[\x80-\xff]+")  # in valid UTF-8: whole characters


def _json_escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # outside the BMP: a UTF-16 surrogate pair, as JSON spells it
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _json_escape_run(match: re.Match[bytes]) -> bytes:
    return "".join(map(_json_escape, match.group().decode())).encode()


def changes_payload(elements: Sequence[bytes]) -> bytes:
    """The ``changes`` message of already encoded elements (joined, not encoded again), in
    ASCII: where a client is served through ASGI the server encodes each frame's text to
    UTF-8 once PER CLIENT (uvicorn), a plain copy for an ASCII string but a transcoding of
    every byte for one holding a Chinese name (≈ 25 times slower; 15 % of the loop at 200
    consoles). Non-ASCII characters only occur inside JSON strings, where ``\\uXXXX``
    means the same; both paths send the same bytes."""
    payload = b'{"type":"changes","changes":[' + b",".join(elements) + b"]}"
    return payload if payload.isascii() else _NON_ASCII.sub(_json_escape_run, payload)


class OutFrame:
    """One message on its way, shared by every client it goes to: its UTF-8 payload and
    the changes it holds (what an outbox bound counts); built once, on first use, the
    text for ASGI's ``send_text`` and the whole WebSocket frame for a raw write."""

    __slots__ = ("_text", "_wire", "changes", "payload")

    def __init__(self, payload: bytes, changes: int = 1) -> None:
        self.payload = payload
        self.changes = changes
        self._text: str | None = None
        self._wire: bytes | None = None

    @classmethod
    def of_text(cls, text: str) -> OutFrame:
        return cls(text.encode())

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.payload.decode()
        return self._text

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = text_frame(self.payload)
        return self._wire


class Closing(Exception):
    """The client's connection is to be closed with ``code`` and ``reason``, after
    sending ``last`` (a reset says why before the close)."""

    def __init__(self, code: int, reason: str, last: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.last = last


class Subscriber:
    """One connected client: its principal, where its frames go (written to its transport
    with ``raw``, else its bounded outbox) and why it must close."""

    def __init__(
        self,
        principal: Principal,
        limit: int,
        raw: RawFrames | None = None,
        buffer_limit: int = 0,
    ) -> None:
        self.principal = principal
        self.limit = limit  # changes in the outbox
        self.raw = raw
        self.buffer_limit = buffer_limit  # bytes unsent in the transport (raw writes)
        self.floor: int | None = None  # changes up to this one it has (from its catch-up)
        self.closing: Closing | None = None
        self.closed = asyncio.Event()  # set with ``closing``
        self._outbox: deque[OutFrame] = deque()
        self._queued = 0  # changes in the outbox (what ``limit`` bounds)
        self._ready = asyncio.Event()

    @property
    def view_key(self) -> ViewKey:
        """Everything a view depends on besides the alert (scope and masking tier)."""
        return (self.principal.units, self.principal.organisation_kind)

    def offer(self, frame: OutFrame) -> bool:
        """Send ``frame`` without waiting: written to the transport now (raw), else queued
        for the send task. A client over its bound is closed instead: a transport that
        would hold more than ``buffer_limit`` unsent bytes, an outbox more than ``limit``
        changes. Frames go out in the order offered either way."""
        if self.closing is not None:
            return False
        if self.raw is not None:
            wire = frame.wire
            held = self.raw.buffered()
            if held and held + len(wire) > self.buffer_limit:
                if not self.raw.closing():  # one going away anyway is not behind
                    self._behind()
                return False
            return self.raw.write(wire)
        if self._queued and self._queued + frame.changes > self.limit:
            self._behind()
            return False
        self._outbox.append(frame)
        self._queued += frame.changes
        self._ready.set()
        return True

    def say(self, text: str) -> bool:
        """Offer one message of the protocol (``ready``, ``error``)."""
        return self.offer(OutFrame.of_text(text))

    def _behind(self) -> None:
        self.close(CLOSE_BEHIND, "too far behind: reconnect with your last position")
        FEED_CLOSED.labels("behind").inc()

    def close(self, code: int, reason: str, last: tuple[str, ...] = ()) -> None:
        if self.closing is None:
            self.closing = Closing(code, reason, last)
            self._outbox.clear()  # nothing more goes out: free the memory now
            self._queued = 0
            self.closed.set()
        self._ready.set()

    async def next_messages(self, quiet_s: float) -> list[str]:
        """What to send now ([] after ``quiet_s`` of quiet); raises Closing when closed."""
        if not self._ready.is_set():
            # asyncio.timeout, not wait_for: no task per wake-up (200 clients wake per batch)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(quiet_s):
                    await self._ready.wait()
        self._ready.clear()
        if self.closing is not None:
            raise self.closing
        out = [frame.text for frame in self._outbox]
        self._outbox.clear()
        self._queued = 0
        return out


Views = dict[uuid.UUID, orjson.Fragment]  # each alert's view, JSON-encoded once


ViewKey = tuple[frozenset[str], str]  # (scope, masking tier): who sees the same views
# The alerts of the changes after a position, as ``feed.changes_after`` reads them.
_CHANGED_AFTER = """ AND a.id IN (SELECT alert_id FROM alert_changes
    WHERE commit_seq > %(after)s ORDER BY commit_seq LIMIT %(limit)s)"""


def _keys(principals: Iterable[Principal]) -> dict[ViewKey, Principal]:
    by_key: dict[ViewKey, Principal] = {}
    for p in principals:
        by_key.setdefault((p.units, p.organisation_kind), p)
    return by_key


def _units(by_key: dict[ViewKey, Principal]) -> list[str]:
    return sorted(set().union(*(key[0] for key in by_key)))


def _encoded(by_key: dict[ViewKey, Principal], rows: list[dict[str, Any]]) -> dict[ViewKey, Views]:
    return {
        key: {r["id"]: orjson.Fragment(view_from_row(p, r).model_dump_json())
              for r in rows if r["unit_id"] in key[0]}
        for key, p in by_key.items()
    }  # fmt: skip


async def views_by_key(
    conn: psycopg.AsyncConnection[Any],
    principals: Sequence[Principal],
    ids: Iterable[uuid.UUID],
) -> dict[ViewKey, Views]:
    """The encoded views of ``ids`` for each distinct (scope, tier) of ``principals``, from one
    query (``views.ALERT_SELECT`` over the union of their units); an alert outside a key's
    scope is absent from that key's views."""
    wanted = sorted(set(ids))
    by_key = _keys(principals)
    if not wanted or not by_key:
        return {key: {} for key in by_key}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            ALERT_SELECT + " AND a.id = ANY(%(ids)s)", {"units": _units(by_key), "ids": wanted}
        )
        rows = await cur.fetchall()
    return _encoded(by_key, rows)


async def changes_with_views(
    conn: psycopg.AsyncConnection[Any],
    principals: Sequence[Principal],
    position: int,
    limit: int,
) -> tuple[list[Change], dict[ViewKey, Views]]:
    """``changes_after(position)`` and their ``views_by_key``, in ONE round trip: under load
    every round trip waits a turn of the shared loop, and each turn shows in every
    console's latency and in an acknowledge's return to its own console.

    The views are read by the second statement, so with a snapshot no older than the
    changes': numbers become visible in commit order (``gateway.alerts.feed``), so the
    first ``limit`` changes after ``position`` it sees include every change the first
    statement returned, and no change is left without its view. (A view newer than its
    change is what ``views_by_key`` after a read gives too.)"""
    by_key = _keys(principals)
    async with conn.pipeline(), conn.cursor(row_factory=dict_row) as cur:
        changes = await request_changes_after(conn, position, limit)
        await cur.execute(ALERT_SELECT + _CHANGED_AFTER,
                          {"units": _units(by_key), "after": position, "limit": limit})
        rows = await cur.fetchall()  # the sync: both answers
        return await changes(), _encoded(by_key, rows)


FRAME_BYTES = 256 * 1024  # a frame's changes stop here (one change may be longer)


class KeyBatch:
    """One read's changes as one (scope, tier) sees them: each element encoded once, and
    the ``changes`` frame from a given element on built once and shared by every client
    of the key (clients differ only in their floor, set when they joined)."""

    def __init__(self, changes: Sequence[Change], views: Views) -> None:
        self.positions: list[int] = []
        self.elements: list[bytes] = []
        for change in changes:
            alert = views.get(change.alert_id)
            if alert is not None:
                self.positions.append(change.position)
                self.elements.append(change_element(change, alert))
        self._frames: dict[int, list[OutFrame]] = {}

    def start_above(self, floor: int) -> int:
        return bisect.bisect_right(self.positions, floor)

    def frames_from(self, start: int) -> list[OutFrame]:
        """The frames of the elements from ``start`` on ([]: nothing for this client).
        Usually one; a big read is cut at ``FRAME_BYTES`` (a long catch-up is 500
        changes), since common WebSocket clients refuse frames over 1 MiB by default."""
        if start not in self._frames:
            frames: list[OutFrame] = []
            chunk: list[bytes] = []
            size = 0
            for element in self.elements[start:]:
                if chunk and size + len(element) > FRAME_BYTES:
                    frames.append(OutFrame(changes_payload(chunk), len(chunk)))
                    chunk, size = [], 0
                chunk.append(element)
                size += len(element) + 1
            if chunk:
                frames.append(OutFrame(changes_payload(chunk), len(chunk)))
            self._frames[start] = frames
        return self._frames[start]


@dataclass(frozen=True, slots=True)
class FeedTimings:
    batch: int = 500  # changes read per query
    fallback_poll_s: float = 5.0  # a lost notification costs at most this
    # Changes queued per client before it is closed as too slow; above ``batch``, since a
    # read offers its whole batch at once. Clients of one scope and tier share each
    # message's string, so a slow client holds references, not copies.
    outbox_limit: int = 1000
    # The same bound where frames are written to the transport: its unsent bytes (about
    # ``outbox_limit`` changes of ≈ 2-4 KiB; a catch-up page is at most 500 changes).
    write_buffer_limit: int = 4 * 1024 * 1024


class LiveFeed:
    """The server's reader of the change log and its fan-out to connected clients."""

    def __init__(self, dsn: str, timings: FeedTimings = FeedTimings()) -> None:
        self.dsn = dsn
        self.timings = timings
        self.position: int | None = None  # the last change offered to the fan-out
        self.passes = 0  # reads of the log so far (tests wait on it)
        self._started = False
        self._lock = asyncio.Lock()
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()

    async def start(self, within_s: float = 30.0) -> None:
        """Start the reader; returns once it listens and knows the end of the log."""
        self._task = asyncio.create_task(self._run(), name="live-feed")
        up = asyncio.create_task(self._up.wait())
        await asyncio.wait({self._task, up}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        if self._task.done():
            self._task.result()  # its error, if it gave up
        if not self._up.is_set():
            raise TimeoutError("the live feed's reader did not start")

    async def stop(self) -> None:
        for sub in list(self._subscribers):
            sub.close(CLOSE_RESTART, "server stopping: reconnect with your last position")
            FEED_CLOSED.labels("shutdown").inc()
        if self._task is not None:
            self._task.cancel()
            # its own failure was raised by start() already; do not mask the shutdown's cause
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- the reader ------------------------------------------------------------------

    async def _run(self) -> None:
        # a bug must not end the feed of every console: log, retry
        await run_forever(
            "live feed reader",
            self._listen_and_read,
            log=log,
            transient=(psycopg.OperationalError, OSError),
        )

    async def _listen_and_read(self) -> None:
        async with (
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as listen,
            await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn,
        ):
            # LISTEN before reading where the log ends, so no commit falls in between.
            await listen.execute("LISTEN alert_changes")
            if not self._started:
                self.position = await last_position(conn)
                self._started = True
            self._up.set()
            while True:
                await self._read_all(conn)
                self.passes += 1
                # Waits on the LISTEN socket itself (a notification that came during the
                # read is there already): a task forwarding it through an event would
                # cost every change one more turn of the loop. A broken LISTEN
                # connection raises here, and both reconnect.
                async for _ in listen.notifies(timeout=self.timings.fallback_poll_s,
                                               stop_after=1):  # fmt: skip
                    pass

    async def _read_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async with self._lock:
                subs = [s for s in self._subscribers if s.closing is None]
                try:
                    if self.position is None or not subs:
                        changes = await changes_after(conn, self.position, self.timings.batch)
                        views = (await views_by_key(conn, [s.principal for s in subs],
                                                    (c.alert_id for c in changes))
                                 if changes and subs else {})  # fmt: skip
                    else:
                        changes, views = await changes_with_views(
                            conn, [s.principal for s in subs], self.position, self.timings.batch
                        )
                except LookupError:
                    self._lost_position()
                    self.position = await last_position(conn)
                    return
                if not changes:
                    return
                self._fan_out(subs, changes, views)
                self.position = changes[-1].position
            if len(changes) < self.timings.batch:
                return

    def _lost_position(self) -> None:
        log.error("live feed: change %s is no longer in the log; every client reloads",
                  self.position)  # fmt: skip
        for sub in list(self._subscribers):
            sub.close(CLOSE_RESET, "the feed lost its place: reload", (message("reset"),))
            FEED_CLOSED.labels("reset").inc()

    def _fan_out(
        self, subs: list[Subscriber], changes: list[Change], views: dict[ViewKey, Views]
    ) -> None:
        batches = {key: KeyBatch(changes, mine) for key, mine in views.items()}
        offered = 0  # counted once per batch: a counter call per frame shows in profiles
        for sub in subs:
            batch = batches[sub.view_key]
            start = 0 if sub.floor is None else batch.start_above(sub.floor)
            for frame in batch.frames_from(start):
                if sub.offer(frame):
                    offered += frame.changes
        FEED_MESSAGES.inc(offered)

    # -- a client joining ------------------------------------------------------------

    async def join(
        self,
        conn: psycopg.AsyncConnection[Any],
        principal: Principal,
        after: int | None,
        send: Callable[[str], Awaitable[None]],
        raw: RawFrames | None = None,
    ) -> Subscriber:
        """Add a client to the fan-out. ``send`` is used for ``ready`` and the catch-up
        before the client is added (it may wait on a slow client: nothing else does);
        from then on its frames are written with ``raw`` if given, else queued. Raises
        LookupError for a position the log does not hold."""
        sub = Subscriber(principal, self.timings.outbox_limit, raw,
                         self.timings.write_buffer_limit)  # fmt: skip
        if after is None:
            async with self._lock:
                sub.say(message("ready", position=self.position))
                self._add(sub)
            return sub
        page = await changes_after(conn, after, self.timings.batch)  # LookupError: unknown
        await send(message("ready", position=after))
        cursor = await self._catch_up(conn, sub, after, page, None, send)
        async with self._lock:
            # the reader's stretch since: what it fanned out before this client was in
            if self.position is not None and cursor < self.position:
                cursor = await self._catch_up(conn, sub, cursor, None, self.position, None)
            sub.floor = cursor
            self._add(sub)
        return sub

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def _add(self, sub: Subscriber) -> None:
        self._subscribers.add(sub)
        FEED_CLIENTS.set(len(self._subscribers))

    def leave(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        FEED_CLIENTS.set(len(self._subscribers))

    async def _catch_up(
        self,
        conn: psycopg.AsyncConnection[Any],
        sub: Subscriber,
        cursor: int,
        page: list[Change] | None,
        through: int | None,
        send: Callable[[str], Awaitable[None]] | None,
    ) -> int:
        """The client's changes after ``cursor``, in order, through ``through`` (None: to
        the end of the log), starting with ``page`` if read already: sent with ``send``,
        or offered to its outbox (under the reader's lock: no waiting). Returns the last
        position covered."""
        while True:
            if page is None:
                page = await changes_after(conn, cursor, self.timings.batch)
            if not page:
                return cursor
            views = await views_by_key(conn, [sub.principal], (c.alert_id for c in page))
            batch = KeyBatch(page, views.get(sub.view_key, {}))
            for frame in batch.frames_from(0):
                if send is not None:
                    await send(frame.text)
                else:
                    sub.offer(frame)
            cursor = page[-1].position
            if len(page) < self.timings.batch or (through is not None and cursor >= through):
                return cursor
            page = None


# -- "displayed": the console showed these alerts to this person -------------------------

_CONSOLE_NOTICES = """
SELECT n.id, n.alert_id, n.step_id, n.person_id, n.channel, n.status
FROM notifications n
JOIN alerts a ON a.id = n.alert_id
JOIN sites s ON s.id = a.site_id
WHERE n.person_id = %(person)s AND n.alert_id = ANY(%(ids)s)
  AND s.organisation_id = ANY(%(units)s)
  AND n.status IN ('pending', 'sent') AND n.confirmed_at IS NULL
  AND (n.channel = 'console' OR 'console' = ANY(n.delivered_channels))
ORDER BY n.id
FOR UPDATE OF n
"""
_CONFIRM = """
UPDATE notifications SET status = 'confirmed', confirmed_at = %s,
    closed_reason = 'shown on the person''s console', updated_at = %s
WHERE id = ANY(%s)
"""


async def confirm_displayed(
    conn: psycopg.AsyncConnection[Any],
    me: Principal,
    alert_ids: Sequence[uuid.UUID],
    at: datetime,
) -> int:
    """The console showed ``alert_ids`` to ``me``: their console notices to this person are
    confirmed, so no further channel is tried (the runner claims only pending rows), and
    the audit chain says so, as ``gateway.notify.outbox.confirm_by_code`` does for a code.
    Alerts outside the caller's scope, or without such a notice, are left alone."""
    if me.via_api_key or not alert_ids:
        return 0  # an integration is not a person with notices
    for attempt in range(3):
        try:
            async with conn.transaction():
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(
                        _CONSOLE_NOTICES,
                        {"person": me.actor, "units": me.unit_list, "ids": sorted(set(alert_ids))},
                    )
                    rows = await cur.fetchall()
                if not rows:
                    return 0
                await conn.execute(_CONFIRM, (at, at, [r["id"] for r in rows]))
                entries = []
                for r in sorted(rows, key=lambda r: (str(r["alert_id"]), r["id"])):
                    detail: dict[str, DetailValue] = {
                        "step": r["step_id"], "person": r["person_id"], "confirmed": True,
                        "by": "shown on the console", "was": r["status"],
                    }  # fmt: skip
                    entries.append(AuditEntry(at, r["alert_id"], me.actor, AuditAction.NOTED,
                                              Channel.CONSOLE, detail))  # fmt: skip
                # chains appended in alert order, as the notifier does: no crosswise waits
                await PgAlertTransaction(conn, f"api:{me.actor}").audit(entries)
            FEED_CONFIRMED.inc(len(rows))
            return len(rows)
        except psycopg.errors.DeadlockDetected:
            if attempt == 2:
                raise
    return 0
