"""Staff and family messaging through Apprise: DingTalk, WeCom, Feishu, e-mail, SMS gateways.

Each person's target is an Apprise URL (``staff.apprise_url``,
``family_contacts.apprise_url``). Apprise is synchronous (requests): one call
runs in a worker thread under ``asyncio.wait_for``; its own connect/read
timeouts are capped to the same bound so a stuck thread ends too. Apprise
answers only True/False, so a False is taken as recoverable (the retry stage
tries again within the messaging window, then the person's next channel); a URL
Apprise cannot use is not. Targets that take HTTP headers (json://, xml://,
form://) get the notice key as ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import logging

import apprise

from alerting.pipeline import Notice
from alerting.ports import DeliveryError, Receipt
from gateway.notify.facts import BatchFacts
from gateway.notify.http import header_value
from gateway.notify.text import describe, title
from gateway.notify.webhook import IDEMPOTENCY_HEADER

log = logging.getLogger(__name__)


def _notify(url: str, subject: str, body: str, key: str, timeout_s: float) -> bool:
    plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        raise DeliveryError("not an Apprise URL this server can use", recoverable=False)
    plugin.socket_connect_timeout = min(plugin.socket_connect_timeout, timeout_s)
    plugin.socket_read_timeout = min(plugin.socket_read_timeout, timeout_s)
    headers = getattr(plugin, "headers", None)
    if isinstance(headers, dict):
        headers[IDEMPOTENCY_HEADER] = header_value(key)
    return bool(plugin.notify(body=body, title=subject))


class MessagingChannel:
    def __init__(self, facts: BatchFacts, timeout_s: float) -> None:
        self.facts = facts
        self.timeout_s = timeout_s

    async def send(self, notice: Notice) -> Receipt:
        body = describe(notice, self.facts.places.get(notice.site_id))
        try:
            ok = await asyncio.wait_for(
                asyncio.to_thread(
                    _notify, notice.target, title(notice), body, notice.key, self.timeout_s
                ),
                self.timeout_s,
            )
        except TimeoutError as exc:
            raise DeliveryError(f"Apprise took over {self.timeout_s} s", recoverable=True) from exc
        if not ok:
            raise DeliveryError("Apprise could not deliver (see its log)", recoverable=True)
        return Receipt(confirmed=False, reference="apprise")
