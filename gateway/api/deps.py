"""Request dependencies as ``Annotated`` aliases (the FastAPI full-stack template's style):
a route says ``conn: Conn, me: CurrentUser`` and gets a pooled connection and the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from alerting.model import staff_actor
from gateway.alerts.store import Finish
from gateway.alerts.workers import engine_now
from gateway.api.principal import KEY_PRINCIPAL, STAFF_PRINCIPAL, Principal, principal_from_row
from gateway.api.security import (
    API_KEY_PREFIX,
    BadToken,
    TokenClaims,
    api_key_digest,
    read_token,
)
from gateway.config import Settings

_bearer = HTTPBearer(auto_error=False, description="a token from POST /api/auth/login")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an integration's key")



async def get_settings(request: Request) -> Settings:
    # async: FastAPI runs a plain function dependency in a worker thread, and the hop
    # there and back costs every request two turns of the server's busy loop
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def pool_of(app: Any) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = app.state.pool
    return pool


async def get_conn(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with pool_of(request.app).connection() as conn:
        yield conn


Conn = Annotated[psycopg.AsyncConnection[Any], Depends(get_conn)]


def unauthorized(detail: str = "log in first (POST /api/auth/login)") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail,
                         headers={"WWW-Authenticate": "Bearer"})


async def principal_from_credentials(
    conn: psycopg.AsyncConnection[Any], settings: Settings, token: str | None, api_key: str | None
) -> Principal:
    """The caller of a bearer token or an API key; 401 for anything else. Shared by HTTP
    routes and the WebSocket feed, so both accept exactly the same credentials."""
    caller = await caller_from_credentials(conn, settings, token, api_key)
    if isinstance(caller, Principal):
        return caller
    return await (await request_principal(conn, caller))()


async def caller_from_credentials(
    conn: psycopg.AsyncConnection[Any], settings: Settings, token: str | None, api_key: str | None
) -> Principal | TokenClaims:
    """An API key's caller (read), or a staff token's signed claims, not yet checked
    against the database: ``request_principal`` sends that check, so a route can send it
    with its own statements (one round trip for both)."""
    if token and token.startswith(API_KEY_PREFIX):
        token, api_key = None, token  # "Authorization: Bearer esk_..." works too
    if api_key:
        row = await (await conn.execute(KEY_PRINCIPAL, (api_key_digest(api_key),))).fetchone()
        if row is None:
            raise unauthorized("unknown or revoked API key")
        return principal_from_row(row, via_api_key=True)
    if not token:
        raise unauthorized()
    try:
        return read_token(settings.api_token_secret.get_secret_value(), token)
    except BadToken as exc:
        raise unauthorized(f"invalid token: {exc}") from None


async def request_principal(
    conn: psycopg.AsyncConnection[Any], claims: TokenClaims
) -> Finish[Principal]:
    """Send the read of a token's person (``store.Finish``): their row, token_version,
    organisation kind and units in one statement; 401 unless active with that version."""
    cur = await conn.execute(STAFF_PRINCIPAL, (claims.staff_id,))

    async def finish() -> Principal:
        row = await cur.fetchone()
        if row is None or row[4] != claims.version:
            raise unauthorized("the token is no longer valid; log in again")
        return principal_from_row(row)

    return finish


async def current_principal(
    conn: Conn,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal:
    return await principal_from_credentials(
        conn, settings, bearer.credentials if bearer else None, api_key
    )


CurrentUser = Annotated[Principal, Depends(current_principal)]


async def current_caller(
    conn: Conn,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal | TokenClaims:
    return await caller_from_credentials(
        conn, settings, bearer.credentials if bearer else None, api_key
    )


# The same credentials as ``CurrentUser``; a staff token's database check is left to the
# route (``request_principal``), which sends it with its first statements.
Caller = Annotated[Principal | TokenClaims, Depends(current_caller)]


def caller_actor(caller: Principal | TokenClaims) -> str:
    """The audit actor of a caller, known before its database check."""
    return caller.actor if isinstance(caller, Principal) else staff_actor(caller.staff_id)


async def managing_principal(me: CurrentUser) -> Principal:
    if not me.manages():
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"role {me.role.value} may read this but not change it")
    return me


Manager = Annotated[Principal, Depends(managing_principal)]


async def engine_time(conn: Conn, settings: SettingsDep) -> datetime:
    """The engine's clock (tests drive a database clock), so API actions and escalation
    timers agree on what time it is."""
    return await engine_now(conn, settings.engine_clock)


Now = Annotated[datetime, Depends(engine_time)]
