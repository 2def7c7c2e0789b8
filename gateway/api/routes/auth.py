"""Logging in: a staff id and password give a short-lived token; the console renews it."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from gateway.api.deps import Conn, CurrentUser, SettingsDep, principal_from_credentials
from gateway.api.principal import Principal
from gateway.api.security import issue_token, verify_password

router = APIRouter(prefix="/api/auth", tags=["auth"])

_LOGIN = """
SELECT id, password_hash, token_version FROM staff WHERE id = %s AND active
"""


class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class Me(BaseModel):
    id: str
    name: str
    role: str
    organisation_id: str
    organisation_kind: str
    units: list[str]


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: datetime
    user: Me


def me_of(p: Principal) -> Me:
    return Me(id=p.id, name=p.name, role=p.role.value, organisation_id=p.organisation_id,
              organisation_kind=p.organisation_kind, units=p.unit_list)


@router.post("/login", response_model=TokenOut,
             responses={401: {"description": "wrong user name or password"}})
async def login(body: LoginBody, conn: Conn, settings: SettingsDep) -> TokenOut:
    row = await (await conn.execute(_LOGIN, (body.username,))).fetchone()
    if not verify_password(row[1] if row else None, body.password) or row is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong user name or password")
    token, expires = issue_token(settings.api_token_secret.get_secret_value(), row[0], row[2],
                                 timedelta(seconds=settings.api_token_ttl_s))
    me = await principal_from_credentials(conn, settings, token, None)
    return TokenOut(access_token=token, expires_at=expires, user=me_of(me))


@router.post("/refresh", response_model=TokenOut)
async def refresh(me: CurrentUser, conn: Conn, settings: SettingsDep) -> TokenOut:
    """A fresh token for a caller whose token is still valid (the console calls it while
    open, so a night shift is not logged out in the middle of an alarm)."""
    if me.via_api_key:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "API keys do not need tokens")
    row = await (await conn.execute("SELECT token_version FROM staff WHERE id = %s",
                                    (me.id,))).fetchone()
    version = row[0] if row else 0
    token, expires = issue_token(settings.api_token_secret.get_secret_value(), me.id, version,
                                 timedelta(seconds=settings.api_token_ttl_s))
    return TokenOut(access_token=token, expires_at=expires, user=me_of(me))


@router.get("/me", response_model=Me)
async def whoami(me: CurrentUser) -> Me:
    return me_of(me)
