"""Driver kinds: everything the edge needs to know about a family of drivers, in one registry.

A driver package registers one ``DriverConfig`` subclass per kind (``kind:`` in
the site file). The class is the site file's model of one driver entry, and it
answers what the edge would otherwise hard-code: which addresses are valid and
how they are written, which profiles the kind carries and which one is the
default, how to build the running driver, how long it may be down before its
devices count as offline, and which devices go offline with it. Command
capabilities are the profiles' (``Profile.commands``). The edge iterates this
registry and knows no kind by name, so a vendor's package (a plugin module
named in the site file) adds a kind or a profile without touching the gateway.

Profiles say which kind carries them through ``Profile.transport``, matched
against the kind's ``TRANSPORT``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from device_drivers import profiles
from device_drivers.model import Driver

__all__ = [
    "DeviceConfig",
    "DriverConfig",
    "all_kinds",
    "get_kind",
    "import_plugins",
    "parse_driver",
    "register_kind",
]

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class DeviceConfig(BaseModel):
    """One device id ↔ one physical address ↔ one profile (default: the kind's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    address: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    profile: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _address_is_text(cls, data: Any) -> Any:
        # YAML reads an unquoted 00012345 as the octal number 5349; turning that back
        # into text would name an address nobody wrote. Refuse it and say which device.
        if isinstance(data, dict) and "address" in data and not isinstance(data["address"], str):
            value = data["address"]
            what = {bool: "true/false", int: "a number", float: "a number"}.get(
                type(value), type(value).__name__
            )
            raise ValueError(
                f"device {data.get('id')!r}: address {value!r} was read as {what}, not as "
                'text; quote it in the site file (address: "00012345"): YAML reads '
                "unquoted digits as a number, with a leading 0 even as octal"
            )
        return data


class DriverConfig(BaseModel):
    """One ``drivers[]`` entry of the site file; subclassed once per kind.

    Subclasses set ``kind: Literal[...]``, the class variables below, their own
    settings as fields, and override ``build`` (and where needed the other hooks).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[str] = ""
    TRANSPORT: ClassVar[str] = ""  # Profile.transport of the profiles this kind carries
    DEFAULT_PROFILE: ClassVar[str | None] = None

    kind: str
    name: Name
    devices: list[DeviceConfig] = Field(min_length=1)

    # -- hooks ------------------------------------------------------------------------

    @classmethod
    def normalise_address(cls, address: str) -> str:
        """The one spelling of an address the driver reports (case, spacing)."""
        return address

    @classmethod
    def address_error(cls, address: str) -> str | None:
        """Why ``address`` (normalised) is not valid for this kind, or None."""
        return None

    def build(self) -> Driver:
        """The running driver for this entry (imports its transport libraries lazily)."""
        raise NotImplementedError(f"driver kind {self.KIND!r} has no factory")

    def down_offline_after_s(self) -> float | None:
        """How long the driver may be down before its devices count as offline."""
        return None

    def offline_when_down(self, device: DeviceConfig) -> bool:
        """Whether ``device`` goes offline when the driver itself is down too long."""
        return True

    def profile_of(self, device: DeviceConfig) -> str:
        profile = device.profile or self.DEFAULT_PROFILE
        if profile is None:  # refused by validation; kept for the type
            raise ValueError(f"device {device.id!r} has no profile")
        return profile

    def check(self) -> None:
        """Kind-specific checks across devices; raise ValueError."""

    # -- validation -------------------------------------------------------------------

    @field_validator("devices", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [
            {**d, "address": cls.normalise_address(d["address"])}
            if isinstance(d, dict) and isinstance(d.get("address"), str)
            else d
            for d in value
        ]

    @model_validator(mode="after")
    def _validate(self) -> DriverConfig:
        seen_ids: set[str] = set()
        seen_addresses: set[str] = set()
        for device in self.devices:
            if device.id in seen_ids:
                raise ValueError(f"device id {device.id!r} twice on driver {self.name!r}")
            if device.address in seen_addresses:
                raise ValueError(f"address {device.address!r} twice on driver {self.name!r}")
            seen_ids.add(device.id)
            seen_addresses.add(device.address)
            if (error := self.address_error(device.address)) is not None:
                raise ValueError(f"device {device.id!r}: {error}")
            self._check_profile(device)
        self.check()
        return self

    def _check_profile(self, device: DeviceConfig) -> None:
        carried = sorted(
            name for name, p in profiles.all_profiles().items() if p.transport == self.TRANSPORT
        )
        name = device.profile or self.DEFAULT_PROFILE
        if name is None:
            raise ValueError(
                f"device {device.id!r}: a {self.KIND} driver needs a profile, one of {carried}"
            )
        try:
            profile = profiles.get(name)
        except KeyError as exc:
            raise ValueError(f"device {device.id!r}: {exc.args[0]}") from None
        if profile.transport != self.TRANSPORT:
            raise ValueError(
                f"device {device.id!r}: a {self.KIND} driver carries {carried}, not {name!r}"
            )


_KINDS: dict[str, type[DriverConfig]] = {}
_Kind = TypeVar("_Kind", bound=type[DriverConfig])


def register_kind(model: _Kind) -> _Kind:
    """Class decorator: make ``model`` the site file's ``kind: <model.KIND>``."""
    if not model.KIND or not model.TRANSPORT:
        raise ValueError(f"{model.__name__} must set KIND and TRANSPORT")
    known = _KINDS.get(model.KIND)
    if known is not None and known is not model:
        raise ValueError(f"driver kind {model.KIND!r} already registered by {known.__name__}")
    _KINDS[model.KIND] = model
    return model


def get_kind(name: str) -> type[DriverConfig]:
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown driver kind {name!r}; known: {sorted(_KINDS)}") from None


def all_kinds() -> Mapping[str, type[DriverConfig]]:
    return dict(_KINDS)


def parse_driver(data: Any) -> DriverConfig:
    """One ``drivers[]`` entry → the model of its kind (ValueError if none fits)."""
    if isinstance(data, DriverConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"a driver entry must be a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(
            f"driver {data.get('name')!r}: kind {kind!r} is not one of {sorted(_KINDS)} "
            "(a vendor's kind comes from a module listed under plugins:)"
        )
    return _KINDS[kind].model_validate(data)


def import_plugins(modules: Iterable[str]) -> None:
    """Import vendor modules; importing one registers its profiles and kinds."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ValueError(
                f"plugin module {module!r} cannot be imported: {type(exc).__name__}: {exc}"
            ) from None
