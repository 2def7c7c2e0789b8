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


def test_every_server_process_has_its_own_account(monkeypatch: pytest.MonkeyPatch) -> None:
    """broker-files writes each listed server account; this process's is always among them."""
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "production")
    monkeypatch.setenv("ELDERSAFE_MQTT_USERNAME", "server-1")
    monkeypatch.setenv("ELDERSAFE_MQTT_PASSWORD", "one")
    monkeypatch.setenv("ELDERSAFE_MQTT_SERVER_ACCOUNTS", '{"server-2": "two"}')
    assert Settings().server_accounts() == {"server-1": "one", "server-2": "two"}
    assert "two" not in repr(Settings()), "a listed password leaks into the settings' repr"

    monkeypatch.setenv("ELDERSAFE_MQTT_SERVER_ACCOUNTS", '{"server-1": "other"}')
    with pytest.raises(ValidationError, match="another password"):
        Settings()
    monkeypatch.setenv("ELDERSAFE_MQTT_SERVER_ACCOUNTS", f'{{"server-2": "{DEMO_SECRET}"}}')
    with pytest.raises(ValidationError, match="demo's default"):
        Settings()


def test_production_server_refuses_the_demo_token_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever knows the token key can sign a token for anyone: the demo's, or a short key,
    stops a production server at start; a disabled API needs none."""
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "production")
    monkeypatch.setenv("ELDERSAFE_MQTT_PASSWORD", "a-real-secret")
    monkeypatch.delenv("ELDERSAFE_API_TOKEN_SECRET", raising=False)
    with pytest.raises(ValueError, match="API_TOKEN_SECRET is the demo's default"):
        Settings().check_api_secrets()
    monkeypatch.setenv("ELDERSAFE_API_TOKEN_SECRET", "short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Settings().check_api_secrets()
    monkeypatch.setenv("ELDERSAFE_API_TOKEN_SECRET", "k" * 32)
    Settings().check_api_secrets()
    monkeypatch.delenv("ELDERSAFE_API_TOKEN_SECRET")
    monkeypatch.setenv("ELDERSAFE_API_PORT", "0")
    Settings().check_api_secrets()
    monkeypatch.setenv("ELDERSAFE_ENVIRONMENT", "demo")
    monkeypatch.delenv("ELDERSAFE_API_PORT")
    Settings().check_api_secrets()
