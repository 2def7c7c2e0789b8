"""``WS /api/feed``: the live alert feed of one caller, resumable by position.

Protocol (the console is built against exactly this):

* client, first message within 10 s: ``{"type": "auth", "token": "<bearer token or API
  key>", "after": <position|null>}`` — never a token in the URL (URLs end up in logs).
  Bad or missing credentials: close 4401 with the reason; a malformed ``after``: 4400.
* server: ``{"type": "ready", "position": P}``. With ``after: null`` P is the end of the
  log (null while the log is empty): load ``GET /api/alerts`` and apply changes on top,
  keeping per alert the highest ``seq``. With a position, P is that position and every
  change after it in the caller's scope follows first.
* server, the changes in scope, always batched: ``{"type": "changes", "changes": [C,
  ...]}`` (never empty), one frame per read of the log (or per page of a catch-up; a
  big one in several frames of ≈ 256 KiB of changes at most), in order. Each C is
  ``{"type": "change", "position", "alert_id", "seq", "action", "alert"}`` —
  ``alert`` as ``GET /api/alerts/{id}`` gives it, without the timeline, masked as for
  this caller, read when the frame is built (so at least as new as the change;
  changes may arrive out of ``seq`` order within an alert, hence the highest-``seq``
  rule). Apply the elements in order. Resume from the last ``position``
  received: positions grow in the order the changes committed
  (``gateway.alerts.feed``), not necessarily by one. (Always a list, even of one, so
  a client has one path; a frame per change cost the server a frame per change per
  client.)
* server: ``{"type": "reset"}`` then close 4410 for a position it does not know (reload).
  ``{"type": "ping"}`` every 20 s (credentials are checked again then: an expired token
  or a disabled account closes 4401); the client may answer ``{"type": "pong"}``.
* client: ``{"type": "displayed", "alert_ids": [...]}`` (at most 500) — the console showed these
  alerts to this person: their console notices to that person are confirmed, so the
  fallback to messaging stops.
* anything malformed from the client: ``{"type": "error", "detail": "..."}``; frames
  over 64 KiB are refused by the server (close 1009). A client too far behind is closed
  4429, a stopping server closes 1012: reconnect with the last position either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway.alerts.workers import engine_now
from gateway.api.deps import pool_of, principal_from_credentials
from gateway.api.live import (
    CLOSE_MALFORMED,
    CLOSE_RESET,
    CLOSE_UNAUTHORIZED,
    FEED_CLIENT_ERRORS,
    FEED_CLOSED,
    Closing,
    LiveFeed,
    Subscriber,
    confirm_displayed,
    message,
)
from gateway.api.principal import Principal
from gateway.api.ws_frames import RawFrames
from gateway.config import Settings

log = logging.getLogger(__name__)
Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]
router = APIRouter(tags=["feed"])

AUTH_WITHIN_S = 10.0
PING_EVERY_S = 20.0
# A client closed by the server has this long to take the close frame; one that reads
# nothing at all (its TCP window shut) would otherwise hold the handler forever.
CLOSE_WITHIN_S = 5.0
MAX_DISPLAYED = 500  # alert ids in one "displayed" message


class AuthMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=4096)
    after: Annotated[int, Field(strict=True, ge=1, le=2**63 - 1)] | None = None


class Pong(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["pong"]


class Displayed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["displayed"]
    alert_ids: list[uuid.UUID] = Field(max_length=MAX_DISPLAYED)


_AUTH = TypeAdapter(AuthMessage)
_CLIENT: TypeAdapter[Pong | Displayed] = TypeAdapter(
    Annotated[Pong | Displayed, Field(discriminator="type")]
)


def problems(exc: ValidationError, limit: int = 3) -> str:
    """The first few problems, without echoing the client's input back."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


async def close_with(websocket: WebSocket, closing: Closing) -> None:
    # A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5).
    reason = closing.reason.encode()[:123].decode(errors="ignore")
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect, TimeoutError):
        async with asyncio.timeout(CLOSE_WITHIN_S):  # a send waits while the peer reads nothing
            await websocket.close(closing.code, reason)


