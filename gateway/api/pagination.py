"""Opaque cursors for keyset pagination (newest first): stable while rows are added,
unlike offsets, which skip or repeat rows under a live feed."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from fastapi import HTTPException, status


def encode_cursor(at: datetime, key: str | uuid.UUID | int) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{key}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, key = raw.split("|", 1)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive time")
        return when, key
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            "cursor is not one this API gave out; start without it") from None
