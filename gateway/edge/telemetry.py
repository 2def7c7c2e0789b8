"""Telemetry batching: per-device readings → one TelemetryPayload per device per ``batch_s``.

Telemetry is not an alarm path: batches are bounded in memory (the oldest
reading of the fullest device goes first) and whatever cannot be kept or sent
is counted and logged, never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime

from device_drivers.model import Reading
from gateway.contract.payloads import ReadingItem, TelemetryPayload, dump
from gateway.contract.topics import Channel, DeviceTopic
from gateway.edge.config import TelemetryConfig
from gateway.mqtt.client import MqttClient, NotConnected

log = logging.getLogger(__name__)

_METRIC = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CHUNK = 1000  # readings per message


def _now() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC)


class TelemetryBatcher:
    def __init__(
        self, site: str, config: TelemetryConfig, client: MqttClient, counters: Counter[str]
    ) -> None:
        self.site = site
        self.config = config
        self.client = client
        self.counters = counters
        self._readings: dict[str, deque[ReadingItem]] = {}
        self._total = 0

    def add(self, device: str, reading: Reading) -> None:
        if not _METRIC.match(reading.metric) or len(reading.unit) > 16:
            self.counters["readings_invalid"] += 1
            log.warning("device %s: reading %r does not fit the contract", device, reading)
            return
        item = ReadingItem(
            metric=reading.metric, value=float(reading.value), unit=reading.unit, time=_now()
        )
        self._readings.setdefault(device, deque()).append(item)
        self._total += 1
        while self._total > self.config.max_queued_readings:
            fullest = max(self._readings.values(), key=len)
            fullest.popleft()
            self._total -= 1
            self.counters["telemetry_dropped"] += 1
            if self.counters["telemetry_dropped"] % 1000 == 1:
                log.warning(
                    "telemetry queue full: %d readings dropped so far",
                    self.counters["telemetry_dropped"],
                )

    async def run(self) -> None:
        qos = self.config.qos
        while True:
            await asyncio.sleep(self.config.batch_s)
            if not self.client.connected.is_set():
                continue  # keep (bounded) until the link is back
            batches, self._readings, self._total = self._readings, {}, 0
            for device, items in batches.items():
                readings = list(items)
                topic = str(DeviceTopic(self.site, device, Channel.TELEMETRY))
                for start in range(0, len(readings), CHUNK):
                    chunk = readings[start : start + CHUNK]
                    payload = dump(TelemetryPayload(v=1, time=_now(), readings=chunk))
                    try:
                        fut = await self.client.publish(topic, payload, qos=qos)
                    except (NotConnected, ConnectionError) as exc:
                        self.counters["telemetry_dropped"] += len(chunk)
                        log.warning("telemetry for %s dropped (%s)", device, exc)
                        continue
                    fut.add_done_callback(self._done(len(chunk)))
                    self.counters["telemetry_sent"] += len(chunk)

    def _done(self, n: int) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                self.counters["telemetry_dropped"] += n
                log.warning("telemetry refused by broker: %s", fut.exception())

        return done
