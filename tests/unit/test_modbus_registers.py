"""es-ef1 / es-sd1 register maps: golden blocks from DEVICES.md section 3, then fuzz."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.modbus.registers import (
    ES_EF1,
    ES_SD1,
    REGISTER_MAPS,
    ElectricalFireState,
    RegisterMap,
    Role,
    SmokeDetectorState,
    conditions_from,
    decode_block,
    decode_values,
    readings_from,
)
from device_drivers.model import Condition, ConditionKind, DecodeError, Reading
from device_drivers.profiles import get

# status b0 (residual-current alarm) + b4 (sensor open circuit); 450 mA; channels
# 23.4 °C, -5.0 °C, not fitted, 71.2 °C; 230.1 V; 12.34 A; 2840 W; 1234.56 kWh;
# thresholds 300 mA and 70.0 °C.
EF1_BLOCK = [0b010001, 450, 234, 0xFFCE, 0x8000, 712, 2301, 1234, 2840, 0x0001, 0xE240, 300, 700]
EF1_STATE = ElectricalFireState(
    status=0b010001,
    residual_current_alarm=True,
    temperature_alarm=False,
    over_current_alarm=False,
    detector_fault=False,
    sensor_open_circuit=True,
    self_test_running=False,
    residual_current_ma=450,
    cable_temp_c_1=23.4,
    cable_temp_c_2=-5.0,
    cable_temp_c_3=None,
    cable_temp_c_4=71.2,
    voltage_v=230.1,
    current_a=12.34,
    power_w=2840,
    energy_kwh=1234.56,
    residual_current_threshold_ma=300,
    temperature_threshold_c=70.0,
    residual_current_early_warning=True,
)
# smoke alarm + silenced; 0.25 dB/m; -1.5 °C; 87 %; firmware 0x0103
SD1_BLOCK = [0b100001, 25, 0xFFF1, 87, 0x0103]
SD1_STATE = SmokeDetectorState(
    status=0b100001,
    smoke_alarm=True,
    fault=False,
    battery_low=False,
    tamper=False,
    test_pressed=False,
    silenced=True,
    smoke_obscuration_db_m=0.25,
    temperature_c=-1.5,
    battery_pct=87,
    firmware=0x0103,
)


def test_ef1_golden_block() -> None:
    assert decode_block(ES_EF1, EF1_BLOCK) == EF1_STATE


def test_sd1_golden_block() -> None:
    assert decode_block(ES_SD1, SD1_BLOCK) == SD1_STATE


def test_ef1_defaults_all_quiet() -> None:
    block = [0, 120, 250, 0x8000, 0x8000, 0x8000, 2200, 0, 0, 0, 0, 300, 700]
    state = decode_block(ES_EF1, block)
    assert isinstance(state, ElectricalFireState)
    assert state.residual_current_early_warning is False
    assert (state.cable_temp_c_2, state.cable_temp_c_3, state.cable_temp_c_4) == (None,) * 3


@pytest.mark.parametrize(("ma", "early"), [(239, False), (240, True), (299, True)])
def test_early_warning_at_80_percent_of_the_device_threshold(ma: int, early: bool) -> None:
    block = list(EF1_BLOCK)
    block[0], block[1] = 0, ma
    assert decode_values(ES_EF1, block)["residual_current_early_warning"] is early


def test_early_warning_off_when_threshold_zero() -> None:
    block = list(EF1_BLOCK)
    block[11] = 0
    assert decode_values(ES_EF1, block)["residual_current_early_warning"] is False


def test_readings_every_measured_value_and_no_unfitted_channel() -> None:
    values = decode_values(ES_EF1, EF1_BLOCK)
    a = "unit-3"
    assert readings_from(ES_EF1, a, values) == [
        Reading(a, "residual_current_ma", 450.0, "mA"),
        Reading(a, "cable_temp_c_1", 23.4, "°C"),
        Reading(a, "cable_temp_c_2", -5.0, "°C"),
        Reading(a, "cable_temp_c_4", 71.2, "°C"),
        Reading(a, "voltage_v", 230.1, "V"),
        Reading(a, "current_a", 12.34, "A"),
        Reading(a, "power_w", 2840.0, "W"),
        Reading(a, "energy_kwh", 1234.56, "kWh"),
    ]
    sd = decode_values(ES_SD1, SD1_BLOCK)
    assert readings_from(ES_SD1, "unit-4", sd) == [
        Reading("unit-4", "smoke_obscuration_db_m", 0.25, "dB/m"),
        Reading("unit-4", "temperature_c", -1.5, "°C"),
        Reading("unit-4", "battery_pct", 87.0, "%"),
    ]


def test_ef1_conditions_every_poll_with_early_warning_data() -> None:
    a = "unit-3"
    assert conditions_from(ES_EF1, a, decode_values(ES_EF1, EF1_BLOCK)) == [
        Condition(
            a,
            ConditionKind.RESIDUAL_CURRENT,
            True,
            {
                "residual_current_alarm": True,
                "residual_current_ma": 450,
                "residual_current_threshold_ma": 300,
                "residual_current_early_warning": True,
            },
        ),
        Condition(
            a,
            ConditionKind.CABLE_TEMPERATURE,
            False,
            {
                "temperature_alarm": False,
                "cable_temp_c_1": 23.4,
                "cable_temp_c_2": -5.0,
                "cable_temp_c_4": 71.2,
                "temperature_threshold_c": 70.0,
            },
        ),
        Condition(
            a, ConditionKind.OVER_CURRENT, False, {"over_current_alarm": False, "current_a": 12.34}
        ),
        Condition(
            a,
            ConditionKind.DEVICE_FAULT,
            True,
            {"detector_fault": False, "sensor_open_circuit": True},
        ),
    ]


def test_sd1_conditions() -> None:
    a = "unit-4"
    assert conditions_from(ES_SD1, a, decode_values(ES_SD1, SD1_BLOCK)) == [
        Condition(
            a,
            ConditionKind.SMOKE,
            True,
            {
                "smoke_alarm": True,
                "smoke_obscuration_db_m": 0.25,
                "temperature_c": -1.5,
                "silenced": True,
            },
        ),
        Condition(a, ConditionKind.DEVICE_FAULT, False, {"fault": False}),
        Condition(a, ConditionKind.LOW_BATTERY, False, {"battery_low": False, "battery_pct": 87}),
        Condition(a, ConditionKind.TAMPER, False, {"tamper": False}),
    ]


@pytest.mark.parametrize(
    ("regmap", "block", "why"),
    [
        (ES_EF1, EF1_BLOCK[:-1], "expected 13"),
        (ES_SD1, [*SD1_BLOCK, 0], "expected 5"),
        (ES_SD1, [0, 0, 0x10000, 0, 0], "uint16"),
        (ES_SD1, [0, -1, 0, 0, 0], "uint16"),
    ],
)
def test_bad_blocks_raise_decode_error(regmap: RegisterMap, block: list[int], why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode_block(regmap, block)


@pytest.mark.parametrize("regmap", list(REGISTER_MAPS.values()))
def test_map_is_consistent_with_its_state_dataclass(regmap: RegisterMap) -> None:
    """The table drives the decoder: names must line up, registers must tile the block."""
    state_fields = {
        f.name for f in dataclasses.fields(type(decode_block(regmap, [0] * regmap.poll_count)))
    }
    names = [f.name for f in regmap.fields] + [b.name for b in regmap.status_bits]
    assert set(names) <= state_fields
    assert len(names) == len(set(names))
    covered = [r for f in regmap.fields for r in range(f.register, f.register + f.words)]
    assert sorted(covered) == list(range(regmap.poll_start, regmap.poll_start + regmap.poll_count))
    assert (
        next(f for f in regmap.fields if f.role is Role.STATUS).register == regmap.status_register
    )


def test_profiles_registered_as_data() -> None:
    ef1, sd1 = get("es-ef1"), get("es-sd1")
    assert (ef1.transport, ef1.poll_interval_s) == ("modbus", 2.0)
    assert (sd1.transport, sd1.poll_interval_s) == ("modbus", 1.0)
    assert ef1.params["register_map"] is ES_EF1
    assert ef1.decoder is not None and ef1.decoder(EF1_BLOCK) == EF1_STATE
    assert ES_EF1.writable().keys() == {"residual_current_threshold", "temperature_threshold"}


@given(st.sampled_from([ES_EF1, ES_SD1]), st.lists(st.integers(-(2**17), 2**17), max_size=20))
def test_random_blocks_decode_or_raise_decode_error(regmap: RegisterMap, block: list[int]) -> None:
    try:
        state = decode_block(regmap, block)
    except DecodeError:
        return
    values = decode_values(regmap, block)
    readings_from(regmap, "unit-1", values)
    conditions_from(regmap, "unit-1", values)
    assert state.status == block[0]


@given(st.lists(st.integers(0, 0xFFFF), min_size=13, max_size=13))
def test_any_ef1_block_of_uint16_decodes(block: list[int]) -> None:
    state = decode_block(ES_EF1, block)
    assert isinstance(state, ElectricalFireState)
    for t in (
        state.cable_temp_c_1,
        state.cable_temp_c_2,
        state.cable_temp_c_3,
        state.cable_temp_c_4,
    ):
        assert t is None or -3276.8 <= t <= 3276.7
