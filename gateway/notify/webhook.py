"""The district bureau's safety network: HMAC-SHA256-signed JSON over HTTP.

Each message carries its idempotency key (``Notice.key``, also the
``Idempotency-Key`` header) and the alert's sequence number: the receiver keeps
the first of each key and can check the order. The runner sends message n+1 of
an alert only after n got a 2xx (``outbox.CLAIM``, by ``notifications.lane_seq``);
retries with backoff are ``alerting.pipeline.WEBHOOK_RETRY`` (settings can change
the delays). A message given up — a 4xx other than 408/425/429, or a day of
retries — is closed as failed with its reason, and the alert's next one goes.

Signature (like Stripe's and GitHub's): ``X-Eldersafe-Signature: sha256=<hex>``
over ``<timestamp>.<body>``, with ``X-Eldersafe-Timestamp`` in Unix seconds, so
a receiver refuses altered and replayed messages.
"""

from __future__ import annotations

import hashlib
import hmac

import httpx
import orjson

from alerting.pipeline import Notice
from alerting.ports import Receipt
from gateway.notify.facts import BatchFacts
from gateway.notify.http import header_value, post
from gateway.notify.text import describe

SIGNATURE_HEADER = "X-Eldersafe-Signature"
TIMESTAMP_HEADER = "X-Eldersafe-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """What a receiver does (the tests' receiver uses it; so can the bureau's)."""
    if not timestamp.isdigit():
        return False
    return hmac.compare_digest(signature(secret, int(timestamp), body), header)


def payload(notice: Notice, facts: BatchFacts) -> bytes:
    row = facts.of(notice)
    place = facts.places.get(notice.site_id)
    doc = {
        "v": 1,
        "idempotency_key": notice.key,
        "alert_id": str(notice.alert_id),
        "sequence": row.lane_seq,
        "type": notice.alert_type.value,
        "severity": notice.severity.value,
        "site_id": notice.site_id,
        "address": place.address if place else None,
        "residents": list(place.residents) if place else [],
        "level": notice.level,
        "step_id": notice.step_id,
        "text": describe(notice, place),
        "sent_at": facts.now.isoformat(),
    }
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


class WebhookChannel:
    def __init__(self, http: httpx.AsyncClient, secret: bytes, facts: BatchFacts) -> None:
        self.http = http
        self.secret = secret
        self.facts = facts

    async def send(self, notice: Notice) -> Receipt:
        body = payload(notice, self.facts)
        timestamp = int(self.facts.now.timestamp())
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: header_value(notice.key),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature(self.secret, timestamp, body),
        }
        answer = await post(self.http, notice.target, body, headers)
        # A 2xx is the bureau system's receipt, not a person's confirmation: nothing
        # follows a webhook (it is the last channel), so the row ends as 'sent'.
        return Receipt(confirmed=False, reference=f"HTTP {answer.status}")
