"""One HTTP POST for the webhook and the voice provider, its outcome as a ``DeliveryError``.

Recoverable: no connection, a timeout, a connection dropped before the answer,
408 / 425 / 429 and 5xx. Not recoverable: a bad URL, redirects (a signed POST
is not followed elsewhere) and other 4xx — trying again cannot change them.
The answer's body is hostile input: at most ``MAX_BODY`` bytes are read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from alerting.ports import DeliveryError

MAX_BODY = 64 * 1024
RETRY_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


def header_value(text: str) -> str:
    """Header values are ASCII: a key naming a person in Chinese goes percent-encoded
    (RFC 3986; the body carries it as it is)."""
    return quote(text, safe="/:@._-+")


def client(timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False)


async def post(
    http: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str]
) -> Answer:
    """POST; a non-2xx answer or a transport failure raises ``DeliveryError``.

    httpx bounds each read; the whole exchange gets the same bound again (a server
    dripping its answer byte by byte must not hold the outbox rows)."""
    total_s = http.timeout.read or 10.0
    try:
        async with (
            asyncio.timeout(total_s),
            http.stream("POST", url, content=body, headers=dict(headers)) as resp,
        ):
            data = b""
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > MAX_BODY:
                    data = data[:MAX_BODY]
                    break
            status = resp.status_code
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise DeliveryError(f"bad URL {url!r}: {exc}", recoverable=False) from exc
    except httpx.TransportError as exc:  # refused, timeout, connection dropped
        raise DeliveryError(f"{type(exc).__name__}: {exc}", recoverable=True) from exc
    except TimeoutError as exc:
        raise DeliveryError(f"no full answer within {total_s} s", recoverable=True) from exc
    if 200 <= status < 300:
        return Answer(status, data)
    recoverable = status >= 500 or status in RETRY_STATUSES
    raise DeliveryError(f"HTTP {status}", recoverable=recoverable)
