"""The drivers' model and the MQTT contract each define the event types and command
actions (the drivers must not import the contract); this pins them together."""

from __future__ import annotations

from device_drivers.model import CommandAction as DriverAction
from device_drivers.model import ConditionKind, OccurrenceKind
from device_drivers.profiles import all_profiles
from gateway.contract.payloads import CommandAction as ContractAction
from gateway.contract.payloads import EventType


def test_event_types_are_the_drivers_occurrences_and_conditions() -> None:
    pulses = {k.value for k in OccurrenceKind}
    levels = {k.value for k in ConditionKind}
    assert not pulses & levels  # one type is either a pulse or a level, never both
    assert pulses | levels == {t.value for t in EventType}


def test_command_actions_are_the_same_on_both_sides() -> None:
    assert {a.value for a in DriverAction} == {a.value for a in ContractAction}


def test_every_profile_command_is_a_contract_action() -> None:
    actions = {a.value for a in ContractAction}
    for profile in all_profiles().values():
        assert profile.commands <= actions, profile.name
