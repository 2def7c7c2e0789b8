"""Golden bytes for the `es-wb1` codecs (DEVICES.md 1) and fuzzing: bad bytes only ever
raise DecodeError."""

from __future__ import annotations

import contextlib

import pytest
from bumble.core import AdvertisingData
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.model import (
    Condition,
    ConditionKind,
    DecodeError,
    LinkStatus,
    Occurrence,
    OccurrenceKind,
)
from device_drivers.wristband.advert import (
    WristbandAdvert,
    decode_advert,
    decode_manufacturer_payload,
    is_wristband_name,
)
from device_drivers.wristband.gatt import (
    AlarmEvent,
    AlarmType,
    HeartRateMeasurement,
    decode_alarm_event,
    decode_battery_level,
    decode_heart_rate,
    encode_acknowledge,
    encode_locate,
    encode_set_clock,
)
from device_drivers.wristband.state import WristbandStats, WristbandTracker

# A complete advertising payload as the simulated wristband puts it on the air:
# flags AD, complete local name "ES-WB1-0001", manufacturer data (company FFFF LE).
CAPTURED_ADV = bytes.fromhex(
    "0201060c09" + b"ES-WB1-0001".hex() + "0dffffff01 05 07 48 61 55 3930 0c".replace(" ", "")
)


def test_captured_advert_decodes_completely() -> None:
    ad = AdvertisingData.from_bytes(CAPTURED_ADV)
    company, payload = ad.get(AdvertisingData.MANUFACTURER_SPECIFIC_DATA)  # type: ignore[misc]
    assert ad.get(AdvertisingData.COMPLETE_LOCAL_NAME) == "ES-WB1-0001"
    assert decode_advert({company: payload}) == WristbandAdvert(
        version=1,
        sos=True,
        fall=False,
        worn=True,
        charging=False,
        battery_low=False,
        outside_geofence=False,
        event_seq=7,
        heart_rate=72,
        spo2=97,
        battery=85,
        steps=12345,
        activity=12,
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            "01 1a ff 00 00 0f ffff 00",  # fall + charging + battery low, no readings
            WristbandAdvert(
                1, False, True, False, True, True, False, 255, None, None, 15, 65535, 0
            ),
        ),
        (
            # reserved bits 6-7 ignored; spo2 101 and battery 200 are "no reading"
            "01 e4 00 b4 65 c8 0100 ff",
            WristbandAdvert(1, False, False, True, False, False, True, 0, 180, None, None, 1, 255),
        ),
        (
            "01 03 2a 3c 5f 64 0001 80",  # SOS and fall both set
            WristbandAdvert(1, True, True, False, False, False, False, 42, 60, 95, 100, 256, 128),
        ),
    ],
)
def test_advert_golden(payload: str, expected: WristbandAdvert) -> None:
    assert decode_manufacturer_payload(bytes.fromhex(payload)) == expected
    assert decode_advert({0x004C: b"other", 0xFFFF: bytes.fromhex(payload)}) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "01",
        "01 05 07 48 61 55 3930",
        "01 05 07 48 61 55 3930 0c 00",
        "02 05 07 48 61 55 3930 0c",
    ],
)
def test_advert_rejects(payload: str) -> None:
    with pytest.raises(DecodeError):
        decode_manufacturer_payload(bytes.fromhex(payload))


def test_advert_without_company_ffff() -> None:
    with pytest.raises(DecodeError):
        decode_advert({0x0059: bytes.fromhex("01050748615539300c")})


def test_wristband_name() -> None:
    assert is_wristband_name("ES-WB1-00aF")
    assert not is_wristband_name("ES-WB1-00")
    assert not is_wristband_name("ES-WB2-0001")
    assert not is_wristband_name(None)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("02 07 80f05f65 5a 00", AlarmEvent(AlarmType.FALL, 7, 1700786304, 90, 0)),
        ("01 ff 00000000 64 00", AlarmEvent(AlarmType.SOS, 255, 0, 100, 0)),
        ("03 08 ffffffff 64 00", AlarmEvent(AlarmType.CANCEL, 8, 0xFFFFFFFF, 100, 0)),
        ("04 08 81f05f65 64 00", AlarmEvent(AlarmType.REMOVED, 8, 1700786305, 100, 0)),
        ("05 08 82f05f65 64 01", AlarmEvent(AlarmType.GEOFENCE_EXIT, 8, 1700786306, 100, 1)),
    ],
)
def test_alarm_event_golden(payload: str, expected: AlarmEvent) -> None:
    assert decode_alarm_event(bytes.fromhex(payload)) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "01 07 80f05f65 5a",
        "01 07 80f05f65 5a 00 00",
        "00 07 80f05f65 5a 00",
        "06 07 80f05f65 5a 00",
    ],
)
def test_alarm_event_rejects(payload: str) -> None:
    with pytest.raises(DecodeError):
        decode_alarm_event(bytes.fromhex(payload))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("00 48", HeartRateMeasurement(72, None, None, ())),
        ("01 2c01", HeartRateMeasurement(300, None, None, ())),
        ("06 48", HeartRateMeasurement(72, True, None, ())),
        ("04 48", HeartRateMeasurement(72, False, None, ())),
        ("08 48 1027", HeartRateMeasurement(72, None, 10000, ())),
        ("1f 4800 1027 0004 2003", HeartRateMeasurement(72, True, 10000, (1024, 800))),
    ],
)
def test_heart_rate_golden(payload: str, expected: HeartRateMeasurement) -> None:
    assert decode_heart_rate(bytes.fromhex(payload)) == expected


