"""The edge's data path, wired together: driver observations in, MQTT out.

Each job has its own module; this one only connects them and keeps the
interface ``main`` uses:

* ``sink``: observations → the outbox (alarms), telemetry batches, device status;
* ``event_pump``: the durable outbox → QoS 1 events, deleted on PUBACK;
* ``telemetry``: bounded per-device batches;
* ``device_status``: retained device status, latest wins;
* ``gateway_status``: birth on every connection and driver change (will = offline);
* ``health``: ``health.json`` and outbox housekeeping.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_drivers.model import ConditionKind, ObservationSink, Scalar
from gateway.edge.config import EdgeConfig
from gateway.edge.device_status import DeviceStatusPublisher
from gateway.edge.event_pump import PUMP_WINDOW, EventPump
from gateway.edge.gateway_status import VERSION, GatewayStatus
from gateway.edge.health import housekeeping_loop
from gateway.edge.outbox import AsyncOutbox
from gateway.edge.sink import Device, ObservationRouter, clean_data
from gateway.edge.telemetry import TelemetryBatcher
from gateway.mqtt.client import MqttClient

__all__ = ["PUMP_WINDOW", "VERSION", "Device", "EdgePipeline", "clean_data"]


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
        self.counters: Counter[str] = Counter()
        self.pump = EventPump(outbox, client, self.counters)
        self.telemetry = TelemetryBatcher(config.site, config.telemetry, client, self.counters)
        self.device_status = DeviceStatusPublisher(config.site, client)
        self.gateway = GatewayStatus(
            config.site, config.gateway, client, lambda: self.driver_states()
        )
        self.router = ObservationRouter(
            config,
            outbox,
            self.telemetry,
            self.device_status,
            self.counters,
            on_event=self.pump.wake,
        )
        self.devices = self.router.devices
        self.unknown_addresses = self.router.unknown_addresses

    # -- observations in ---------------------------------------------------------------

    def sink_for(self, driver: str) -> ObservationSink:
        return self.router.sink_for(driver)

    async def raise_condition(
        self, device: Device, kind: ConditionKind, active: bool, data: dict[str, Scalar]
    ) -> None:
        await self.router.raise_condition(device, kind, active, data)

    async def report_driver_down(self, driver: str) -> None:
        await self.router.report_driver_down(driver)

    # -- gateway status ----------------------------------------------------------------

    @property
    def gateway_topic(self) -> str:
        return self.gateway.topic

    def gateway_status(self, online: bool) -> bytes:
        return self.gateway.payload(online)

    def mark_gateway_dirty(self) -> None:
        self.gateway.mark_dirty()

    # -- the loops main runs -----------------------------------------------------------

    def wake_pump(self) -> None:
        self.pump.wake()

    @property
    def outbox_pending(self) -> int:
        return self.pump.pending

    async def event_pump(self) -> None:
        await self.pump.run()

    async def gateway_status_loop(self) -> None:
        await self.gateway.run()

    async def status_loop(self) -> None:
        await self.device_status.run()

    async def telemetry_loop(self) -> None:
        await self.telemetry.run()

    async def housekeeping_loop(
        self, health_path: Path, extra: Callable[[], dict[str, Any]]
    ) -> None:
        def snapshot(pending: int) -> dict[str, Any]:
            self.pump.pending = pending
            return {
                "counters": dict(self.counters),
                "unknown_addresses": dict(self.unknown_addresses),
                **extra(),
            }

        await housekeeping_loop(health_path, self.outbox, self.client, snapshot)
