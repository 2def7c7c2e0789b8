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


async def once(
    conn: psycopg.AsyncConnection[Any],
    me: Principal,
    key: str | None,
    method: str,
    path: str,
    run: Callable[[], Awaitable[Any]],
    status_code: int = status.HTTP_200_OK,
) -> JSONResponse:
    """``run()`` once per (caller, key); its JSON answer replayed for every retry."""
    if key is None:
        return JSONResponse(jsonable_encoder(await run()), status_code)
    # Pipeline mode: BEGIN, the lock and the lookup share one round trip, the answer's
    # INSERT rides with the COMMIT. The lookup still sees a commit made while it waited
    # for the lock: PostgreSQL runs the statements in order, each with its own snapshot.
    async with conn.pipeline(), conn.transaction():
        # Two taps at once: the second waits here until the first commits, then replays.
        await conn.execute(_LOCK, (me.actor, key))
        row = await (await conn.execute(_STORED, (me.actor, key))).fetchone()
        if row is not None:
            if (row[0], row[1]) != (method, path):
                raise HTTPException(
                    422,
                    f"Idempotency-Key {key!r} was used for {row[0]} {row[1]}; use a new key",
                )
            return JSONResponse(row[3], row[2], headers={"Idempotent-Replayed": "true"})
        body = jsonable_encoder(await run())
        await conn.execute(_STORE, (me.actor, key, method, path, status_code, Jsonb(body)))
    return JSONResponse(body, status_code)
