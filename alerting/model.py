"""The alert model: what an alert is, the vocabulary of its life, and its audit entries.

Values of every enum are the strings stored in PostgreSQL (schema v1 ``alerts``
CHECK constraints, ``alert_audit.action``), so the store maps them 1:1.
Everything is a frozen dataclass: a change is a new value plus an audit entry,
never an in-place edit (see ``lifecycle.transition``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

# A value an audit detail may hold; nested values are not needed and keep the
# canonical encoding of an audit row simple (see audit.canonical_row).
DetailValue = str | int | float | bool | None


class AlertType(StrEnum):
    """GB 38600's care risks and the device families (ARCHITECTURE §4)."""

    SOS = "sos"
    FALL = "fall"
    SMOKE = "smoke"
    ELECTRICAL = "electrical"
    VITAL_SIGNS = "vital_signs"
    INACTIVITY = "inactivity"
    WANDERING = "wandering"
    DEVICE_OFFLINE = "device_offline"
    LOW_BATTERY = "low_battery"
    TAMPER = "tamper"
    DEVICE_FAULT = "device_fault"


class Severity(StrEnum):
    CRITICAL = "critical"  # life safety: sos, fall, smoke
    MAJOR = "major"  # electrical, vital signs, inactivity, wandering
    MINOR = "minor"  # maintenance


SEVERITY_RANK: Mapping[Severity, int] = {Severity.MINOR: 0, Severity.MAJOR: 1, Severity.CRITICAL: 2}

# Alert types that are never summarised, grouped beyond their own dedup key,
# delayed or muted: a first one always goes out at once (ARCHITECTURE §4).
NEVER_HELD_BACK: frozenset[AlertType] = frozenset({AlertType.SOS, AlertType.FALL, AlertType.SMOKE})


class AlertStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    ON_SCENE = "on_scene"
    RESOLVED = "resolved"


# How far along an alert is; a notice that becomes moot at status S is dropped
# once the alert's rank reaches S's rank (pipeline.Dedup).
STATUS_RANK: Mapping[AlertStatus, int] = {
    AlertStatus.OPEN: 0,
    AlertStatus.ACKNOWLEDGED: 1,
    AlertStatus.ON_SCENE: 2,
    AlertStatus.RESOLVED: 3,
}


class Outcome(StrEnum):
    """Why an alert was resolved; required to resolve (ARCHITECTURE §4)."""

    HANDLED = "handled"
    FALSE_ALARM = "false_alarm"
    SENT_TO_HOSPITAL = "sent_to_hospital"
    CANCELLED_BY_RESIDENT = "cancelled_by_resident"
    TRANSFERRED = "transferred"  # handed to another unit or service (119/120)
    CLEARED = "cleared"  # a sensor condition ended by itself (below its hysteresis band)
    DECEASED = "deceased"


class Channel(StrEnum):
    """How an action reached the engine or a notice reached a person."""

    CONSOLE = "console"
    MESSAGING = "messaging"  # Apprise: DingTalk, WeCom, Feishu, e-mail, SMS gateways
    VOICE = "voice"
    SMS = "sms"
    WEBHOOK = "webhook"  # the district bureau's safety network
    DEVICE = "device"  # the resident's own button or wristband
    SYSTEM = "system"  # the engine itself (rules, timers)


SYSTEM_ACTOR = "system"


def device_actor(site_id: str, device_id: str) -> str:
    """The actor of something a device reported (a resident's cancel, a sensor)."""
    return f"device:{site_id}/{device_id}"


def staff_actor(staff_id: str) -> str:
    return f"staff:{staff_id}"


class AuditAction(StrEnum):
    """The ``alert_audit.action`` values: every transition and delivery attempt."""

    OPENED = "opened"
    REPEATED = "repeated"  # the same condition again: count and last seen
    SOURCE_ADDED = "source_added"  # another detector / device joined the incident
    SOURCE_CLEARED = "source_cleared"  # one contributor's condition ended
    SEVERITY_RAISED = "severity_raised"  # early warning became an alarm
    ACKNOWLEDGED = "acknowledged"
    ON_SCENE = "on_scene"
    RESOLVED = "resolved"
    REOPENED = "reopened"
    ESCALATED = "escalated"  # a ladder level or the service-circle step fired
    REMINDED = "reminded"
    NOTIFIED = "notified"  # one delivery attempt succeeded
    DELIVERY_FAILED = "delivery_failed"  # one delivery attempt failed
    NOTED = "noted"  # recorded without a change (a cancel while staff are on scene)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit record before it is chained (audit.chain_entry adds seq and hashes)."""

    time: datetime
    alert_id: uuid.UUID
    actor: str
    action: AuditAction
    channel: Channel | None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Alert:
    """The state of one alert, as the ``alerts`` row will hold it.

    ``sources`` are the contributors whose condition is active now (detector
    ids of a fire incident, devices of a site that are offline, a device's own
    alarm and its server-side threshold); a self-clearing alert resolves when
    the last one clears. ``epoch`` counts restarts of the escalation (reopen,
    severity raised) so that step ids of a restarted ladder are new ones.
    ``escalation_anchor`` is when the current epoch's ladder started.
    """

    id: uuid.UUID
    site_id: str
    device_id: str | None
    type: AlertType
    severity: Severity
    status: AlertStatus
    dedup_key: str
    opened_at: datetime
    last_seen_at: datetime
    escalation_anchor: datetime
    count: int = 1
    level: int = 0
    epoch: int = 0
    sources: frozenset[str] = frozenset()
    first_event_id: uuid.UUID | None = None
    last_event_id: uuid.UUID | None = None
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    on_scene_at: datetime | None = None
    on_scene_by: str | None = None
    condition_cleared_at: datetime | None = None  # latched alerts: the sensor is quiet again
    outcome: Outcome | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None

    @property
    def unresolved(self) -> bool:
        return self.status is not AlertStatus.RESOLVED


def require_aware(at: datetime, what: str = "time") -> datetime:
    """Refuse naive datetimes: a wall-clock time without zone is a latent escalation bug."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {at!r}")
    return at
