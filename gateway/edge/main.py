"""``eldersafe edge``: one site's gateway process (drivers → outbox → MQTT, commands back).

Start order matters for the promises: the outbox opens first (events produced
before the broker is reachable are kept), then the MQTT client (its last will
is registered with the connection), then the drivers. On SIGTERM the edge
publishes an offline status itself (a clean disconnect does not fire the will)
and stops; on SIGKILL the broker publishes the will and the next start resumes
the outbox where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gateway import metrics
from gateway.contract.topics import DeviceTopic, TopicError, parse_topic, site_filter
from gateway.edge import drivers as driver_factory
from gateway.edge import metrics as edge_metrics
from gateway.edge.commands import CommandRouter
from gateway.edge.config import EdgeConfig, load_config, profile_of
from gateway.edge.outbox import AsyncOutbox, Outbox
from gateway.edge.pipeline import EdgePipeline
from gateway.edge.supervisor import Supervisor
from gateway.heap import freeze_when
from gateway.mqtt.client import MqttClient, MqttSettings, Will
from gateway.restarting import Backoff

log = logging.getLogger(__name__)


def device_profiles(config: EdgeConfig) -> dict[str, str]:
    """Device id → profile name: what the command router may ask of each device."""
    return {dev.id: profile_of(drv, dev) for drv in config.drivers for dev in drv.devices}


def _channel(topic: str) -> str:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return "other"
    return parsed.channel.value if isinstance(parsed, DeviceTopic) else "gateway"


async def run_edge_async(
    config: EdgeConfig, stop: asyncio.Event | None = None, *, freeze_heap: bool = False
) -> None:
    """``freeze_heap``: the process is the edge's own (``eldersafe edge``), so its
    start-up heap may be frozen once connected (gateway/heap.py); not in a test's process."""
    stop = stop or asyncio.Event()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    outbox = AsyncOutbox(Outbox(config.state_dir / "outbox.sqlite3"))
    slots, routes = driver_factory.build(config)
    pending = await outbox.pending()
    log.info(
        "edge %s/%s starting: %d drivers, %d events waiting in the outbox",
        config.site,
        config.gateway,
        len(slots),
        pending,
    )

    settings = MqttSettings(
        host=config.broker.host,
        port=config.broker.port,
        client_id=config.client_id,
        username=config.broker.username,
        password=config.broker.resolved_password(),
        keepalive_s=config.broker.keepalive_s,
        session_expiry_s=config.broker.session_expiry_s,
        reconnect_max_s=config.broker.reconnect_max_s,
        tls_ca_file=str(config.broker.tls_ca_file) if config.broker.tls_ca_file else None,
        subscriptions=((site_filter(config.site, "command"), 1),),
    )
    supervisor: Supervisor | None = None
    pipeline: EdgePipeline | None = None

    def on_connect() -> None:
        if pipeline is not None:
            pipeline.mark_gateway_dirty()  # birth message on every connection
            pipeline.wake_pump()

    # The will is fixed at connect time; build it from a throwaway pipeline view.
    client = MqttClient(settings, on_connect=on_connect)
    pipeline = EdgePipeline(config, outbox, client)
    client.will = Will(pipeline.gateway_topic, pipeline.gateway_status(False), qos=1, retain=True)
    supervisor = Supervisor(
        slots,
        pipeline.sink_for,
        backoff=Backoff(
            config.supervision.backoff_initial_s,
            config.supervision.backoff_max_s,
            config.supervision.stable_after_s,
        ),
        on_change=pipeline.mark_gateway_dirty,
        on_down_too_long=pipeline.report_driver_down,
    )
    pipeline.driver_states = supervisor.states
    router = CommandRouter(
        config.site,
        routes,
        supervisor.drivers,
        outbox,
        profiles=device_profiles(config),
        on_result=pipeline.wake_pump,  # results leave through the outbox
    )
    started = time.time()
    failure: BaseException | None = None
    metrics_config = config.metrics or edge_metrics.from_environment()
    registry = edge_metrics.serve(metrics_config, pipeline, supervisor)  # /metrics if configured
    if registry is not None:
        registry.register(metrics.EDGE_COMMANDS)  # the router's outcomes

    def inflight_by_channel() -> dict[str, int]:
        counts: Counter[str] = Counter()
        for topic, n in client.outstanding_topics().items():
            counts[_channel(topic)] += n
        return dict(counts)

    def health_extra() -> dict[str, Any]:
        assert supervisor is not None
        now = time.monotonic()
        return {
            "started": started,
            "commands": {**router.outcomes, "in_progress": router.in_progress},
            "mqtt": {
                "subscribed": client.subscribed.is_set(),
                "published": client.published,
                # handed to the connection, no PUBACK yet, by channel (event, status, …)
                "inflight": inflight_by_channel(),
                "received": client.messages_received,
                "acked": client.messages_acked,
                "unacknowledged": client.unacknowledged,
                "max_unacknowledged": client.max_unacknowledged,
                "dropped_qos0": client.messages_dropped,
                "receive_maximum_exceeded": client.receive_maximum_exceeded,
            },
            "drivers": {
                s.name: {
                    "state": s.state.value,
                    "restarts": s.restarts,
                    "last_error": s.last_error,
                    "observations": s.observations,
                    "counters": edge_metrics.driver_counters(s.driver),  # line and per device
                    "last_observation_age_s": None
                    if s.last_observation is None
                    else round(now - s.last_observation, 3),
                }
                for s in supervisor.slots.values()
            },
        }

    try:
        async with client:
            tasks = [
                asyncio.create_task(pipeline.event_pump(), name="event-pump"),
                asyncio.create_task(pipeline.gateway_status_loop(), name="gateway-status"),
                asyncio.create_task(pipeline.status_loop(), name="device-status"),
                asyncio.create_task(pipeline.telemetry_loop(), name="telemetry"),
                asyncio.create_task(
                    pipeline.housekeeping_loop(config.state_dir / "health.json", health_extra),
                    name="housekeeping",
                ),
                asyncio.create_task(router.run(client), name="commands"),
                asyncio.create_task(supervisor.run(), name="supervisor"),
            ]
            heap = asyncio.create_task(freeze_when(client.connected)) if freeze_heap else None
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and not task.cancelled():
                    failure = task.exception() or RuntimeError(f"{task.get_name()} returned")
                    log.critical("edge task %s failed", task.get_name(), exc_info=failure)
            if heap is not None:
                heap.cancel()
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            if client.connected.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        client.publish_and_wait(
                            pipeline.gateway_topic, pipeline.gateway_status(False), retain=True
                        ),
                        3,
                    )
    finally:
        await outbox.close()
    if failure is not None:
        raise RuntimeError("edge stopped on an internal failure") from failure
    log.info("edge stopped")


def run_edge(config_path: str | Path) -> int:
    config = load_config(config_path)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_edge_async(config, stop, freeze_heap=True)

    asyncio.run(main())
    return 0
