"""What a channel needs beyond the ``Notice``, read with the claimed rows."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from alerting.pipeline import Notice
from gateway.notify.text import Place


@dataclass(frozen=True, slots=True)
class RowFacts:
    key: str  # the notifications row's key (the notice's first channel)
    lane_seq: int | None  # webhook: position among the alert's messages to that endpoint
    ack_code: str


@dataclass(frozen=True, slots=True)
class BatchFacts:
    now: datetime
    rows: Mapping[tuple[str, str], RowFacts] = field(default_factory=dict)  # (step, person)
    places: Mapping[str, Place] = field(default_factory=dict)  # by site id
    positions: Mapping[uuid.UUID, int] = field(default_factory=dict)  # newest change position

    def of(self, notice: Notice) -> RowFacts:
        found = self.rows.get((notice.step_id, notice.person_id))
        return found or RowFacts(notice.key, None, "")
