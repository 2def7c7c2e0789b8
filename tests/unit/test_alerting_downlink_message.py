"""An outbox row as the edge receives it: the contract's CommandPayload on the device's command
topic, the same bytes every time it is sent; a row that cannot be a command is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.alerts.downlink import command_message
from gateway.contract.payloads import CommandPayload
from gateway.contract.topics import TopicError


def row(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "command_id": uuid.UUID("00000000-0000-4000-8000-000000000001"),
        "alert_id": uuid.UUID("00000000-0000-4000-8000-000000000002"),
        "site_id": "site-a",
        "device_id": "wb-1",
        "action": "acknowledge",
        "args": {},
        "created_at": datetime(2026, 11, 23, 3, 1, 30, tzinfo=UTC),
    }
    return base | changes


def test_a_row_is_the_contracts_command_on_its_devices_topic_and_the_same_bytes_again() -> None:
    topic, payload = command_message(row())
    assert topic == "eldersafe/v1/site-a/wb-1/command"
    command = CommandPayload.model_validate_json(payload)
    assert (command.command_id, command.alert_id) == (row()["command_id"], row()["alert_id"])
    assert command.action.value == "acknowledge"
    assert command.time == row()["created_at"]  # when the engine decided, not when sent
    assert command_message(row()) == (topic, payload)  # a re-send is byte for byte the same


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"action": "self_destruct"}, ValueError),
        ({"device_id": "gateway"}, TopicError),
        ({"site_id": "Site A"}, TopicError),
        ({"args": {"n": 2**70}}, ValidationError),
    ],
)
def test_a_row_that_cannot_be_a_command_is_refused(
    changes: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        command_message(row(**changes))
