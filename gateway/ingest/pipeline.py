"""The ingest pipeline: receive → classify → write batch → acknowledge.

Batches form by themselves: while one batch is being written the next one
fills, so a quiet system commits each message at once and a busy one writes
thousands per transaction. A message is acknowledged to the broker only after
its batch committed. While the database is down the batch is retried with
backoff and reading pauses at a high-water mark, so the broker keeps the rest
in the persistent session.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg

from gateway import metrics
from gateway.ingest.batch import Batch, Classifier
from gateway.ingest.store import IngestStore
from gateway.mqtt.codec import Publish
from gateway.mqtt.consumer import MqttConsumer

log = logging.getLogger(__name__)


class IngestPipeline:
    def __init__(
        self,
        store: IngestStore,
        *,
        high_water: int = 60_000,
    ) -> None:
        self.store = store
        self.classifier = Classifier()
        self.high_water = high_water
        self.consumer: MqttConsumer | None = None
        self._batch = Batch()
        self._wake = asyncio.Event()
        self._pending = 0
        self.batches_written = 0
        self.acked = 0  # messages made durable and acknowledged (a figure for bench and tests)

    def attach(self, consumer: MqttConsumer) -> None:
        self.consumer = consumer

    # Called from the socket read path for every PUBLISH.
    def on_publish(self, epoch: int, pub: Publish) -> None:
        batch = self._batch
        self.classifier.add(batch, pub.topic, pub.payload)
        if pub.packet_id is not None:
            acks = batch.acks.get(epoch)
            if acks is None:
                acks = batch.acks[epoch] = []
            acks.append(pub.packet_id)
        self._pending += 1
        if self._pending >= self.high_water and self.consumer is not None:
            self.consumer.pause()
        self._wake.set()

    async def run(self) -> None:
        """Write batches until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._batch:
                continue
            batch, self._batch = self._batch, Batch()
            await self._commit(batch)
            self._acknowledge(batch)

    async def _commit(self, batch: Batch) -> None:
        """Make the batch durable; a message the database refuses becomes a dead letter."""
        started = time.perf_counter()
        try:
            await self._write_until_durable(batch)
        except psycopg.Error as exc:
            metrics.INGEST_STORE_ERRORS.inc()
            log.error("batch refused by the database (%s); writing its messages one by one", exc)
            for topic, payload in batch.raw:
                single = Batch()
                self.classifier.add(single, topic, payload)
                try:
                    await self._write_until_durable(single)
                except psycopg.Error as single_exc:
                    dead = (topic, payload, f"refused by the database: {single_exc}")
                    await self._write_until_durable(Batch(dead=[dead]))
                    batch.dead.append(dead)
        metrics.INGEST_BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _write_until_durable(self, batch: Batch) -> None:
        """Retry while the database is unreachable; raise what retrying cannot cure."""
        backoff = 0.1
        while True:
            try:
                await self.store.write(batch)
                return
            except (psycopg.OperationalError, OSError) as exc:
                metrics.INGEST_STORE_ERRORS.inc()
                log.warning("ingest store unavailable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _acknowledge(self, batch: Batch) -> None:
        consumer = self.consumer
        if consumer is not None:
            for epoch, ids in batch.acks.items():
                consumer.ack(epoch, ids)
        self.batches_written += 1
        self.acked += batch.messages
        self._pending -= batch.messages
        metrics.INGEST_PENDING.set(self._pending)
        metrics.INGEST_MESSAGES.inc(batch.messages)
        metrics.INGEST_TELEMETRY_ROWS.inc(len(batch.telemetry))
        metrics.INGEST_EVENTS.inc(len(batch.events))
        if batch.dead:
            metrics.DEAD_LETTERS.inc(len(batch.dead))
            for topic, _, reason in batch.dead:
                log.info("dead letter on %s: %s", topic, reason)
        if batch.ignored:
            metrics.INGEST_IGNORED.inc(batch.ignored)
        if consumer is not None and self._pending < self.high_water // 2:
            consumer.resume()
