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


def test_the_alert_engine_reads_the_contracts_event_types_and_phases() -> None:
    # alerting/ imports no gateway module, so it mirrors these; a drift would make
    # the engine dead-letter (or misread) events ingest accepted
    from alerting.rules import EventKind
    from alerting.rules import Phase as EnginePhase
    from gateway.contract.payloads import Phase

    assert {k.value for k in EventKind} == {t.value for t in EventType}
    assert {p.value for p in EnginePhase} == {p.value for p in Phase}


def test_the_engines_downlinks_are_contract_actions() -> None:
    from alerting.downlink import ALARM_RECEIVED, HELP_COMING

    assert {ALARM_RECEIVED, HELP_COMING} <= {a.value for a in ContractAction}
