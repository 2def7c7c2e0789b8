"""Device status: LinkStatus → the retained ``…/{device}/status``, latest wins.

A newer status replaces an unsent older one (nothing is lost that a subscriber
would still want); an unchanged status goes out at most once a minute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from device_drivers.model import LinkStatus
from gateway.contract.payloads import StatusPayload, dump
from gateway.contract.topics import Channel, DeviceTopic
from gateway.mqtt.client import MqttClient

REFRESH_S = 60.0


class DeviceStatusPublisher:
    def __init__(self, site: str, client: MqttClient) -> None:
        self.site = site
        self.client = client
        self._pending: dict[str, StatusPayload] = {}
        self._sent: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._wake = asyncio.Event()

    def update(self, device: str, link: LinkStatus) -> None:
        now = datetime.fromtimestamp(time.time(), UTC)
        battery = link.battery if link.battery is not None and 0 <= link.battery <= 100 else None
        rssi = link.rssi if link.rssi is not None and -150 <= link.rssi <= 20 else None
        previous = self._pending.get(device)
        last_seen = now if link.online else (previous.last_seen if previous else None)
        self._pending[device] = StatusPayload(
            v=1, time=now, online=link.online, battery=battery, rssi=rssi, last_seen=last_seen
        )
        self._wake.set()

    async def run(self) -> None:
        """Publish the newest status per device; unchanged ones at most once a minute."""
        while True:
            await self._wake.wait()
            await self.client.connected.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            now = time.monotonic()
            for device, status in pending.items():
                key = (status.online, status.battery, status.rssi)
                sent = self._sent.get(device)
                if sent is not None and sent[0] == key and now - sent[1] < REFRESH_S:
                    continue
                topic = str(DeviceTopic(self.site, device, Channel.STATUS))
                try:
                    fut = await self.client.publish(topic, dump(status), qos=1, retain=True)
                except ConnectionError:
                    self._pending.setdefault(device, status)
                    continue
                fut.add_done_callback(self._done(device, status))
                self._sent[device] = (key, now)
            await asyncio.sleep(0.5)

    def _done(self, device: str, status: StatusPayload) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                self._sent.pop(device, None)
                self._pending.setdefault(device, status)
                self._wake.set()

        return done