async def read_auth(websocket: WebSocket) -> AuthMessage:
    try:
        received = await asyncio.wait_for(websocket.receive(), AUTH_WITHIN_S)
    except TimeoutError:
        raise Closing(CLOSE_UNAUTHORIZED, "no auth message within 10 s") from None
    if received["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(received.get("code", 1000))
    text = received.get("text")
    if text is None:
        raise Closing(CLOSE_UNAUTHORIZED, 'first message: {"type": "auth", ...} as JSON text')
    try:
        return _AUTH.validate_json(text)
    except ValidationError as exc:
        code = (CLOSE_MALFORMED if all(e["loc"][:1] == ("after",) for e in exc.errors())
                else CLOSE_UNAUTHORIZED)  # fmt: skip
        raise Closing(code, f"bad auth message: {problems(exc, 1)}") from None


async def authenticate(
    conn: psycopg.AsyncConnection[Any], settings: Settings, token: str
) -> Principal:
    try:
        return await principal_from_credentials(conn, settings, token, None)
    except HTTPException as exc:
        raise Closing(CLOSE_UNAUTHORIZED, str(exc.detail)) from None


@router.websocket("/api/feed")
async def feed(websocket: WebSocket) -> None:
    await websocket.accept()
    settings: Settings = websocket.app.state.settings
    live: LiveFeed = websocket.app.state.live
    pool = pool_of(websocket.app)
    try:
        auth = await read_auth(websocket)
        async with pool.connection() as conn:
            me = await authenticate(conn, settings, auth.token)
            try:
                # frames written from the fan-out where the server offers it (ws_frames)
                raw = RawFrames.of(websocket.scope)
                sub = await live.join(conn, me, auth.after, websocket.send_text, raw)
            except LookupError:
                FEED_CLOSED.labels("reset").inc()
                await websocket.send_text(message("reset"))
                raise Closing(
                    CLOSE_RESET, "unknown position: reload, reconnect with after null"
                ) from None
    except Closing as closing:
        if closing.code != CLOSE_RESET:
            FEED_CLOSED.labels("auth" if closing.code == CLOSE_UNAUTHORIZED else "malformed").inc()
        await close_with(websocket, closing)
        return
    except (WebSocketDisconnect, RuntimeError, OSError):
        return  # the client went away during the handshake or its catch-up
    try:
        await serve_client(websocket, settings, pool, sub, auth.token)
    finally:
        live.leave(sub)


async def serve_client(
    websocket: WebSocket, settings: Settings, pool: Pool, sub: Subscriber, token: str
) -> None:
    """The client's sender and receiver, until either ends (a close or a disconnect)."""
    tasks = {
        asyncio.create_task(send_loop(websocket, settings, pool, sub, token)),
        asyncio.create_task(receive_loop(websocket, settings, pool, sub)),
        asyncio.create_task(closed_for_good(sub)),
    }
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(
                exc, (WebSocketDisconnect, RuntimeError, OSError)
            ):
                log.error("feed client of %s failed", sub.principal.actor, exc_info=exc)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await close_with(websocket, Closing(1000, "bye"))


async def closed_for_good(sub: Subscriber) -> None:
    """Ends the connection's tasks once the server closed it and the sender had its time
    to say so (it may be stuck in a send to a peer that reads nothing)."""
    await sub.closed.wait()
    await asyncio.sleep(CLOSE_WITHIN_S)


async def send_loop(
    websocket: WebSocket, settings: Settings, pool: Pool, sub: Subscriber, token: str
) -> None:
    """The client's ping every 20 s and the server's close; its frames as the outbox
    fills, where the fan-out does not write them itself (``LiveFeed.join``'s ``raw``).
    Each send is one whole frame on the loop's thread, so it never splits a raw one."""
    next_ping = time.monotonic() + PING_EVERY_S
    while True:
        try:
            texts = await sub.next_messages(max(next_ping - time.monotonic(), 0.0))
        except Closing as closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WITHIN_S):
                    for text in closing.last:
                        await websocket.send_text(text)
            await close_with(websocket, closing)
            return
        if time.monotonic() >= next_ping:
            next_ping = time.monotonic() + PING_EVERY_S
            try:
                async with pool.connection() as conn:
                    sub.principal = await authenticate(conn, settings, token)
            except Closing as closing:
                FEED_CLOSED.labels("auth").inc()
                await close_with(websocket, closing)
                return
            except psycopg.Error as exc:  # the database is away: keep the client, try later
                log.warning("feed: credentials of %s not re-checked: %s", sub.principal.actor, exc)
            if sub.raw is None:
                texts.append(message("ping"))
            else:  # among the fan-out's writes, under its bound: never waits on the peer
                sub.say(message("ping"))
        for text in texts:
            await websocket.send_text(text)


async def receive_loop(
    websocket: WebSocket, settings: Settings, pool: Pool, sub: Subscriber
) -> None:
    while True:
        received = await websocket.receive()
        if received["type"] == "websocket.disconnect":
            return
        text = received.get("text")
        if text is None:
            FEED_CLIENT_ERRORS.inc()
            sub.say(message("error", detail="binary frames are not understood: send JSON text"))
            continue
        try:
            parsed = _CLIENT.validate_json(text)
        except ValidationError as exc:
            FEED_CLIENT_ERRORS.inc()
            sub.say(message("error", detail=f"not understood: {problems(exc)}"))
            continue
        if isinstance(parsed, Displayed):
            await displayed(settings, pool, sub, parsed.alert_ids)


async def displayed(settings: Settings, pool: Pool, sub: Subscriber,
                    alert_ids: list[uuid.UUID]) -> None:  # fmt: skip
    try:
        async with pool.connection() as conn:
            at = await engine_now(conn, settings.engine_clock)
            await confirm_displayed(conn, sub.principal, alert_ids, at)
    except psycopg.Error as exc:
        log.warning("feed: display by %s not recorded: %s", sub.principal.actor, exc)
        sub.say(message("error", detail="the display was not recorded: send it again"))