@pytest.mark.parametrize("payload", ["", "00", "01 48", "08 48 10", "10 48 00", "00 48 00"])
def test_heart_rate_rejects(payload: str) -> None:
    with pytest.raises(DecodeError):
        decode_heart_rate(bytes.fromhex(payload))


def test_battery_level() -> None:
    assert decode_battery_level(b"\x55") == 85
    assert decode_battery_level(b"\x00") == 0
    assert decode_battery_level(b"\x64") == 100
    for bad in (b"", b"\x65", b"\x01\x02"):
        with pytest.raises(DecodeError):
            decode_battery_level(bad)


def test_command_encoders() -> None:
    assert encode_acknowledge() == b"\x01"
    assert encode_locate() == b"\x02"
    assert encode_set_clock(1700786304) == bytes.fromhex("0380f05f65")
    assert encode_set_clock(0) == bytes.fromhex("0300000000")
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            encode_set_clock(bad)


@given(st.binary(max_size=40))
def test_fuzz_decoders_raise_only_decode_error(data: bytes) -> None:
    for decoder in (decode_manufacturer_payload, decode_alarm_event, decode_heart_rate):
        with contextlib.suppress(DecodeError):
            decoder(data)
    try:
        level = decode_battery_level(data)
    except DecodeError:
        pass
    else:
        assert 0 <= level <= 100


@given(st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=20), max_size=4))
def test_fuzz_advert_mapping(mapping: dict[int, bytes]) -> None:
    try:
        advert = decode_advert(mapping)
    except DecodeError:
        return
    assert advert.version == 1
    assert advert.battery is None or 0 <= advert.battery <= 100


# -- the alarm state machine, on the clock it is given -------------------------------------

BAND = "C0:4E:57:00:00:01"
SOS_ADVERT = {0xFFFF: bytes.fromhex("01 05 07 48 61 55 3930 0c".replace(" ", ""))}
QUIET_ADVERT = {0xFFFF: bytes.fromhex("01 04 07 48 61 55 3930 0c".replace(" ", ""))}


def _tracker() -> WristbandTracker:
    return WristbandTracker(
        [BAND],
        offline_after_s=300,
        dedup_window_s=900,
        reading_min_gap_s=5,
        reading_refresh_s=60,
        stats=WristbandStats(),
        started_at=1000.0,
    )


def test_tracker_silence_and_alarms_follow_the_given_clock() -> None:
    tracker = _tracker()
    assert tracker.tick(1299.0, busy=set()) == []  # never heard, not yet 300 s
    (status, offline) = tracker.tick(1300.0, busy=set())
    assert status == LinkStatus(BAND, False)
    assert offline == Condition(BAND, ConditionKind.OFFLINE, True, {"silent_s": 300.0})

    out = tracker.advert(BAND, "ES-WB1-0001", SOS_ADVERT, -60, 1301.0)
    assert out is not None
    sos = [o for o in out if isinstance(o, Occurrence)]
    assert [(o.kind, o.dedup_key) for o in sos] == [
        (OccurrenceKind.SOS, f"es-wb1:{BAND}:{SOS_ADVERT[0xFFFF][2]}")
    ]
    assert Condition(BAND, ConditionKind.OFFLINE, False) in out
    # The flag repeats in every advert: no second occurrence, however often.
    for t in range(1302, 1320):
        again = tracker.advert(BAND, "ES-WB1-0001", SOS_ADVERT, -60, float(t))
        assert again is not None and not [o for o in again if isinstance(o, Occurrence)]
    # Heard at 1319: silent only from 1619 on, not a tick earlier.
    assert not [o for o in tracker.tick(1618.9, busy=set()) if isinstance(o, Condition)]
    assert any(isinstance(o, Condition) and o.active for o in tracker.tick(1619.0, busy=set()))
    quiet = tracker.advert(BAND, "ES-WB1-0001", QUIET_ADVERT, -60, 1620.0)
    assert quiet is not None and not [o for o in quiet if isinstance(o, Occurrence)]
    assert tracker.advert(BAND, "OTHER", {0x1234: b"x"}, -60, 1621.0) is None
