"""Driver observations → where each belongs: alarms to the durable outbox, readings to
the telemetry batches, link health to the device status.

Drivers speak in addresses; this maps them to the site's device ids. An
address no device is configured for is counted and logged (as an error if it
carried an alarm), never silently dropped.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from device_drivers.model import (
    Condition,
    ConditionKind,
    LinkStatus,
    Observation,
    ObservationSink,
    Occurrence,
    Reading,
    Scalar,
)
from gateway.contract.payloads import (
    EARLIEST_TIME,
    MAX_AHEAD,
    EventPayload,
    EventType,
    Phase,
    dump,
)
from gateway.contract.topics import Channel, DeviceTopic
from gateway.edge.config import EdgeConfig
from gateway.edge.device_status import DeviceStatusPublisher
from gateway.edge.outbox import AsyncOutbox, EventBuilder
from gateway.edge.telemetry import TelemetryBatcher

log = logging.getLogger(__name__)

_DATA_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    profile: str
    driver: str
    address: str
    offline_when_down: bool = True  # offline with its driver (its kind decides)


def utc(ts: float | None = None) -> datetime:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC)


def event_time(device_time: float | None, now: float) -> tuple[datetime, dict[str, Scalar]]:
    """The time an event is stamped with, and what to add to its data.

    A device's own clock is kept when the contract accepts it; a clock that never
    synced (a wristband at 1970 after a battery change) or runs far ahead would
    make the event a dead letter at the server, so the edge stamps its own
    receive time and keeps the device's claim as ``device_time``. An alarm is
    never refused for a wrong clock.
    """
    if device_time is None:
        return utc(now), {}
    earliest = EARLIEST_TIME.timestamp()
    latest = now + MAX_AHEAD.total_seconds()
    if math.isfinite(device_time) and earliest <= device_time <= latest:
        return utc(device_time), {}
    log.warning("device clock says %r; event stamped with the edge's time", device_time)
    claim: dict[str, Scalar] = {"device_time": device_time} if math.isfinite(device_time) else {}
    return utc(now), claim


def clean_data(data: Mapping[str, Scalar], *, where: str) -> dict[str, Scalar]:
    """Data the contract accepts; anything else is logged and left out, never the event."""
    out: dict[str, Scalar] = {}
    for key, value in data.items():
        if len(out) >= 32:
            log.warning("%s: more than 32 data fields; %r and later left out", where, key)
            break
        if not _DATA_KEY.match(key) or not isinstance(value, bool | int | float | str):
            log.warning(
                "%s: data field %r=%r does not fit the contract; left out", where, key, value
            )
            continue
        out[key] = value[:256] if isinstance(value, str) else value
    return out


class ObservationRouter:
    def __init__(
        self,
        config: EdgeConfig,
        outbox: AsyncOutbox,
        telemetry: TelemetryBatcher,
        status: DeviceStatusPublisher,
        counters: Counter[str],
        *,
        on_event: Callable[[], None],
    ) -> None:
        self.site = config.site
        self.outbox = outbox
        self.telemetry = telemetry
        self.status = status
        self.counters = counters
        self._on_event = on_event
        self.unknown_addresses: Counter[str] = Counter()
        self.devices: dict[str, dict[str, Device]] = {}  # driver -> address -> device
        for drv in config.drivers:
            self.devices[drv.name] = {
                d.address: Device(
                    d.id, drv.profile_of(d), drv.name, d.address, drv.offline_when_down(d)
                )
                for d in drv.devices
            }

    def sink_for(self, driver: str) -> ObservationSink:
        devices = self.devices[driver]

        async def sink(observation: Observation) -> None:
            device = devices.get(observation.address)
            if device is None:
                self._unknown(driver, observation)
                return
            if isinstance(observation, Occurrence):
                await self._occurrence(device, observation)
            elif isinstance(observation, Condition):
                await self.raise_condition(
                    device, observation.kind, observation.active, observation.data
                )
            elif isinstance(observation, Reading):
                self.telemetry.add(device.id, observation)
            elif isinstance(observation, LinkStatus):
                self.status.update(device.id, observation)

        return sink

    def _unknown(self, driver: str, observation: Observation) -> None:
        key = f"{driver}/{observation.address}"
        self.unknown_addresses[key] += 1
        n = self.unknown_addresses[key]
        alarm = isinstance(observation, Occurrence | Condition)
        if alarm or n == 1 or n % 100 == 0:
            log.log(
                logging.ERROR if alarm else logging.WARNING,
                "driver %s: %s from unconfigured address %r (seen %d times): %r",
                driver,
                type(observation).__name__,
                observation.address,
                n,
                observation,
            )

    def _builder(
        self, device: Device, type_: str, data: Mapping[str, Scalar], at: float | None
    ) -> EventBuilder:
        topic = str(DeviceTopic(self.site, device.id, Channel.EVENT))
        when, claim = event_time(at, time.time())
        cleaned = clean_data({**data, **claim}, where=f"device {device.id} {type_}")

        def build(event_id: uuid.UUID, phase: str) -> tuple[str, bytes]:
            payload = EventPayload(
                v=1,
                event_id=event_id,
                type=EventType(type_),
                phase=Phase(phase),
                time=when,
                profile=device.profile,
                data=cleaned,
            )
            return topic, dump(payload)

        return build

    async def _occurrence(self, device: Device, occ: Occurrence) -> None:
        build = self._builder(device, occ.kind.value, occ.data, occ.occurred_at)
        accepted = await self.outbox.add_occurrence(occ.dedup_key, occ.dedup_window_s, build)
        if accepted.event_id is None:
            self.counters["occurrence_repeats"] += 1
            log.debug("device %s: %s is a repeat of %s", device.id, occ.kind, accepted.repeat_of)
            return
        self.counters["events"] += 1
        log.info("device %s: %s event %s queued", device.id, occ.kind.value, accepted.event_id)
        self._on_event()

    async def raise_condition(
        self, device: Device, kind: ConditionKind, active: bool, data: Mapping[str, Scalar]
    ) -> None:
        def build(event_id: uuid.UUID, phase: str) -> tuple[str, bytes]:
            # built only when the level changed (most reports repeat the stored one)
            return self._builder(device, kind.value, data, None)(event_id, phase)

        accepted = await self.outbox.add_condition(device.id, kind.value, active, build)
        if accepted.event_id is not None:
            self.counters["events"] += 1
            log.info(
                "device %s: %s %s event %s queued",
                device.id,
                kind.value,
                "raise" if active else "clear",
                accepted.event_id,
            )
            self._on_event()

    async def report_driver_down(self, driver: str) -> None:
        """The supervisor says the driver is down too long: its devices are offline."""
        for device in self.devices[driver].values():
            if not device.offline_when_down:
                continue  # e.g. call buttons keep their own 60-min supervision
            await self.raise_condition(
                device, ConditionKind.OFFLINE, True, {"reason": "driver_down", "driver": driver}
            )
            self.status.update(device.id, LinkStatus(device.address, online=False))
