"""``eldersafe server``: migrations, MQTT ingest, telemetry retention and metrics in one process.

The server also keeps the record of its own MQTT session: when it was last seen
alive (``mqtt_server_sessions``) and every incident (``mqtt_session_incidents``).
A restarted server whose broker has no session although the record says the
session cannot have expired yet reports it as lost: the messages queued for it
in between are gone (a broker restarted without its persistence file, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from datetime import timedelta

import psycopg

from gateway.alerts.downlink import DownlinkWorkers
from gateway.alerts.inline import intake_in_transaction
from gateway.alerts.workers import EngineWorkers
from gateway.api import privacy
from gateway.api.app import serve_api
from gateway.config import Settings
from gateway.contract.topics import ALL_TOPICS
from gateway.db.migrate import migrate
from gateway.db.retention import (
    create_chunks_ahead,
    delete_old_sensitive_telemetry,
    drop_old_telemetry,
)
from gateway.db.stall_guard import guard_loop, guarded
from gateway.heap import freeze_when
from gateway.ingest.pipeline import IngestPipeline
from gateway.ingest.store import AlarmStore, IngestStore
from gateway.mqtt.consumer import MqttConsumer, MqttEndpoint, SessionIncident
from gateway.notify.runner import runner_from

log = logging.getLogger(__name__)

_SESSION_RECORD = """
SELECT last_seen_at, expiry_s FROM mqtt_server_sessions
WHERE client_id = %s AND last_seen_at + make_interval(secs => expiry_s) > now()
"""
_SESSION_SEEN = """
INSERT INTO mqtt_server_sessions (client_id, last_seen_at, expiry_s) VALUES (%s, now(), %s)
ON CONFLICT (client_id) DO UPDATE SET
    last_seen_at = excluded.last_seen_at, expiry_s = excluded.expiry_s
"""
_INCIDENT = "INSERT INTO mqtt_session_incidents (client_id, kind, detail) VALUES (%s, %s, %s)"


def subscription_filters(settings: Settings) -> list[str]:
    prefix = f"$share/{settings.mqtt_shared_group}/" if settings.mqtt_shared_group else ""
    return [prefix + ALL_TOPICS]


async def retention_loop(settings: Settings) -> None:
    keep = timedelta(days=settings.telemetry_retention_days)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                settings.database_url, autocommit=True
            ) as conn:
                ahead = await create_chunks_ahead(conn)
                if ahead:
                    log.info("chunks: created %d ahead of their first rows", ahead)
                dropped = await drop_old_telemetry(conn, keep)
                if dropped:
                    log.info("retention: dropped %d telemetry chunks older than %s", dropped, keep)
                sensitive = await delete_old_sensitive_telemetry(
                    conn, timedelta(days=settings.sensitive_retention_days),
                    privacy.LOCATION_METRICS | privacy.HEALTH_METRICS, privacy.HEALTH_PROFILES)
                if sensitive:
                    log.info("retention: deleted %d health and position readings", sensitive)
        except psycopg.Error as exc:
            log.warning("retention run failed: %s", exc)
        await asyncio.sleep(settings.retention_check_interval_s)


async def expected_session(dsn: str, client_id: str) -> str | None:
    """Why the broker should still hold our session, from the record; None if it need not."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(_SESSION_RECORD, (client_id,))
        row = await cur.fetchone()
    if row is None:
        return None
    return f"this server had it at {row[0]:%Y-%m-%d %H:%M:%S %Z} with an expiry of {row[1]} s"


