"""One settings object for every process, read from ``ELDERSAFE_*`` environment variables.

Outside the demo it refuses the demo's default secrets, so a production
server cannot start with a password that is printed in this repository.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_SECRET = "eldersafe-demo-only"
# the demo's token key: long enough for HS256 (RFC 7518 §3.2), refused in production
DEMO_TOKEN_SECRET = DEMO_SECRET + "-signing-key-of-32-bytes"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ELDERSAFE_", extra="ignore")

    environment: Literal["demo", "test", "production"] = "production"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/eldersafe"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    # This process's broker account. The broker uses the user name as the client
    # id (use_username_as_clientid), so it also names the server's session: each
    # server process needs an account of its own.
    mqtt_username: str = "server"
    mqtt_password: str = DEMO_SECRET
    # Every server process's account (JSON object user -> password), for
    # `eldersafe broker-files`; this process's own account is always included.
    mqtt_server_accounts: dict[str, SecretStr] = {}
    # with several servers: "$share/<group>/" in front of the filter spreads the load
    mqtt_shared_group: str | None = None
    mqtt_keepalive_s: int = 30
    mqtt_session_expiry_s: int = 7 * 24 * 3600
    # how often the server records in the database that its session is alive
    mqtt_session_heartbeat_s: float = 60.0
    telemetry_retention_days: int = 90
    retention_check_interval_s: float = 3600.0
    metrics_port: int | None = None
    # 0.0.0.0 in a container, so that Prometheus in another container can scrape it
    metrics_host: str = "127.0.0.1"
    # the district's alert series (gateway/metrics_district.py) are read from the
    # database at most this often, however many scrapers ask
    metrics_district_cache_s: Annotated[float, Field(ge=0)] = 5.0
    # Alert engine: "database" reads time from table engine_clock (tests drive it;
    # refused in production); the poll is the fallback to LISTEN/NOTIFY wake-ups.
    engine_clock: Literal["system", "database"] = "system"
    engine_poll_s: float = 1.0
    # a server stalled inside an engine transaction loses it after this long
    engine_stalled_s: float = 10.0
    # Notifiers (gateway/notify). The bureau's webhook URL is per bureau
    # (organisations.webhook_url, from the district file); its HMAC key is here.
    bureau_webhook_secret: SecretStr = SecretStr(DEMO_SECRET)
    # The voice call / SMS provider adapter (gateway/notify/voice.py); unset: calls fail
    # over to the person's next channel.
    voice_provider_url: str | None = None
    voice_provider_token: SecretStr | None = None
    notify_send_timeout_s: float = 10.0
    # Retry delays in seconds (the last repeats up to the attempt limit): every channel
    # within its fallback window, the bureau webhook for a day.
    notify_retry_s: tuple[float, ...] = (2, 5, 10, 30, 120)
    notify_webhook_retry_s: tuple[float, ...] = (1, 2, 5, 10, 30, 60)
    notify_webhook_max_attempts: int = 24 * 60
    notify_passes: int = 2
    # The staff API and console (gateway/api), served in the server's own event loop.
    # Port 0: no API. Tokens are HS256 JWTs signed with api_token_secret,
    # short-lived (the console renews its token while it is open).
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    api_token_secret: SecretStr = SecretStr(DEMO_TOKEN_SECRET)
    api_token_ttl_s: Annotated[int, Field(ge=30, le=24 * 3600)] = 900
    # PIPL: raw health telemetry (heart rate, SpO2) and locations are kept this long.
    sensitive_retention_days: Annotated[int, Field(ge=1)] = 30

    @model_validator(mode="after")
    def _no_default_secrets(self) -> Settings:
        listed = self.mqtt_server_accounts.get(self.mqtt_username)
        if listed is not None and listed.get_secret_value() != self.mqtt_password:
            raise ValueError(
                f"ELDERSAFE_MQTT_SERVER_ACCOUNTS gives {self.mqtt_username!r} another password "
                "than ELDERSAFE_MQTT_PASSWORD"
            )
        if self.environment == "production" and self.engine_clock != "system":
            raise ValueError("ELDERSAFE_ENGINE_CLOCK=database is for tests only")
        if self.environment == "production" and DEMO_SECRET in self.server_accounts().values():
            raise ValueError(
                "ELDERSAFE_MQTT_PASSWORD (or a password in ELDERSAFE_MQTT_SERVER_ACCOUNTS) is "
                "the demo's default; set a real secret (or ELDERSAFE_ENVIRONMENT=demo for the demo)"
            )
        return self

    def check_notifier_secrets(self) -> None:
        """Refuse the demo's webhook key outside demo and test; ``server`` calls it at start
        (other commands, the edge's included, never sign webhooks)."""
        if (
            self.environment == "production"
            and self.bureau_webhook_secret.get_secret_value() == DEMO_SECRET
        ):
            raise ValueError(
                "ELDERSAFE_BUREAU_WEBHOOK_SECRET is the demo's default; set the key agreed with "
                "the district's safety network (or ELDERSAFE_ENVIRONMENT=demo for the demo)"
            )

    def check_api_secrets(self) -> None:
        """Refuse the demo's token key (or a short one) outside demo and test: anyone who
        knows the key can sign a token for any person. ``server`` calls it at start."""
        if self.environment != "production" or not self.api_port:
            return
        key = self.api_token_secret.get_secret_value()
        if key in (DEMO_SECRET, DEMO_TOKEN_SECRET):
            raise ValueError(
                "ELDERSAFE_API_TOKEN_SECRET is the demo's default; set a random key of at least"
                " 32 bytes (or ELDERSAFE_ENVIRONMENT=demo for the demo)"
            )
        if len(key.encode()) < 32:
            raise ValueError("ELDERSAFE_API_TOKEN_SECRET must be at least 32 bytes long")

    def server_accounts(self) -> dict[str, str]:
        """User name → password of every server process (this one's included)."""
        accounts = {n: s.get_secret_value() for n, s in self.mqtt_server_accounts.items()}
        accounts[self.mqtt_username] = self.mqtt_password
        return accounts
