"""``eldersafe server``: migrations, MQTT ingest, telemetry retention and metrics in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import psycopg

from gateway.alerts.workers import EngineWorkers
from gateway.config import Settings
from gateway.contract.topics import ALL_TOPICS
from gateway.db.migrate import migrate
from gateway.db.retention import drop_old_telemetry
from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import IngestStore
from gateway.mqtt.consumer import MqttConsumer, MqttEndpoint

log = logging.getLogger(__name__)


def subscription_filters(settings: Settings) -> list[str]:
    prefix = f"$share/{settings.mqtt_shared_group}/" if settings.mqtt_shared_group else ""
    return [prefix + ALL_TOPICS]


async def retention_loop(settings: Settings) -> None:
    keep = timedelta(days=settings.telemetry_retention_days)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
                dropped = await drop_old_telemetry(conn, keep)
                if dropped:
                    log.info("retention: dropped %d telemetry chunks older than %s", dropped, keep)
        except psycopg.Error as exc:
            log.warning("retention run failed: %s", exc)
        await asyncio.sleep(settings.retention_check_interval_s)


async def serve(settings: Settings) -> None:
    await asyncio.to_thread(migrate, settings.database_url)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr="127.0.0.1")
    store = IngestStore(settings.database_url)
    pipeline = IngestPipeline(store)
    consumer = MqttConsumer(
        MqttEndpoint(
            settings.mqtt_host, settings.mqtt_port, settings.mqtt_username, settings.mqtt_password
        ),
        client_id=settings.mqtt_client_id,
        filters=subscription_filters(settings),
        on_publish=pipeline.on_publish,
        keepalive=settings.mqtt_keepalive_s,
        session_expiry_s=settings.mqtt_session_expiry_s,
    )
    pipeline.attach(consumer)
    tasks = [
        asyncio.create_task(consumer.run(), name="mqtt"),
        asyncio.create_task(pipeline.run(), name="ingest"),
        asyncio.create_task(retention_loop(settings), name="retention"),
        asyncio.create_task(
            EngineWorkers(settings.database_url, settings.mqtt_username, settings.engine_clock,
                          settings.engine_poll_s).run(), name="alert-engine"),
    ]
    log.info("server running: mqtt %s:%d", settings.mqtt_host, settings.mqtt_port)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        await consumer.close()
        await store.close()


def run_server(settings: Settings) -> None:
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
