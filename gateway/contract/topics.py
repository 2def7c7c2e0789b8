"""Topic value objects: every topic the system publishes or accepts, built and parsed here.

Root ``eldersafe/v1``; ``{site}`` and ``{device}`` are ids of ``[a-z0-9-]{1,64}``.
Parsing is strict so that a topic that slips past a broker ACL (or a wildcard
subscription) still cannot smuggle a bad id into the database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

ROOT = "eldersafe/v1"
ID_PATTERN = r"[a-z0-9-]{1,64}"
_ID = re.compile(rf"^{ID_PATTERN}$")
# ``gateway`` names the gateway-status branch of a site; no device may take it
RESERVED_DEVICE_IDS = frozenset({"gateway"})


class TopicError(ValueError):
    """The topic is not one of the contract's topics."""


class Channel(StrEnum):
    EVENT = "event"
    TELEMETRY = "telemetry"
    STATUS = "status"
    COMMAND = "command"
    COMMAND_RESULT = "command/result"  # the edge's answer to one command id


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def _check(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise TopicError(f"{kind} id {value!r} does not match {ID_PATTERN}")
    return value


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """``eldersafe/v1/{site}/{device}/{channel}``."""

    site: str
    device: str
    channel: Channel

    def __post_init__(self) -> None:
        _check("site", self.site)
        _check("device", self.device)
        if self.device in RESERVED_DEVICE_IDS:
            raise TopicError(f"device id {self.device!r} is reserved")

    def __str__(self) -> str:
        return f"{ROOT}/{self.site}/{self.device}/{self.channel.value}"


@dataclass(frozen=True, slots=True)
class GatewayStatusTopic:
    """``eldersafe/v1/{site}/gateway/{gateway}/status``: birth message and last will."""

    site: str
    gateway: str

    def __post_init__(self) -> None:
        _check("site", self.site)
        _check("gateway", self.gateway)

    def __str__(self) -> str:
        return f"{ROOT}/{self.site}/gateway/{self.gateway}/status"


Topic = DeviceTopic | GatewayStatusTopic


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "eldersafe" or parts[1] != "v1":
        raise TopicError(f"topic {topic!r} is not under {ROOT}/")
    if len(parts) == 5:
        try:
            channel = Channel(parts[4])
        except ValueError:
            raise TopicError(f"topic {topic!r}: unknown channel {parts[4]!r}") from None
        return DeviceTopic(parts[2], parts[3], channel)
    if len(parts) == 6 and parts[3] == "gateway" and parts[5] == "status":
        return GatewayStatusTopic(parts[2], parts[4])
    if len(parts) == 6 and parts[4] == "command" and parts[5] == "result":
        return DeviceTopic(parts[2], parts[3], Channel.COMMAND_RESULT)
    raise TopicError(f"topic {topic!r} has no place in the contract")


def site_filter(site: str, channel: Channel | str = "+") -> str:
    """Subscription filter for one channel of every device of a site."""
    return f"{ROOT}/{_check('site', site)}/+/{channel}"


ALL_TOPICS = f"{ROOT}/#"
