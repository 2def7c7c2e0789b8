"""What the elder is told when their alert moves: downlink commands as data.

When the alert opens, the button's LED blinks ("alarm received"); when staff
acknowledge, the wristband vibrates and the LED lights steady ("help is
coming"). The command id is derived from the alert, its epoch and the action,
so a retried publish is one command to the edge (which answers the same id).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from alerting.lifecycle import Transition
from alerting.model import AlertType, AuditAction

# Values are the MQTT contract's command actions.
ALARM_RECEIVED = "alarm_received"
HELP_COMING = "acknowledge"

# Which audit action tells the resident what, for alerts a resident raised.
DOWNLINKS: Mapping[AuditAction, str] = {
    AuditAction.OPENED: ALARM_RECEIVED,
    AuditAction.ACKNOWLEDGED: HELP_COMING,
}
RESIDENT_ALERTS: frozenset[AlertType] = frozenset({AlertType.SOS, AlertType.FALL})

COMMAND_NAMESPACE = uuid.UUID("6b1f2f4e-6c1e-4a55-9d0a-0d5e1a7e0002")


@dataclass(frozen=True, slots=True)
class Downlink:
    site_id: str
    device_id: str
    command_id: uuid.UUID
    action: str
    alert_id: uuid.UUID


def command_for(change: Transition) -> Downlink | None:
    """The command a change sends to the resident's device, if any."""
    alert = change.after
    action = DOWNLINKS.get(change.audit.action)
    if action is None or alert.type not in RESIDENT_ALERTS or alert.device_id is None:
        return None
    command_id = uuid.uuid5(COMMAND_NAMESPACE, f"{alert.id}/{alert.epoch}/{action}")
    return Downlink(alert.site_id, alert.device_id, command_id, action, alert.id)
