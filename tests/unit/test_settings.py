"""Settings refuse the demo's default secret outside the demo."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config import DEMO_SECRET, Settings


def test_production_refuses_the_demo_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELDERSAFE_MQTT_PASSWORD", raising=False)
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="demo's default"):
        Settings()
    monkeypatch.setenv("ELDERSAFE_MQTT_PASSWORD", "a-real-secret")
    assert Settings().mqtt_password == "a-real-secret"


def test_demo_may_use_the_demo_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELDERSAFE_MQTT_PASSWORD", raising=False)
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "demo")
    assert Settings().mqtt_password == DEMO_SECRET
