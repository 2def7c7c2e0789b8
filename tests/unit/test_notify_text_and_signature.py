"""The notifiers' pure parts: the Chinese texts, the webhook's signature and payload."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from alerting.model import AlertStatus, AlertType, Channel, Severity
from alerting.pipeline import REMINDER_PREFIX, Notice
from alerting.policy import Role
from gateway.config import DEMO_SECRET, Settings
from gateway.notify.facts import BatchFacts, RowFacts
from gateway.notify.http import header_value
from gateway.notify.text import Place, describe, spoken
from gateway.notify.webhook import payload, signature, verify

AT = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


SOS_TEXT = "紧急呼叫：site-1 的老人按下了求助按钮，请立即处理。"


def notice(text: str = SOS_TEXT, **kw: object) -> Notice:
    fields: dict[str, object] = dict(
        alert_id=uuid.UUID(int=1), alert_type=AlertType.SOS, severity=Severity.CRITICAL,
        site_id="site-1", step_id="a/0/level/3/0", level=3, person_id="bureau:bureau",
        role=Role.BUREAU, channel=Channel.WEBHOOK, target="http://127.0.0.1:9/x", text=text,
        until=AlertStatus.ACKNOWLEDGED, not_before=AT, channel_since=AT,
    )  # fmt: skip
    fields.update(kw)
    return Notice(**fields)  # type: ignore[arg-type]


PLACE = Place("site-1", "家 1", "幸福路1号3栋201", ("王奶奶", "王爷爷"))


def test_text_names_the_address_and_residents_and_keeps_the_prefix() -> None:
    assert describe(notice(), PLACE) == (
        "紧急呼叫：幸福路1号3栋201 的老人按下了求助按钮，请立即处理。老人：王奶奶、王爷爷。"
    )
    reminder = notice(REMINDER_PREFIX + "紧急呼叫：site-1 …")
    assert describe(reminder, PLACE).startswith(REMINDER_PREFIX + "紧急呼叫：幸福路1号3栋201")
    assert describe(notice(), None) == notice().text  # a site not in the directory
    assert describe(notice(members=("k1", "k2")), PLACE) == notice().text  # a summary


def test_spoken_text_reads_the_code_digit_by_digit() -> None:
    assert spoken("请立即处理。", "042917").endswith("确认码 0 4 2 9 1 7。")


def test_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"a":1}'
    want = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(b"k", 1700000000, body) == "sha256=" + want
    assert verify(b"k", "1700000000", body, "sha256=" + want)
    assert not verify(b"k", "1700000001", body, "sha256=" + want)  # replayed at another time
    assert not verify(b"k", "1700000000", body + b" ", "sha256=" + want)  # altered
    assert not verify(b"other", "1700000000", body, "sha256=" + want)
    assert not verify(b"k", "-1", body, "sha256=" + want)


def test_webhook_payload_carries_key_sequence_and_place() -> None:
    n = notice()
    facts = BatchFacts(AT, rows={(n.step_id, n.person_id): RowFacts(n.key, 4, "123456")},
                       places={"site-1": PLACE})  # fmt: skip
    doc = orjson.loads(payload(n, facts))
    assert doc["idempotency_key"] == n.key == "a/0/level/3/0/bureau:bureau/webhook"
    assert doc["sequence"] == 4 and doc["alert_id"] == str(uuid.UUID(int=1))
    assert doc["address"] == "幸福路1号3栋201" and doc["residents"] == ["王奶奶", "王爷爷"]
    assert payload(n, facts) == payload(n, facts), "a retry signs the same bytes"


def test_header_values_are_ascii() -> None:
    key = "a/0/level/1/0/family:1:王小明/voice"
    assert header_value(key).isascii()
    ascii_key = "a/0/level/3/0/bureau:bureau/webhook"
    assert header_value(ascii_key) == ascii_key


def test_server_refuses_the_demo_webhook_key_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "production")
    monkeypatch.setenv("ELDERSAFE_MQTT_PASSWORD", "a-real-secret")
    monkeypatch.delenv("ELDERSAFE_BUREAU_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="BUREAU_WEBHOOK_SECRET"):
        Settings().check_notifier_secrets()
    monkeypatch.setenv("ELDERSAFE_BUREAU_WEBHOOK_SECRET", "agreed-with-the-bureau")
    Settings().check_notifier_secrets()
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "demo")
    monkeypatch.setenv("ELDERSAFE_BUREAU_WEBHOOK_SECRET", DEMO_SECRET)
    Settings().check_notifier_secrets()