async def session_heartbeat_loop(settings: Settings, consumer: MqttConsumer) -> None:
    """Record the session as alive at each new session and every heartbeat interval."""
    while True:
        await consumer.connected.wait()
        consumer.session_up.clear()
        try:
            async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
                await conn.execute(
                    _SESSION_SEEN, (consumer.client_id, settings.mqtt_session_expiry_s)
                )
        except (psycopg.Error, OSError) as exc:
            log.warning("could not record the mqtt session as alive: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer.session_up.wait(), settings.mqtt_session_heartbeat_s)


async def incident_loop(dsn: str, incidents: asyncio.Queue[SessionIncident]) -> None:
    """Store each session incident (the console shows them); wait out a database outage."""
    while True:
        incident = await incidents.get()
        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn) as conn:
                    await conn.execute(
                        _INCIDENT, (incident.client_id, incident.kind, incident.detail)
                    )
                break
            except (psycopg.OperationalError, OSError) as exc:
                log.warning("could not store the session incident (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except psycopg.Error as exc:
                log.error("session incident not stored: %s (%s)", exc, incident)
                break


async def serve(settings: Settings) -> None:
    # Every session of this server declares how long it may stall inside a transaction
    # (the API's, ingest's; the engine's workers, notifier and downlink set their own):
    # every server's guard ends such sessions of a stopped server (gateway/db/stall_guard.py).
    dsn = settings.database_url
    settings = settings.model_copy(update={"database_url": guarded(
        dsn, settings.mqtt_username, settings.engine_stalled_s)})  # fmt: skip
    notifier = runner_from(settings)  # refuses the demo's webhook key in production
    settings.check_api_secrets()
    await asyncio.to_thread(migrate, settings.database_url)
    if settings.metrics_port:
        from prometheus_client import REGISTRY, start_http_server

        from gateway.metrics_district import DistrictCollector

        # district-wide alert series, read from the database at scrape time
        REGISTRY.register(
            DistrictCollector(settings.database_url, cache_s=settings.metrics_district_cache_s)
        )
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    store = IngestStore(settings.database_url)
    # device events on a connection of their own, never behind a telemetry COPY in
    # flight, their alerts raised in the same transaction (gateway/alerts/inline.py)
    alarm_store = AlarmStore(
        settings.database_url,
        after_events=functools.partial(
            intake_in_transaction, clock=settings.engine_clock, worker=settings.mqtt_username
        ),
    )
    # before the session is up: the first alarm must not pay for a cold path (a new
    # chunk, a new session's first plans, this process's first use of the intake)
    try:
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True
        ) as conn:
            await create_chunks_ahead(conn)
    except psycopg.Error as exc:  # the retention loop tries again
        log.warning("chunks not created ahead: %s", exc)
    await alarm_store.rehearse()
    pipeline = IngestPipeline(store, alarm_store=alarm_store)
    incidents: asyncio.Queue[SessionIncident] = asyncio.Queue()
    # the broker names the session after the account (use_username_as_clientid)
    client_id = settings.mqtt_username
    consumer = MqttConsumer(
        MqttEndpoint(
            settings.mqtt_host, settings.mqtt_port, settings.mqtt_username, settings.mqtt_password
        ),
        client_id=client_id,
        filters=subscription_filters(settings),
        on_publish=pipeline.on_publish,
        keepalive=settings.mqtt_keepalive_s,
        session_expiry_s=settings.mqtt_session_expiry_s,
        on_incident=incidents.put_nowait,
        expected_session=await expected_session(settings.database_url, client_id),
    )
    pipeline.attach(consumer)
    engine = EngineWorkers(settings.database_url, settings.mqtt_username, settings.engine_clock,
                           settings.engine_poll_s, stalled_s=settings.engine_stalled_s)
    tasks = [
        asyncio.create_task(consumer.run(), name="mqtt"),
        asyncio.create_task(pipeline.run(), name="ingest"),
        asyncio.create_task(retention_loop(settings), name="retention"),
        asyncio.create_task(session_heartbeat_loop(settings, consumer), name="session-record"),
        asyncio.create_task(incident_loop(settings.database_url, incidents), name="incidents"),
        # the engine shares this loop with ingest and the API (issue 8): its intake's
        # time goes to its own statements, not to waiting for the loop (bench/README.md)
        asyncio.create_task(engine.run_intake(), name="engine-intake"),
        asyncio.create_task(engine.run_timers(), name="engine-timers"),
        asyncio.create_task(notifier.run(), name="notifiers"),
        asyncio.create_task(
            guard_loop(dsn, min(max(settings.engine_stalled_s / 4, 0.1), 5.0)), name="stall-guard"
        ),
        asyncio.create_task(
            DownlinkWorkers(settings.database_url, consumer, settings.mqtt_username,
                            settings.engine_clock, settings.engine_poll_s).run(),
            name="downlink"),
        # once the session is up (the start-up heap is built): no full collection
        # walks it again with the loop stopped (gateway/heap.py)
        asyncio.create_task(freeze_when(consumer.session_up), name="heap"),
    ]
    if settings.api_port:
        tasks.append(asyncio.create_task(serve_api(settings), name="api"))
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
        await alarm_store.close()


def run_server(settings: Settings) -> None:
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
