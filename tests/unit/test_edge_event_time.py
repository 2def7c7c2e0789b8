"""An alarm is never refused for a device's wrong clock: the edge stamps its own time then."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from gateway.contract.payloads import EventPayload, EventType, Phase
from gateway.edge.sink import event_time

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()


def _payload(device_time: float | None) -> EventPayload:
    when, claim = event_time(device_time, NOW)
    # the contract's own validation, as the server runs it
    return EventPayload.model_validate_json(
        json.dumps(
            {
                "v": 1,
                "event_id": str(uuid.uuid4()),
                "type": EventType.SOS,
                "phase": Phase.PULSE,
                "time": when.isoformat(),
                "profile": "es-wb1",
                "data": claim,
            }
        )
    )


def test_a_plausible_device_clock_is_kept() -> None:
    p = _payload(NOW - 5)
    assert p.time == datetime.fromtimestamp(NOW - 5, UTC)
    assert p.data == {}


def test_a_clock_that_never_synced_or_runs_ahead_gives_the_edges_time() -> None:
    for wrong in (0.0, 946_684_799.0, NOW + 2 * 86400, 4_294_967_295.0):
        p = _payload(wrong)
        assert p.time == datetime.fromtimestamp(NOW, UTC)
        assert p.data == {"device_time": wrong}


def test_a_non_finite_device_time_is_dropped() -> None:
    for wrong in (float("nan"), float("inf")):
        p = _payload(wrong)
        assert p.time == datetime.fromtimestamp(NOW, UTC)
        assert p.data == {}


def test_no_device_time_is_the_edges_time() -> None:
    assert _payload(None).time == datetime.fromtimestamp(NOW, UTC)
