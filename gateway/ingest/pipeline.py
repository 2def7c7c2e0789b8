"""The ingest pipeline: receive → classify → write batch → acknowledge.

Batches form by themselves: while one batch is being written the next one
fills, so a quiet system commits each message at once and a busy one writes
thousands per transaction. A batch closes at a bounded size, so under a
backlog the socket keeps being read and parsed while the database writes:
parsing and writing overlap instead of taking turns. A message is acknowledged
to the broker only after its batch committed. While the database is down the
batch is retried with backoff and reading pauses at a high-water mark, so the
broker keeps the rest in the persistent session.

Device events (sos, fall, smoke …: the alarm path) travel in a lane of their
own with its own store and connection: an event is committed at once, not
behind a telemetry COPY of thousands of rows in flight (issue 7's device →
alert latency). Each lane acknowledges only the packet ids of its own
committed batches (a PUBACK names its packet id; order between lanes is free).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import psycopg

from gateway import metrics
from gateway.ingest.batch import Batch, Classifier, DeadLetter, DeadReason, internal_dead_letter
from gateway.ingest.store import BatchStore
from gateway.mqtt.codec import Publish
from gateway.mqtt.consumer import MqttConsumer

log = logging.getLogger(__name__)

# SQLSTATE classes that pass by themselves: connection exception, insufficient
# resources, operator intervention (shutdown, query cancelled), transaction
# rollback (deadlock, serialization), system error. Anything else a batch can
# cause by its content, so it is isolated instead of retried forever.
_TRANSIENT_CLASSES = frozenset({"08", "53", "57", "40", "58"})


def transient(exc: BaseException) -> bool:
    """Whether retrying the same batch later can succeed (the database is away or busy)."""
    if isinstance(exc, OSError | psycopg.InterfaceError):
        return True  # no connection, or a connection closed under us: the store reconnects
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state[:2] in _TRANSIENT_CLASSES
    return False


class _Lane:
    """Batches of one kind of traffic and the store that writes them, one at a time."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store
        self.batch = Batch()
        self.closed: deque[Batch] = deque()  # full batches waiting for the writer
        self.wake = asyncio.Event()


