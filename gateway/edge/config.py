"""Site configuration of one edge gateway: YAML in, strictly validated models out.

A typo in a site file must stop the edge at start with a clear message, not
leave a button unmapped in a resident's home: unknown keys are refused, ids
follow the MQTT contract, every physical address is checked against its
transport's format, and every device id maps to exactly one (address, profile).
The same device id may appear under several drivers of one kind (a button
heard by two receivers); its events are then deduplicated by the outbox.

What a driver entry may say is the drivers' business: each ``drivers[]`` entry
is validated by the model its ``kind`` registered in ``device_drivers.kinds``
(address forms, default profiles, timings). Modules listed under ``plugins``
are imported first, so a vendor's package can add profiles and kinds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

import device_drivers  # noqa: F401  (registers the shipped profiles and driver kinds)
from device_drivers.kinds import DeviceConfig, DriverConfig, import_plugins, parse_driver
from gateway.contract.topics import ID_PATTERN

Id = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN}$")]
ModuleName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
]
_ID = re.compile(rf"^{ID_PATTERN}$")


class ConfigError(ValueError):
    """The site file cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    password: SecretStr | None = None
    password_env: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = (
        None
    )
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 24 * 3600)] = 3600
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    tls_ca_file: Path | None = None

    @model_validator(mode="after")
    def _one_password_source(self) -> BrokerConfig:
        if (self.password is None) == (self.password_env is None):
            raise ValueError("give exactly one of broker.password or broker.password_env")
        return self

    def resolved_password(self) -> str:
        """The password, read from the environment at start when ``password_env`` is used."""
        if self.password is not None:
            return self.password.get_secret_value()
        assert self.password_env is not None
        value = os.environ.get(self.password_env)
        if not value:
            raise ConfigError(
                f"environment variable {self.password_env} (broker password) is unset"
            )
        return value


def profile_of(driver: DriverConfig, device: DeviceConfig) -> str:
    """The profile a device runs (its own, or its driver kind's default)."""
    return driver.profile_of(device)


class TelemetryConfig(_Strict):
    qos: Literal[0, 1] = 0
    batch_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    max_queued_readings: Annotated[int, Field(ge=100, le=1_000_000)] = 20_000


class SupervisionConfig(_Strict):
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    stable_after_s: Annotated[float, Field(gt=0)] = 60.0


class MetricsConfig(_Strict):
    """Prometheus endpoint of the edge (``/metrics``); off unless configured."""

    port: Annotated[int, Field(ge=1, le=65535)]
    host: str = "127.0.0.1"


class EdgeConfig(_Strict):
    site: Id
    gateway: Id
    broker: BrokerConfig
    state_dir: Path
    plugins: list[ModuleName] = []  # vendor modules registering profiles / driver kinds
    metrics: MetricsConfig | None = None
    telemetry: TelemetryConfig = TelemetryConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    drivers: list[DriverConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        # Before the drivers are validated: a plugin's kinds and profiles must be known.
        plugins = data.get("plugins") if isinstance(data, dict) else None
        if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            import_plugins(plugins)
        return data

    @field_validator("drivers", mode="before")
    @classmethod
    def _by_kind(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [parse_driver(entry) for entry in value]

    @model_validator(mode="after")
    def _consistent(self) -> EdgeConfig:
        names: set[str] = set()
        identity: dict[str, tuple[str, str, str]] = {}
        for drv in self.drivers:
            if not _ID.match(drv.name):
                raise ValueError(f"driver name {drv.name!r} does not match {ID_PATTERN}")
            if drv.name in names:
                raise ValueError(f"driver name {drv.name!r} used twice")
            names.add(drv.name)
            for dev in drv.devices:
                if not _ID.match(dev.id):
                    raise ValueError(f"device id {dev.id!r} does not match {ID_PATTERN}")
                this = (drv.kind, dev.address, drv.profile_of(dev))
                other = identity.setdefault(dev.id, this)
                if other != this:
                    raise ValueError(
                        f"device id {dev.id!r} maps to {other} and to {this}; one id is one device"
                    )
                if dev.id == "gateway":
                    raise ValueError("device id 'gateway' is reserved by the MQTT contract")
        return self

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"eldersafe-edge-{self.site}-{self.gateway}"


def parse_config(data: Any, *, base_dir: Path | None = None) -> EdgeConfig:
    """Validate a mapping; a relative ``state_dir`` is taken from ``base_dir``."""
    try:
        config = EdgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid edge config:\n{exc}") from None
    if base_dir is not None and not config.state_dir.is_absolute():
        config = config.model_copy(update={"state_dir": (base_dir / config.state_dir).resolve()})
    return config


def load_config(path: str | Path) -> EdgeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read edge config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"edge config {path} must be a mapping")
    return parse_config(data, base_dir=path.parent)
