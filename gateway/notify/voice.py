"""Voice call or SMS to a phone through an HTTP provider adapter.

One POST of JSON to the configured provider URL per call or SMS::

    {"kind": "voice" | "sms", "to": "+86…", "ack_code": "123456",
     "text": "…请立即处理。确认收到请按键输入确认码 1 2 3 4 5 6。",
     "idempotency_key": "<notice key>", "notification": "<row key>",
     "alert_id": "…", "language": "zh-CN"}

The provider speaks ``text`` (or sends it as SMS) and answers 2xx, optionally
with ``{"id": "<call id>"}``. The callee keys the code in; the provider's
callback hands (``notification``, digits) to ``outbox.confirm_by_code`` — the
HTTP endpoint for it comes with the console API (issue 8). Until then a call is
delivered but unconfirmed, and the window passes on to the next channel.
"""

from __future__ import annotations

import re
from typing import Literal

import httpx
import orjson

from alerting.pipeline import Notice
from alerting.ports import DeliveryError, Receipt
from gateway.notify.facts import BatchFacts
from gateway.notify.http import header_value, post
from gateway.notify.text import describe, spoken

PHONE = re.compile(r"^\+?[0-9]{5,20}$")


class PhoneChannel:
    def __init__(
        self,
        http: httpx.AsyncClient,
        provider_url: str | None,
        token: str | None,
        facts: BatchFacts,
        kind: Literal["voice", "sms"],
    ) -> None:
        self.http = http
        self.provider_url = provider_url
        self.token = token
        self.facts = facts
        self.kind = kind

    async def send(self, notice: Notice) -> Receipt:
        if not self.provider_url:
            raise DeliveryError("no voice/SMS provider configured", recoverable=False)
        phone = notice.target.replace(" ", "").replace("-", "")
        if not PHONE.match(phone):
            raise DeliveryError(f"not a phone number: {notice.target!r}", recoverable=False)
        row = self.facts.of(notice)
        text = spoken(describe(notice, self.facts.places.get(notice.site_id)), row.ack_code)
        body = orjson.dumps({
            "kind": self.kind, "to": phone, "text": text, "ack_code": row.ack_code,
            "idempotency_key": notice.key, "notification": row.key,
            "alert_id": str(notice.alert_id), "language": "zh-CN",
        })  # fmt: skip
        headers = {"Content-Type": "application/json", "Idempotency-Key": header_value(notice.key)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        answer = await post(self.http, self.provider_url, body, headers)
        return Receipt(confirmed=False, reference=_call_id(answer.body) or f"{self.kind}")


def _call_id(body: bytes) -> str | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    if not isinstance(value, str | int):
        return None
    # Outside input into the audit log: printable only (PostgreSQL refuses NUL), bounded.
    return "".join(c for c in str(value) if c.isprintable())[:200] or None
