"""Pure decoder of the `es-wb1` advertisement (DEVICES.md 1.1).

No I/O and no bleak types: the driver hands in the manufacturer-data mapping
(company id -> bytes) exactly as bleak's ``AdvertisementData`` carries it, so
golden bytes can be tested without a radio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from device_drivers.model import DecodeError

COMPANY_ID = 0xFFFF  # the reserved test company id the wristband uses
NAME_PREFIX = "ES-WB1-"
ADVERT_VERSION = 0x01
ADVERT_LENGTH = 9

FLAG_SOS = 0x01
FLAG_FALL = 0x02
FLAG_WORN = 0x04
FLAG_CHARGING = 0x08
FLAG_BATTERY_LOW = 0x10
FLAG_OUTSIDE_GEOFENCE = 0x20


@dataclass(frozen=True, slots=True)
class WristbandAdvert:
    """Everything one advert says.

    ``None`` in heart_rate/spo2/battery means "no reading": 0 bpm / 0 % per the
    spec, or a percentage above 100 (a bad sensor value must not cost us the
    SOS flag travelling in the same advert).
    """

    version: int
    sos: bool
    fall: bool
    worn: bool
    charging: bool
    battery_low: bool
    outside_geofence: bool
    event_seq: int
    heart_rate: int | None
    spo2: int | None
    battery: int | None
    steps: int
    activity: int

    @property
    def alarm(self) -> bool:
        """True while an SOS or fall is waiting for an acknowledge."""
        return self.sos or self.fall


def decode_manufacturer_payload(payload: bytes) -> WristbandAdvert:
    """Decode the 9 bytes after the company id; DecodeError on anything off-spec."""
    data = bytes(payload)
    if len(data) != ADVERT_LENGTH:
        raise DecodeError(f"es-wb1 advert: expected {ADVERT_LENGTH} bytes, got {len(data)}")
    version, flags, seq, hr, spo2, battery = data[0:6]
    if version != ADVERT_VERSION:
        raise DecodeError(f"es-wb1 advert: unsupported version {version:#04x}")
    # Bits 6-7 are reserved: ignored, so a future firmware never hides an SOS.
    return WristbandAdvert(
        version=version,
        sos=bool(flags & FLAG_SOS),
        fall=bool(flags & FLAG_FALL),
        worn=bool(flags & FLAG_WORN),
        charging=bool(flags & FLAG_CHARGING),
        battery_low=bool(flags & FLAG_BATTERY_LOW),
        outside_geofence=bool(flags & FLAG_OUTSIDE_GEOFENCE),
        event_seq=seq,
        heart_rate=hr or None,
        spo2=spo2 if 0 < spo2 <= 100 else None,
        battery=battery if battery <= 100 else None,
        steps=int.from_bytes(data[6:8], "little"),
        activity=data[8],
    )


def decode_advert(manufacturer_data: Mapping[int, bytes]) -> WristbandAdvert:
    """Decode from a company-id mapping; DecodeError if company 0xFFFF is absent."""
    try:
        payload = manufacturer_data[COMPANY_ID]
    except KeyError:
        raise DecodeError("es-wb1 advert: no manufacturer data for company 0xFFFF") from None
    return decode_manufacturer_payload(payload)


def is_wristband_name(local_name: str | None) -> bool:
    """A local name of the form ES-WB1-XXXX (four hex digits)."""
    if local_name is None or not local_name.startswith(NAME_PREFIX):
        return False
    suffix = local_name[len(NAME_PREFIX) :]
    return len(suffix) == 4 and all(c in "0123456789abcdefABCDEF" for c in suffix)


def raw_has_alarm(payload: bytes) -> bool:
    """Cheap check used for queue triage: does this payload carry an SOS/fall flag?

    Deliberately lenient (no full validation): when in doubt it says True, so a
    bad payload is never mistaken for droppable telemetry.
    """
    return len(payload) < 2 or bool(payload[1] & (FLAG_SOS | FLAG_FALL))
