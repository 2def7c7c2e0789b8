"""Gateway status: a retained birth (online, driver states) on every connection and
every driver state change; the last will (set in the client) says offline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.contract.payloads import GatewayStatusPayload, dump
from gateway.contract.topics import GatewayStatusTopic
from gateway.mqtt.client import MqttClient, PublishError

log = logging.getLogger(__name__)

VERSION = "0.1.0"


class GatewayStatus:
    def __init__(
        self,
        site: str,
        gateway: str,
        client: MqttClient,
        driver_states: Callable[[], dict[str, str]],
    ) -> None:
        self.topic = str(GatewayStatusTopic(site, gateway))
        self.client = client
        self.driver_states = driver_states
        self._dirty = asyncio.Event()

    def payload(self, online: bool) -> bytes:
        return dump(
            GatewayStatusPayload(
                v=1,
                time=datetime.fromtimestamp(time.time(), UTC) if online else None,
                online=online,
                version=VERSION,
                drivers=self.driver_states() if online else {},
            )
        )

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        """Birth (retained, online, driver states) on each connection and each change."""
        while True:
            await self._dirty.wait()
            await self.client.connected.wait()
            self._dirty.clear()
            try:
                await asyncio.wait_for(
                    self.client.publish_and_wait(
                        self.topic, self.payload(True), qos=1, retain=True
                    ),
                    30,
                )
            except (TimeoutError, ConnectionError, PublishError) as exc:
                log.warning("gateway status not published (%s); retrying", exc)
                self._dirty.set()
                await asyncio.sleep(1)
            await asyncio.sleep(0.2)  # coalesce bursts of state changes
