"""The `es-wb1` alarm state machine: decoded adverts and GATT values in, observations out.

No I/O and no bleak here: the BLE side (``driver``) hands in what it heard, as
plain values, with the time from the injected clock; this module decides what
is an alarm, what is a repeat, what telemetry is worth sending and when a
wristband has gone silent. The I/O side asks it which wristbands want a
connection (configured ones, and strangers while in alarm).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from device_drivers.model import (
    Condition,
    ConditionKind,
    DecodeError,
    LinkStatus,
    Observation,
    Occurrence,
    OccurrenceKind,
    Reading,
    Scalar,
)
from device_drivers.wristband import gatt
from device_drivers.wristband.advert import (
    COMPANY_ID,
    WristbandAdvert,
    decode_advert,
    is_wristband_name,
)

__all__ = ["DEDUP_WINDOW_S", "PROFILE", "WristbandStats", "WristbandTracker", "normalize_address"]

log = logging.getLogger(__name__)

PROFILE = "es-wb1"
DEDUP_WINDOW_S = 900.0  # > the 10 min an alarm flag may stay in adverts


def normalize_address(address: str) -> str:
    """The one address form this driver reports and accepts."""
    return address.strip().upper()


@dataclass(slots=True)
class WristbandStats:
    """Counters: nothing is dropped without showing up here."""

    adverts: int = 0
    adverts_shed: int = 0  # telemetry-only adverts dropped under backlog
    decode_errors: int = 0
    occurrences: int = 0
    alarm_notifications: int = 0  # Alarm Event values received over GATT
    duplicates_suppressed: int = 0  # repeats of an event already reported
    connects: int = 0  # connected and subscribed
    connect_failures: int = 0
    commands: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Band:
    """What is known about one wristband."""

    address: str
    configured: bool
    last_heard: float | None = None  # clock time
    online: bool | None = None  # None: not yet decided
    advert: WristbandAdvert | None = None
    rssi: int | None = None
    battery: int | None = None
    low_battery: bool | None = None
    flag_seq: dict[OccurrenceKind, str] = field(default_factory=dict)  # set flag -> dedup key
    emitted: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (value, t)
    status_at: float = float("-inf")
    link_up: bool = False  # connected: the controller supervises the link
    warned_decode: bool = False


class WristbandTracker:
    """Per-wristband state; every method takes the time the I/O side observed."""

    def __init__(
        self,
        addresses: list[str],
        *,
        offline_after_s: float,
        dedup_window_s: float,
        reading_min_gap_s: float,
        reading_refresh_s: float,
        stats: WristbandStats,
        started_at: float,
    ) -> None:
        self.offline_after_s = offline_after_s
        self.dedup_window_s = dedup_window_s
        self.reading_min_gap_s = reading_min_gap_s
        self.reading_refresh_s = reading_refresh_s
        self.stats = stats
        self.started_at = started_at
        self.bands = {a: _Band(a, configured=True) for a in addresses}
        self._seen_keys: dict[str, float] = {}  # dedup ledger: key -> time

    def restart(self, now: float) -> None:
        """A new run of the driver: forget the wristbands, keep the dedup ledger."""
        self.started_at = now
        self.bands = {a: _Band(a, configured=True) for a in self.bands if self.bands[a].configured}

    def band(self, address: str) -> _Band:
        band = self.bands.get(address)
        if band is None:
            band = self.bands[address] = _Band(address, configured=False)
        return band

    def wants_connection(self, address: str) -> bool:
        """Configured wristbands stay connected; others only while their adverts show an alarm."""
        band = self.bands.get(address)
        return band is not None and (
            band.configured or (band.advert is not None and band.advert.alarm)
        )

    def set_link(self, address: str, up: bool) -> None:
        self.band(address).link_up = up

    # ---------------------------------------------------------------- inputs
    def advert(
        self,
        address: str,
        local_name: str | None,
        manufacturer_data: Mapping[int, bytes],
        rssi: int,
        now: float,
    ) -> list[Observation] | None:
        """One advert; None when it is unusable (someone else's use of the company id,
        or undecodable): then it does not count as the wristband being heard."""
        if COMPANY_ID not in manufacturer_data:
            return None
        if not is_wristband_name(local_name) and address not in self.bands:
            return None
        self.stats.adverts += 1
        band = self.band(address)
        try:
            advert = decode_advert(manufacturer_data)
        except DecodeError as exc:
            self.stats.decode_errors += 1
            level = logging.DEBUG if band.warned_decode else logging.WARNING
            log.log(level, "%s: bad advert: %s", address, exc)
            band.warned_decode = True
            return None
        band.rssi = rssi
        band.advert = advert
        out = self._advert_alarms(band, advert, now)  # alarms first: they are what is urgent
        out += self._battery(band, advert.battery, now, low=advert.battery_low)
        out += self.heard(address, now)
        out += self._readings(
            band,
            now,
            {
                "heart_rate_bpm": (advert.heart_rate, "bpm"),
                "spo2_pct": (advert.spo2, "%"),
                "steps": (advert.steps, "steps"),
                "activity": (advert.activity, "index"),
                "battery_pct": (advert.battery, "%"),
            },
        )
        return out

    def gatt_value(
        self, address: str, uuid: str, data: bytes, *, from_read: bool, now: float
    ) -> list[Observation]:
        """A characteristic value: read at connect time, or a notification."""
        band = self.band(address)
        try:
            if uuid == gatt.ALARM_EVENT_UUID:
                event = gatt.decode_alarm_event(data)
                self.stats.alarm_notifications += not from_read
                return self._alarm_event(band, event, from_read, now) + self.heard(address, now)
            if uuid == gatt.BATTERY_LEVEL_UUID:
                level = gatt.decode_battery_level(data)
                out = self._battery(band, level, now, low=None) + self.heard(address, now)
                return out + self._readings(band, now, {"battery_pct": (level, "%")}, force=True)
            if uuid == gatt.HEART_RATE_MEASUREMENT_UUID:
                hr = gatt.decode_heart_rate(data)
                out = self.heard(address, now)
                return out + self._readings(band, now, {"heart_rate_bpm": (hr.bpm or None, "bpm")})
        except DecodeError as exc:
            if from_read and data == bytes(len(data)):
                return []  # all zero: no alarm event yet
            self.stats.decode_errors += 1
            log.warning("%s: bad %s value %s: %s", address, uuid, data.hex(), exc)
        return []

    def heard(self, address: str, now: float) -> list[Observation]:
        band = self.band(address)
        band.last_heard = now
        if band.online is True:
            return []
        band.online = True
        band.status_at = now
        out: list[Observation] = [LinkStatus(band.address, True, band.battery, band.rssi)]
        if band.configured:
            out.append(Condition(band.address, ConditionKind.OFFLINE, False))
        return out

    def tick(self, now: float, *, busy: set[str]) -> list[Observation]:
        """Silence → offline for configured wristbands; passers-by are forgotten.

        ``busy``: addresses the I/O side still has a connection task for.
        """
        out: list[Observation] = []
        for key, at in list(self._seen_keys.items()):
            if now - at >= self.dedup_window_s:
                del self._seen_keys[key]
        for band in list(self.bands.values()):
            if band.link_up:
                band.last_heard = now  # a live link is supervised by the controller
                continue
            heard = band.last_heard if band.last_heard is not None else self.started_at
            silent = now - heard
            if silent < self.offline_after_s or band.online is False:
                continue
            if band.configured:
                band.online = False
                out.append(LinkStatus(band.address, False, band.battery, band.rssi))
                out.append(
                    Condition(
                        band.address, ConditionKind.OFFLINE, True, {"silent_s": round(silent, 1)}
                    )
                )
            elif (
                silent >= max(self.offline_after_s, self.dedup_window_s)
                and band.address not in busy
            ):
                del self.bands[band.address]  # a passer-by: forget it
        return out

    # ------------------------------------------------------------- decisions
    def _advert_alarms(self, band: _Band, advert: WristbandAdvert, now: float) -> list[Observation]:
        """SOS/fall flags -> occurrences, one per (address, event_seq).

        The advert carries one seq for possibly two set flags. A flag that rises
        alone takes the current seq. If both rise at once (first sighting) the
        SOS takes the seq and the fall gets a key "before <seq>": both alarms
        reach a person, at worst one twice, never none.
        """
        out: list[Observation] = []
        states = ((OccurrenceKind.SOS, advert.sos), (OccurrenceKind.FALL, advert.fall))
        for kind, active in states:
            if not active:
                band.flag_seq.pop(kind, None)
            elif kind in band.flag_seq:
                self.stats.duplicates_suppressed += 1  # the flag repeats in every advert
        new = [kind for kind, active in states if active and kind not in band.flag_seq]
        current_key = self._alarm_key(band.address, advert.event_seq)
        taken = current_key in band.flag_seq.values()
        for kind in new:
            key = current_key if not taken else f"{current_key}:{kind}-before"
            taken = True
            band.flag_seq[kind] = key
            out += self._occurrence(
                band, kind, key, None, {"event_seq": advert.event_seq, "source": "advert"}, now
            )
        return out

    def _alarm_event(
        self, band: _Band, event: gatt.AlarmEvent, from_read: bool, now: float
    ) -> list[Observation]:
        data: dict[str, Scalar] = {
            "event_seq": event.event_seq,
            "source": "gatt",
            "confidence": event.confidence,
        }
        kind = {
            gatt.AlarmType.SOS: OccurrenceKind.SOS,
            gatt.AlarmType.FALL: OccurrenceKind.FALL,
            gatt.AlarmType.CANCEL: OccurrenceKind.CANCEL,
            gatt.AlarmType.REMOVED: OccurrenceKind.REMOVED,
            gatt.AlarmType.GEOFENCE_EXIT: OccurrenceKind.GEOFENCE_EXIT,
        }[event.type]
        if kind in (OccurrenceKind.SOS, OccurrenceKind.FALL):
            if from_read:
                # The last event, read at connect: an alarm only if the adverts
                # still show it; otherwise it is history, not a new call for help.
                advert = band.advert
                flag = advert is not None and (
                    advert.sos if kind is OccurrenceKind.SOS else advert.fall
                )
                if not (flag and advert is not None and advert.event_seq == event.event_seq):
                    return []
            key = self._alarm_key(band.address, event.event_seq)
            if band.flag_seq.get(kind) == key:
                self.stats.duplicates_suppressed += 1
                return []
            band.flag_seq[kind] = key
        elif from_read:
            return []  # cancel/removed/geofence are pulses: only live notifications count
        else:
            key = f"{self._alarm_key(band.address, event.event_seq)}:{kind}:{event.time}"
            if kind is OccurrenceKind.CANCEL:
                band.flag_seq.clear()
        return self._occurrence(band, kind, key, float(event.time), data, now)

    @staticmethod
    def _alarm_key(address: str, event_seq: int) -> str:
        return f"{PROFILE}:{address}:{event_seq}"

    def _occurrence(
        self,
        band: _Band,
        kind: OccurrenceKind,
        key: str,
        occurred_at: float | None,
        data: dict[str, Scalar],
        now: float,
    ) -> list[Observation]:
        seen = self._seen_keys.get(key)
        if seen is not None and now - seen < self.dedup_window_s:
            self.stats.duplicates_suppressed += 1
            return []
        self._seen_keys[key] = now
        self.stats.occurrences += 1
        log.info("%s: %s (%s)", band.address, kind, key)
        return [Occurrence(band.address, kind, key, self.dedup_window_s, occurred_at, data)]

    def _readings(
        self,
        band: _Band,
        now: float,
        values: Mapping[str, tuple[int | None, str]],
        *,
        force: bool = False,
    ) -> list[Observation]:
        """Telemetry on change (at most every min gap) and refreshed periodically."""
        out: list[Observation] = []
        for metric, (value, unit) in values.items():
            if value is None:
                continue
            last = band.emitted.get(metric)
            if last is not None and not force:
                last_value, last_at = last
                age = now - last_at
                changed = last_value != value
                if not (changed and age >= self.reading_min_gap_s) and age < self.reading_refresh_s:
                    continue
            band.emitted[metric] = (float(value), now)
            out.append(Reading(band.address, metric, float(value), unit))
        return out

    def _battery(
        self, band: _Band, level: int | None, now: float, *, low: bool | None
    ) -> list[Observation]:
        """Battery level into the link status, battery-low flag into a condition.

        Called before ``heard``: a wristband coming online gets its status
        from there, already carrying the new level.
        """
        out: list[Observation] = []
        changed = level is not None and level != band.battery
        if level is not None:
            band.battery = level
        refresh = changed or now - band.status_at >= self.reading_refresh_s
        if band.online is True and refresh:
            band.status_at = now
            out.append(LinkStatus(band.address, True, band.battery, band.rssi))
        if low is not None and low != band.low_battery:
            band.low_battery = low
            data: dict[str, Scalar] = {} if band.battery is None else {"battery_pct": band.battery}
            out.append(Condition(band.address, ConditionKind.LOW_BATTERY, low, data))
        return out
