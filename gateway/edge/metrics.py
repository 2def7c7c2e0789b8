"""Prometheus metrics of the edge (``metrics: {port: …}`` in the site file).

Read at scrape time from the objects that own the numbers (each driver's own
counters, the pipeline's, the supervisor's slots): no second bookkeeping that
could drift from ``health.json``. The edge has its own registry, so a process
that also ingests never mixes the two sets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from device_drivers.model import Driver
from gateway.edge.config import MetricsConfig
from gateway.edge.pipeline import EdgePipeline
from gateway.edge.supervisor import DriverState, Supervisor

__all__ = ["EdgeCollector", "driver_counters", "from_environment", "serve"]

log = logging.getLogger(__name__)


def driver_counters(driver: Driver) -> dict[str, dict[str, int]]:
    """A driver's counters by scope (``line``, or a device address); {} if it fails."""
    try:
        snapshot: Mapping[str, Mapping[str, int]] = driver.counters_snapshot()
        return {scope: dict(counts) for scope, counts in snapshot.items()}
    except Exception:  # a driver bug must not take health reporting down with it
        log.exception("driver counters unavailable")
        return {}


class EdgeCollector(Collector):
    def __init__(self, pipeline: EdgePipeline, supervisor: Supervisor) -> None:
        self.pipeline = pipeline
        self.supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        slots = list(self.supervisor.slots.values())
        line = CounterMetricFamily(
            "eldersafe_edge_driver_line",
            "What a driver saw that did not become an observation, by scope (line or "
            "device address): bad CRC, noise, resyncs, duplicates, decode errors, "
            "failed polls …",
            labels=["driver", "scope", "counter"],
        )
        restarts = CounterMetricFamily(
            "eldersafe_edge_driver_restarts", "driver crashes and restarts", labels=["driver"]
        )
        observations = CounterMetricFamily(
            "eldersafe_edge_driver_observations",
            "observations handed to the edge",
            labels=["driver"],
        )
        running = GaugeMetricFamily(
            "eldersafe_edge_driver_running", "1 while the driver runs", labels=["driver"]
        )
        for slot in slots:
            for scope, counts in driver_counters(slot.driver).items():
                for name, value in counts.items():
                    line.add_metric([slot.name, scope, name], value)
            restarts.add_metric([slot.name], slot.restarts)
            observations.add_metric([slot.name], slot.observations)
            running.add_metric([slot.name], float(slot.state is DriverState.RUNNING))
        yield from (line, restarts, observations, running)

        pipeline = CounterMetricFamily(
            "eldersafe_edge_pipeline",
            "events queued and sent, repeats, telemetry sent and dropped, dead letters …",
            labels=["counter"],
        )
        for name, value in dict(self.pipeline.counters).items():
            pipeline.add_metric([name], value)
        yield pipeline
        unknown = CounterMetricFamily(
            "eldersafe_edge_unknown_address_observations",
            "observations from addresses no device is configured for",
            labels=["driver"],
        )
        per_driver: dict[str, int] = {}
        for key, n in dict(self.pipeline.unknown_addresses).items():
            driver = key.split("/", 1)[0]
            per_driver[driver] = per_driver.get(driver, 0) + n
        for driver, n in per_driver.items():
            unknown.add_metric([driver], n)
        yield unknown
        yield GaugeMetricFamily(
            "eldersafe_edge_outbox_pending",
            "events in the durable outbox, not yet acknowledged by the broker",
            value=self.pipeline.outbox_pending,
        )
        yield GaugeMetricFamily(
            "eldersafe_edge_mqtt_connected",
            "1 while connected to the broker",
            value=float(self.pipeline.client.connected.is_set()),
        )


def from_environment(environ: Mapping[str, str] | None = None) -> MetricsConfig | None:
    """The endpoint ``ELDERSAFE_EDGE_METRICS_PORT`` (and ``_HOST``) ask for: for an edge
    whose site file is generated (``eldersafe simulate`` in docker-compose)."""
    env = os.environ if environ is None else environ
    port = env.get("ELDERSAFE_EDGE_METRICS_PORT")
    if not port:
        return None
    return MetricsConfig(port=int(port), host=env.get("ELDERSAFE_EDGE_METRICS_HOST", "127.0.0.1"))


def serve(
    config: MetricsConfig | None, pipeline: EdgePipeline, supervisor: Supervisor
) -> CollectorRegistry | None:
    """Start the ``/metrics`` endpoint if the site file asks for one."""
    if config is None:
        return None
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EdgeCollector(pipeline, supervisor))
    start_http_server(config.port, addr=config.host, registry=registry)
    log.info("edge metrics on http://%s:%d/metrics", config.host, config.port)
    return registry
