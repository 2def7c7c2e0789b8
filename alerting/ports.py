"""The ports the engine is given: a clock, an alert store, a publisher, notifier channels.

The gateway implements them (PostgreSQL, MQTT, HTTP); ``alerting`` only
depends on these Protocols, so the pure core is tested with an injected clock
and its I/O lives elsewhere. Errors crossing a port say whether trying again
can help (``recoverable``): the retry stage and the intake loop act on that.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from alerting.model import Alert, AuditEntry

if TYPE_CHECKING:
    from alerting.lifecycle import Transition
    from alerting.pipeline import Notice
    from alerting.planner import StepKey

Scalar = str | int | float | bool


class AlertingError(Exception):
    """Base of errors crossing a port; ``recoverable`` says whether a retry may succeed."""

    def __init__(self, message: str, *, recoverable: bool) -> None:
        super().__init__(message)
        self.recoverable = recoverable


class DeliveryError(AlertingError):
    """A notifier could not deliver (timeout, HTTP 5xx: recoverable; bad target: not)."""


class StoreError(AlertingError):
    """The store failed (serialization failure, connection lost: recoverable)."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock tests move by hand, so a whole escalation runs in milliseconds."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware start time")
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, by: timedelta) -> datetime:
        if by < timedelta(0):
            raise ValueError("time does not run backwards")
        self._now += by
        return self._now

    def set(self, at: datetime) -> None:
        if at < self._now:
            raise ValueError("time does not run backwards")
        self._now = at


@dataclass(frozen=True, slots=True)
class Receipt:
    """A channel accepted a notice; ``confirmed`` if it also knows the person got it
    (a console session showed it, the callee pressed the acknowledge key)."""

    confirmed: bool = False
    reference: str | None = None


class NotifierChannel(Protocol):
    async def send(self, notice: Notice) -> Receipt:
        """Deliver one notice; raise ``DeliveryError`` with ``recoverable`` set on failure.

        Must be idempotent by ``notice.key`` (pass it as the provider's
        idempotency key where one exists: webhook header, SMS client reference).
        """
        ...


class Publisher(Protocol):
    async def command(
        self,
        site_id: str,
        device_id: str,
        command_id: uuid.UUID,
        action: str,
        alert_id: uuid.UUID,
        args: Mapping[str, Scalar],
    ) -> None:
        """Publish a downlink command (QoS 1) to ``…/{site}/{device}/command``.

        ``command_id`` is derived from the alert (``downlink.command_for``), so a
        repeated publish is the same command; the edge answers on
        ``…/command/result`` and the gateway records that answer on the alert.
        """
        ...


class AlertTransaction(Protocol):
    """One unit of work in the store; everything here commits together or not at all."""

    async def lock_open(self, dedup_keys: Sequence[str]) -> Mapping[str, Alert]:
        """Unresolved alerts with these keys, locked (``SELECT … FOR UPDATE``)."""
        ...

    async def lock_alert(self, alert_id: uuid.UUID) -> Alert | None:
        """One alert by id, locked; for the console's acknowledge / on scene / resolve."""
        ...

    async def save(self, transitions: Sequence[Transition]) -> None:
        """Upsert each ``after`` state, append its audit entry to the hash chain and give
        the change a position in the ordered change log (the live feed)."""
        ...

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit entries that change no alert (delivery attempts)."""
        ...

    async def fired_steps(self, alert_id: uuid.UUID, epoch: int) -> frozenset[StepKey]:
        ...

    async def record_step(self, key: StepKey, at: datetime) -> bool:
        """Record a fired step; False if it was already recorded (unique key)."""
        ...

    async def set_next_step_at(self, alert_id: uuid.UUID, at: datetime | None) -> None:
        ...

    async def claim_due(self, now: datetime, limit: int) -> Sequence[Alert]:
        """Alerts whose ``next_step_at`` <= now, locked with ``FOR UPDATE SKIP LOCKED``:
        any number of servers share the timers with no leader and no double step."""
        ...


class AlertStore(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[AlertTransaction]:
        """Begin a unit of work (commit on normal exit, roll back on an exception)."""
        ...
