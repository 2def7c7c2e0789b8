"""From driver observations to MQTT: the sink, the event pump, telemetry and status.

* Occurrence / Condition → the durable outbox (dedup ledger, level ledger),
  then the pump sends the outbox in order at QoS 1 and deletes on PUBACK.
* Reading → per-device batches (one TelemetryPayload per device per
  ``batch_s``), bounded in memory; what cannot be kept is counted and logged.
* LinkStatus → retained device status, latest wins (a newer status replaces an
  unsent older one; nothing is lost that a subscriber would still want).
* Gateway status → retained birth on every connection and on every driver
  state change; the last will (set in the client) says offline.

An address no device is configured for is counted and logged (as an error if it
carried an alarm), never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    EventPayload,
    EventType,
    GatewayStatusPayload,
    Phase,
    ReadingItem,
    StatusPayload,
    TelemetryPayload,
    dump,
)
from gateway.contract.topics import Channel, DeviceTopic, GatewayStatusTopic
from gateway.edge.config import EdgeConfig
from gateway.edge.outbox import AsyncOutbox, EventBuilder
from gateway.mqtt.client import MqttClient, NotConnected, PublishError

log = logging.getLogger(__name__)

VERSION = "0.1.0"
_DATA_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_METRIC = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PUMP_WINDOW = 200  # events in flight from the outbox at once (well under 65,535)


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    profile: str
    driver: str
    address: str
    offline_when_down: bool = True  # offline with its driver (the kind decides)


def _utc(ts: float | None = None) -> datetime:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC)


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


class EdgePipeline:
    def __init__(
        self,
        config: EdgeConfig,
        outbox: AsyncOutbox,
        client: MqttClient,
        *,
        driver_states: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.client = client
        self.driver_states = driver_states
        self.devices: dict[str, dict[str, Device]] = {}  # driver -> address -> device
        for drv in config.drivers:
            self.devices[drv.name] = {
                d.address: Device(
                    d.id, drv.profile_of(d), drv.name, d.address, drv.offline_when_down(d)
                )
                for d in drv.devices
            }
        self.counters: Counter[str] = Counter()
        self.unknown_addresses: Counter[str] = Counter()
        self._outbox_wake = asyncio.Event()
        self._gw_dirty = asyncio.Event()
        self._status_pending: dict[str, StatusPayload] = {}
        self._status_sent: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._status_wake = asyncio.Event()
        self._readings: dict[str, deque[ReadingItem]] = {}
        self._readings_total = 0
        self.outbox_pending = 0

    # -- sinks -------------------------------------------------------------------------

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
                await self._condition(device, observation)
            elif isinstance(observation, Reading):
                self._reading(device, observation)
            elif isinstance(observation, LinkStatus):
                self._link_status(device, observation)

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
        topic = str(DeviceTopic(self.config.site, device.id, Channel.EVENT))
        cleaned = clean_data(data, where=f"device {device.id} {type_}")
        when = _utc(at)

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
        self._outbox_wake.set()

    async def _condition(self, device: Device, cond: Condition) -> None:
        await self.raise_condition(device, cond.kind, cond.active, cond.data)

    async def raise_condition(
        self, device: Device, kind: ConditionKind, active: bool, data: Mapping[str, Scalar]
    ) -> None:
        build = self._builder(device, kind.value, data, None)
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
            self._outbox_wake.set()

    def _reading(self, device: Device, reading: Reading) -> None:
        if not _METRIC.match(reading.metric) or len(reading.unit) > 16:
            self.counters["readings_invalid"] += 1
            log.warning("device %s: reading %r does not fit the contract", device.id, reading)
            return
        item = ReadingItem(
            metric=reading.metric, value=float(reading.value), unit=reading.unit, time=_utc()
        )
        queue = self._readings.setdefault(device.id, deque())
        queue.append(item)
        self._readings_total += 1
        limit = self.config.telemetry.max_queued_readings
        while self._readings_total > limit:
            # Drop the oldest reading of the fullest device; telemetry is not an alarm path.
            fullest = max(self._readings.values(), key=len)
            fullest.popleft()
            self._readings_total -= 1
            self.counters["telemetry_dropped"] += 1
            if self.counters["telemetry_dropped"] % 1000 == 1:
                log.warning(
                    "telemetry queue full: %d readings dropped so far",
                    self.counters["telemetry_dropped"],
                )

    def _link_status(self, device: Device, link: LinkStatus) -> None:
        now = _utc()
        battery = link.battery if link.battery is not None and 0 <= link.battery <= 100 else None
        rssi = link.rssi if link.rssi is not None and -150 <= link.rssi <= 20 else None
        previous = self._status_pending.get(device.id)
        last_seen = now if link.online else (previous.last_seen if previous else None)
        self._status_pending[device.id] = StatusPayload(
            v=1,
            time=now,
            online=link.online,
            battery=battery,
            rssi=rssi,
            last_seen=last_seen,
        )
        self._status_wake.set()

    async def report_driver_down(self, driver: str) -> None:
        """The supervisor says the driver is down too long: its devices are offline."""
        for device in self.devices[driver].values():
            if not device.offline_when_down:
                continue  # e.g. call buttons keep their own 60-min supervision
            await self.raise_condition(
                device, ConditionKind.OFFLINE, True, {"reason": "driver_down", "driver": driver}
            )
            self._link_status(device, LinkStatus(device.address, online=False))

    # -- gateway status ----------------------------------------------------------------

    @property
    def gateway_topic(self) -> str:
        return str(GatewayStatusTopic(self.config.site, self.config.gateway))

    def gateway_status(self, online: bool) -> bytes:
        return dump(
            GatewayStatusPayload(
                v=1,
                time=_utc() if online else None,
                online=online,
                version=VERSION,
                drivers=self.driver_states() if online else {},
            )
        )

    def mark_gateway_dirty(self) -> None:
        self._gw_dirty.set()

    async def gateway_status_loop(self) -> None:
        """Birth (retained, online, driver states) on each connection and each change."""
        while True:
            await self._gw_dirty.wait()
            await self.client.connected.wait()
            self._gw_dirty.clear()
            try:
                await asyncio.wait_for(
                    self.client.publish_and_wait(
                        self.gateway_topic, self.gateway_status(True), qos=1, retain=True
                    ),
                    30,
                )
            except (TimeoutError, ConnectionError, PublishError) as exc:
                log.warning("gateway status not published (%s); retrying", exc)
                self._gw_dirty.set()
                await asyncio.sleep(1)
            await asyncio.sleep(0.2)  # coalesce bursts of state changes

    # -- event pump --------------------------------------------------------------------

    def wake_pump(self) -> None:
        self._outbox_wake.set()

    async def event_pump(self) -> None:
        """Send the outbox in order, ``PUMP_WINDOW`` at a time; delete each on PUBACK.

        Unacknowledged messages ride through reconnects inside the client. A
        refusal the broker will repeat (payload, topic) dead-letters the event;
        any other refusal (ACL, quota) restarts from the head after a pause.
        """
        backoff = 1.0
        while True:
            inflight: dict[int, asyncio.Future[None]] = {}
            last_seq = 0
            try:
                while True:
                    await self.client.connected.wait()
                    room = PUMP_WINDOW - len(inflight)
                    if room > 0:
                        self._outbox_wake.clear()
                        items = await self.outbox.peek(last_seq, room)
                        for item in items:
                            inflight[item.seq] = await self.client.publish(
                                item.topic, item.payload, qos=1
                            )
                            last_seq = item.seq
                    if not inflight:
                        self.outbox_pending = 0
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._outbox_wake.wait(), 5)
                        continue
                    waiters: list[asyncio.Future[Any]] = list(inflight.values())
                    wake: asyncio.Future[Any] | None = None
                    if len(inflight) < PUMP_WINDOW:  # room: new events may join at once
                        wake = asyncio.ensure_future(self._outbox_wake.wait())
                        waiters.append(wake)
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if wake is not None:
                            wake.cancel()
                    await self._settle(inflight)
                    backoff = 1.0
            except PublishError as exc:
                log.error("outbox: broker refused an event (%s); retrying from the head", exc)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)

    async def _settle(self, inflight: dict[int, asyncio.Future[None]]) -> None:
        done = [seq for seq, fut in inflight.items() if fut.done()]
        acked: list[int] = []
        for seq in done:
            fut = inflight.pop(seq)
            exc = fut.exception()
            if exc is None:
                acked.append(seq)
            elif isinstance(exc, PublishError) and exc.permanent:
                log.error("outbox: event seq %d dead-lettered: %s", seq, exc)
                await self.outbox.dead_letter(seq, str(exc))
                self.counters["dead_letters"] += 1
            else:
                if acked:
                    await self.outbox.ack(acked)
                raise exc
        if acked:
            await self.outbox.ack(acked)
            self.counters["events_sent"] += len(acked)

    # -- telemetry and device status ---------------------------------------------------

    async def telemetry_loop(self) -> None:
        qos = self.config.telemetry.qos
        while True:
            await asyncio.sleep(self.config.telemetry.batch_s)
            if not self.client.connected.is_set():
                continue  # keep (bounded) until the link is back
            batches, self._readings, self._readings_total = self._readings, {}, 0
            for device, items in batches.items():
                readings = list(items)
                topic = str(DeviceTopic(self.config.site, device, Channel.TELEMETRY))
                for start in range(0, len(readings), 1000):
                    chunk = readings[start : start + 1000]
                    payload = dump(TelemetryPayload(v=1, time=_utc(), readings=chunk))
                    try:
                        fut = await self.client.publish(topic, payload, qos=qos)
                    except (NotConnected, ConnectionError) as exc:
                        self.counters["telemetry_dropped"] += len(chunk)
                        log.warning("telemetry for %s dropped (%s)", device, exc)
                        continue
                    fut.add_done_callback(self._telemetry_done(len(chunk)))
                    self.counters["telemetry_sent"] += len(chunk)

    def _telemetry_done(self, n: int) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                self.counters["telemetry_dropped"] += n
                log.warning("telemetry refused by broker: %s", fut.exception())

        return done

    async def status_loop(self) -> None:
        """Publish the newest status per device; unchanged ones at most once a minute."""
        while True:
            await self._status_wake.wait()
            await self.client.connected.wait()
            self._status_wake.clear()
            pending, self._status_pending = self._status_pending, {}
            now = time.monotonic()
            for device, status in pending.items():
                key = (status.online, status.battery, status.rssi)
                sent = self._status_sent.get(device)
                if sent is not None and sent[0] == key and now - sent[1] < 60:
                    continue
                topic = str(DeviceTopic(self.config.site, device, Channel.STATUS))
                try:
                    fut = await self.client.publish(topic, dump(status), qos=1, retain=True)
                except ConnectionError:
                    self._status_pending.setdefault(device, status)
                    continue
                fut.add_done_callback(self._status_done(device, status))
                self._status_sent[device] = (key, now)
            await asyncio.sleep(0.5)

    def _status_done(
        self, device: str, status: StatusPayload
    ) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                self._status_sent.pop(device, None)
                self._status_pending.setdefault(device, status)
                self._status_wake.set()

        return done

    # -- housekeeping ------------------------------------------------------------------

    async def housekeeping_loop(
        self, health_path: Path, extra: Callable[[], dict[str, Any]]
    ) -> None:
        """Refresh outbox counts, purge old dedup keys, write ``health.json`` for watchdogs."""
        tick = 0
        while True:
            self.outbox_pending = await self.outbox.pending()
            if tick % 60 == 0:
                await self.outbox.purge_expired()
            health = {
                "pid": os.getpid(),
                "time": time.time(),
                "connected": self.client.connected.is_set(),
                "mqtt_error": self.client.last_error,
                "outbox_pending": self.outbox_pending,
                "mqtt_outstanding": self.client.outstanding,
                "counters": dict(self.counters),
                "unknown_addresses": dict(self.unknown_addresses),
                **extra(),
            }
            tmp = health_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(health, indent=1, sort_keys=True))
            tmp.replace(health_path)
            tick += 1
            await asyncio.sleep(0.5)
