"""The live console: a notice is delivered by being in the ordered change log.

The engine gave the step that made the notice its row in ``alert_changes`` in
the same transaction, so the console's feed (issue 8: WebSocket, resumable by
position) carries it; the reference is the alert's newest position. Nobody has
seen it yet (no ``confirmed``): the WebSocket will confirm display, and until
then the console's window runs out and the person's next channel is tried.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from alerting.pipeline import Notice
from alerting.ports import DeliveryError, Receipt


class ConsoleChannel:
    def __init__(self, positions: Mapping[uuid.UUID, int]) -> None:
        self.positions = positions  # alert id → newest change-log position

    async def send(self, notice: Notice) -> Receipt:
        position = self.positions.get(notice.alert_id)
        if position is None:
            raise DeliveryError("the alert has no change-log row yet", recoverable=True)
        return Receipt(confirmed=False, reference=f"change:{position}")
