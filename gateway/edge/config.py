"""Site configuration of one edge gateway: YAML in, strictly validated models out.

A typo in a site file must stop the edge at start with a clear message, not
leave a button unmapped in a resident's home: unknown keys are refused, ids
follow the MQTT contract, every physical address is checked against its
transport's format, and every device id maps to exactly one (address, profile).
The same device id may appear under several drivers of one kind (a button
heard by two receivers); its events are then deduplicated by the outbox.
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

from gateway.contract.topics import ID_PATTERN

Id = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN}$")]
ProfileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")]

_BUTTON = re.compile(r"^[0-9a-fA-F]{8}$")
_UNIT = re.compile(r"^unit-([0-9]{1,3})$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")

RECEIVER_ADDRESS = "receiver"  # the es-cb1 receiver itself, as the driver names it


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


class DeviceConfig(_Strict):
    """One contract device id ↔ one physical address ↔ one profile."""

    id: Id
    address: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    profile: ProfileName | None = None  # default: the driver kind's profile
    poll_interval_s: Annotated[float, Field(gt=0, le=3600)] | None = None  # Modbus only


class _DriverBase(_Strict):
    name: Id
    devices: list[DeviceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_within(self) -> _DriverBase:
        seen_ids: set[str] = set()
        seen_addr: set[str] = set()
        for d in self.devices:
            if d.id in seen_ids:
                raise ValueError(f"device id {d.id!r} twice on driver {self.name!r}")
            if d.address in seen_addr:
                raise ValueError(f"address {d.address!r} twice on driver {self.name!r}")
            seen_ids.add(d.id)
            seen_addr.add(d.address)
        return self


class CallButtonDriverConfig(_DriverBase):
    """es-cb1 buttons behind one serial receiver (a device path or pyserial URL)."""

    kind: Literal["callbutton"]
    port: Annotated[str, StringConstraints(min_length=1)]
    baudrate: int = 9600
    receiver_offline_after_s: Annotated[float, Field(gt=0)] = 90.0
    button_supervision_s: Annotated[float, Field(gt=0)] = 3600.0
    dedup_window_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("devices", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [
                {**d, "address": str(d["address"]).lower()}
                if isinstance(d, dict) and "address" in d
                else d
                for d in value
            ]
        return value

    @model_validator(mode="after")
    def _addresses(self) -> CallButtonDriverConfig:
        receivers = [d for d in self.devices if d.address == RECEIVER_ADDRESS]
        if len(receivers) != 1:
            raise ValueError(
                f"callbutton driver {self.name!r} needs exactly one device with address "
                f"{RECEIVER_ADDRESS!r} (the receiver; its offline state is an alarm input)"
            )
        for d in self.devices:
            if d.address != RECEIVER_ADDRESS and not _BUTTON.match(d.address):
                raise ValueError(f"button address {d.address!r} is not 8 hex digits")
            if d.profile not in (None, "es-cb1"):
                raise ValueError(f"device {d.id!r}: a callbutton driver carries es-cb1 only")
            if d.poll_interval_s is not None:
                raise ValueError(f"device {d.id!r}: poll_interval_s is for Modbus units")
        return self


class ModbusDriverConfig(_DriverBase):
    """es-ef1 / es-sd1 units on one RS-485 bus (device path or ``socket://host:port``)."""

    kind: Literal["modbus"]
    port: Annotated[str, StringConstraints(min_length=1)]
    baudrate: int = 9600
    request_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    offline_after_failures: Annotated[int, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _addresses(self) -> ModbusDriverConfig:
        for d in self.devices:
            m = _UNIT.match(d.address)
            if not m or not 1 <= int(m.group(1)) <= 247:
                raise ValueError(f"Modbus address {d.address!r} must be unit-1 … unit-247")
            if d.profile not in ("es-ef1", "es-sd1"):
                raise ValueError(f"device {d.id!r}: Modbus profile must be es-ef1 or es-sd1")
        return self


class WristbandDriverConfig(_DriverBase):
    """es-wb1 wristbands through one BLE adapter (BlueZ, or bumble for tests and demos)."""

    kind: Literal["wristband"]
    backend: Literal["bluez", "bumble"] = "bluez"
    bumble_transport: str | None = None  # e.g. tcp-client:127.0.0.1:9100
    offline_after_s: Annotated[float, Field(gt=0)] = 300.0

    @field_validator("devices", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [
                {**d, "address": str(d["address"]).upper()}
                if isinstance(d, dict) and "address" in d
                else d
                for d in value
            ]
        return value

    @model_validator(mode="after")
    def _addresses(self) -> WristbandDriverConfig:
        if (self.backend == "bumble") != (self.bumble_transport is not None):
            raise ValueError("bumble_transport is required with backend bumble, and only then")
        for d in self.devices:
            if not _MAC.match(d.address):
                raise ValueError(f"BLE address {d.address!r} is not AA:BB:CC:DD:EE:FF")
            if d.profile not in (None, "es-wb1"):
                raise ValueError(f"device {d.id!r}: a wristband driver carries es-wb1 only")
        return self


DriverConfig = Annotated[
    CallButtonDriverConfig | ModbusDriverConfig | WristbandDriverConfig,
    Field(discriminator="kind"),
]

DEFAULT_PROFILE = {"callbutton": "es-cb1", "wristband": "es-wb1"}


def profile_of(driver: DriverConfig, device: DeviceConfig) -> str:
    return device.profile or DEFAULT_PROFILE[driver.kind]


class TelemetryConfig(_Strict):
    qos: Literal[0, 1] = 0
    batch_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    max_queued_readings: Annotated[int, Field(ge=100, le=1_000_000)] = 20_000


class SupervisionConfig(_Strict):
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    stable_after_s: Annotated[float, Field(gt=0)] = 60.0


class EdgeConfig(_Strict):
    site: Id
    gateway: Id
    broker: BrokerConfig
    state_dir: Path
    telemetry: TelemetryConfig = TelemetryConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    drivers: list[DriverConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> EdgeConfig:
        names: set[str] = set()
        identity: dict[str, tuple[str, str, str]] = {}
        for drv in self.drivers:
            if drv.name in names:
                raise ValueError(f"driver name {drv.name!r} used twice")
            names.add(drv.name)
            for dev in drv.devices:
                this = (drv.kind, dev.address, profile_of(drv, dev))
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