class IngestPipeline:
    def __init__(
        self,
        store: BatchStore,
        *,
        alarm_store: BatchStore | None = None,
        high_water: int = 100_000,
        batch_messages: int = 8192,
        batch_rows: int = 50_000,
    ) -> None:
        """``alarm_store``: a store of its own for device events (None: one lane for all)."""
        self.store = store
        self.classifier = Classifier()
        # Reading pauses at this many messages not yet durable. QoS 1 never gets there:
        # the broker stops at the session's Receive Maximum (65,535) unacknowledged.
        # It bounds memory against a flood of QoS 0 telemetry while the database is away.
        self.high_water = high_water
        # A batch closes at these sizes so that, under a backlog, the next ones fill
        # (and are parsed) while one is written: the broker keeps sending as long as
        # unacknowledged messages stay below the session's Receive Maximum (65,535).
        self.batch_messages = batch_messages
        self.batch_rows = batch_rows
        self.consumer: MqttConsumer | None = None
        self._bulk = _Lane(store)
        self._alarm = _Lane(alarm_store) if alarm_store is not None else None
        self._pending = 0
        self.batches_written = 0
        self.acked = 0  # messages made durable and acknowledged (a figure for bench and tests)

    def attach(self, consumer: MqttConsumer) -> None:
        self.consumer = consumer

    # Called from the socket read path for every PUBLISH: must never raise.
    def on_publish(self, epoch: int, pub: Publish) -> None:
        lane = self._bulk
        if self._alarm is not None and self.classifier.is_event(pub.topic):
            lane = self._alarm
        batch = lane.batch
        if batch.messages >= self.batch_messages or batch.telemetry_rows >= self.batch_rows:
            lane.closed.append(batch)
            batch = lane.batch = Batch()
        if not batch.messages:
            batch.arrived = time.monotonic()
        try:
            self.classifier.add(batch, pub.topic, pub.payload, pub.dup)
        except Exception as exc:
            batch.dead.append(internal_dead_letter(pub.topic, pub.payload, exc, pub.dup))
        if pub.packet_id is not None:
            acks = batch.acks.get(epoch)
            if acks is None:
                acks = batch.acks[epoch] = []
            acks.append(pub.packet_id)
        self._pending += 1
        if self._pending >= self.high_water and self.consumer is not None:
            self.consumer.pause()
        lane.wake.set()

    async def run(self) -> None:
        """Write batches until cancelled; no message and no database error ends it."""
        lanes = [self._bulk] if self._alarm is None else [self._alarm, self._bulk]
        await asyncio.gather(*(self._write_lane(lane) for lane in lanes))

    async def _write_lane(self, lane: _Lane) -> None:
        while True:
            if lane.closed:
                batch = lane.closed.popleft()
            elif lane.batch:
                batch, lane.batch = lane.batch, Batch()
            else:
                await lane.wake.wait()
                lane.wake.clear()
                continue
            await self._commit(lane.store, batch)
            self._acknowledge(batch)

    async def _commit(self, store: BatchStore, batch: Batch) -> None:
        """Make the batch durable; a message the database refuses becomes a dead letter."""
        started = time.perf_counter()
        try:
            await self._write_until_durable(store, batch)
        except Exception as exc:
            metrics.INGEST_STORE_ERRORS.inc()
            log.error(
                "batch of %d messages refused (%s: %s); isolating the cause",
                batch.messages,
                type(exc).__name__,
                exc,
            )
            batch.dead = await self._isolate(store, batch.raw)
        elapsed = time.perf_counter() - started
        metrics.INGEST_BATCH_SECONDS.observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch of %d messages, %d rows durable in %.1f ms; %d waiting",
                batch.messages, batch.telemetry_rows, elapsed * 1000, self._pending,
            )  # fmt: skip

    async def _isolate(
        self, store: BatchStore, raw: list[tuple[str, bytes, bool]]
    ) -> list[DeadLetter]:
        """Write ``raw`` in halves until each refused message stands alone as a dead letter.

        Bisecting costs about 2·log2(n) extra transactions per poison message,
        not one per message of the batch. Returns every dead letter written.
        """
        dead: list[DeadLetter] = []
        pending = [raw]
        while pending:
            part = pending.pop()
            sub = Batch()
            for topic, payload, dup in part:
                self.classifier.add(sub, topic, payload, dup)
            try:
                await self._write_until_durable(store, sub)
                dead.extend(sub.dead)
                continue
            except Exception as exc:
                if len(part) > 1:
                    half = len(part) // 2
                    pending += [part[half:], part[:half]]
                    continue
                topic, payload, dup = part[0]
                kind = (
                    DeadReason.DATABASE if isinstance(exc, psycopg.Error) else DeadReason.INTERNAL
                )
                letter = DeadLetter(
                    topic, payload, f"refused on writing: {type(exc).__name__}: {exc}"[:1000],
                    kind, dup,
                )  # fmt: skip
            await self._write_dead_letter(store, letter)
            dead.append(letter)
        return dead

    async def _write_dead_letter(self, store: BatchStore, letter: DeadLetter) -> None:
        """A dead letter must be stored before its message is acknowledged; never give up."""
        backoff = 0.1
        attempt = letter
        while True:
            try:
                await self._write_until_durable(store, Batch(dead=[attempt]))
                return
            except Exception as exc:
                metrics.INGEST_STORE_ERRORS.inc()
                log.error("dead letter not stored (%s: %s); retrying", type(exc).__name__, exc)
                # the bare minimum a dead_letters row needs, in case the text was the cause
                attempt = DeadLetter(
                    "(unstorable topic)", letter.payload, "internal error: dead letter refused",
                    DeadReason.INTERNAL, letter.dup,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _write_until_durable(self, store: BatchStore, batch: Batch) -> None:
        """Retry while the database is unreachable; raise what retrying cannot cure."""
        backoff = 0.1
        while True:
            try:
                await store.write(batch)
                return
            except Exception as exc:
                if not transient(exc):
                    raise
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
        metrics.INGEST_BATCH_MESSAGES.observe(batch.messages)
        if batch.arrived:
            metrics.INGEST_LAG.observe(time.monotonic() - batch.arrived)
        metrics.INGEST_TELEMETRY_ROWS.inc(batch.telemetry_rows)
        metrics.INGEST_EVENTS.inc(len(batch.events))
        for letter in batch.dead:
            metrics.DEAD_LETTERS.labels(letter.kind.value).inc()
            log.info(
                "dead letter (%s) on %.200r: %s", letter.kind.value, letter.topic, letter.reason
            )
        if batch.command_results:
            metrics.INGEST_COMMAND_RESULTS.inc(len(batch.command_results))
        if batch.ignored:
            metrics.INGEST_IGNORED.inc(batch.ignored)
        if consumer is not None and self._pending < self.high_water // 2:
            consumer.resume()
