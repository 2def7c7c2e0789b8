"""Passwords, tokens and API keys: who is calling.

Passwords are argon2id hashes (RFC 9106 via argon2-cffi). Tokens are short-lived
HS256 JWTs naming the staff id and the staff row's ``token_version``; every
request re-reads the person from the database, so a disabled account or a
changed role takes effect at once and a token cannot be stretched into more
rights than the row grants. API keys are random 32-byte secrets of which only
the SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()
_ALGORITHM = "HS256"
_AUDIENCE = "eldersafe-console"
# Verifying against this when the user does not exist keeps a login's timing the
# same for a known and an unknown name (no user enumeration).
_DUMMY_HASH = _HASHER.hash("not a password anyone has")
API_KEY_PREFIX = "esk_"


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Constant work whether or not ``stored`` exists; never raises on a bad hash."""
    try:
        return _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class TokenClaims:
    staff_id: str
    version: int
    expires_at: datetime


class BadToken(ValueError):
    pass


def issue_token(secret: str, staff_id: str, version: int, ttl: timedelta,
                now: datetime | None = None) -> tuple[str, datetime]:
    now = now or datetime.now(UTC)
    expires = now + ttl
    claims = {"sub": staff_id, "ver": version, "aud": _AUDIENCE,
              "iat": int(now.timestamp()), "exp": int(expires.timestamp())}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM), expires


def read_token(secret: str, token: str) -> TokenClaims:
    """The claims of a valid, unexpired token signed with ``secret``; BadToken otherwise."""
    try:
        claims = jwt.decode(token, secret, algorithms=[_ALGORITHM], audience=_AUDIENCE,
                            options={"require": ["sub", "exp", "aud"]})
    except jwt.PyJWTError as exc:
        raise BadToken(str(exc)) from None
    sub, ver = claims.get("sub"), claims.get("ver", 0)
    if not isinstance(sub, str) or not isinstance(ver, int):
        raise BadToken("malformed claims")
    return TokenClaims(sub, ver, datetime.fromtimestamp(claims["exp"], UTC))


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def api_key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
