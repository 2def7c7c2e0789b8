"""Idempotency keys for the mutations clients retry (IETF draft "The Idempotency-Key
HTTP Header Field", as Stripe uses it): the first answer is stored in the same
transaction as the change and replayed for a retry, so a double-tapped
acknowledge is one acknowledgement, however the two requests interleave."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import psycopg
from fastapi import Header, HTTPException, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb

from gateway.api.principal import Principal
from gateway.db.pipelined import pipelined_transaction

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
           description="retrying with the same key replays the first answer"),
]

_LOCK = "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))"
_STORED = "SELECT method, path, status, body FROM api_idempotency WHERE actor = %s AND key = %s"
_STORE = """
INSERT INTO api_idempotency (actor, key, method, path, status, body)
VALUES (%s, %s, %s, %s, %s, %s)
"""


Answer = Callable[[], Awaitable[Any]]


async def once(
    conn: psycopg.AsyncConnection[Any],
    me: Principal,
    key: str | None,
    method: str,
    path: str,
    run: Answer,
    status_code: int = status.HTTP_200_OK,
) -> JSONResponse:
    """``run()`` once per (caller, key); its JSON answer replayed for every retry."""
    if key is None:
        return JSONResponse(jsonable_encoder(await run()), status_code)

    async def send() -> Answer:
        return run

    return await once_sent(conn, me.actor, key, method, path, send, status_code)


async def once_sent(
    conn: psycopg.AsyncConnection[Any],
    actor: str,
    key: str | None,
    method: str,
    path: str,
    send: Callable[[], Awaitable[Answer]],
    status_code: int = status.HTTP_200_OK,
) -> JSONResponse:
    """``once`` for a change that sends its reads before it needs them: ``send()`` sends
    them (and may check who ``actor`` is, before any answer is replayed) and returns
    what computes the answer from them, run at most once per (actor, key).

    One transaction in pipeline mode: BEGIN, the key's lock and lookup and what
    ``send()`` sends share one round trip; the answer's INSERT rides with the COMMIT.
    Without a key, the same transaction without the lock, the lookup and the INSERT."""
    async with pipelined_transaction(conn):
        stored = None
        if key is not None:
            # Two taps at once: the second waits here until the first commits, and its
            # lookup still sees that commit: PostgreSQL runs the statements in order,
            # each with its own snapshot.
            await conn.execute(_LOCK, (actor, key))
            stored = await conn.execute(_STORED, (actor, key))
        answer = await send()
        if stored is not None and (row := await stored.fetchone()) is not None:
            if (row[0], row[1]) != (method, path):
                raise HTTPException(
                    422,
                    f"Idempotency-Key {key!r} was used for {row[0]} {row[1]}; use a new key",
                )
            return JSONResponse(row[3], row[2], headers={"Idempotent-Replayed": "true"})
        body = jsonable_encoder(await answer())
        if key is not None:
            await conn.execute(_STORE, (actor, key, method, path, status_code, Jsonb(body)))
    return JSONResponse(body, status_code)
