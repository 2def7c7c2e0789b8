"""The event pump: the durable outbox → MQTT at QoS 1, in order, deleted on PUBACK.

Up to ``PUMP_WINDOW`` events are in flight at once. Unacknowledged messages
ride through reconnects inside the client. A refusal the broker will repeat
(payload, topic) dead-letters the event; any other refusal (ACL, quota)
restarts from the head after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

from gateway.edge.outbox import AsyncOutbox
from gateway.mqtt.client import MqttClient, PublishError

log = logging.getLogger(__name__)

PUMP_WINDOW = 200  # events in flight from the outbox at once (well under 65,535)


class EventPump:
    def __init__(self, outbox: AsyncOutbox, client: MqttClient, counters: Counter[str]) -> None:
        self.outbox = outbox
        self.client = client
        self.counters = counters
        self.pending = 0  # outbox backlog as last seen (health)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        backoff = 1.0
        while True:
            inflight: dict[int, asyncio.Future[None]] = {}
            last_seq = 0
            try:
                while True:
                    await self.client.connected.wait()
                    room = PUMP_WINDOW - len(inflight)
                    if room > 0:
                        self._wake.clear()
                        items = await self.outbox.peek(last_seq, room)
                        for item in items:
                            inflight[item.seq] = await self.client.publish(
                                item.topic, item.payload, qos=1
                            )
                            last_seq = item.seq
                    if not inflight:
                        self.pending = 0
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), 5)
                        continue
                    waiters: list[asyncio.Future[Any]] = list(inflight.values())
                    wake: asyncio.Future[Any] | None = None
                    if len(inflight) < PUMP_WINDOW:  # room: new events may join at once
                        wake = asyncio.ensure_future(self._wake.wait())
                        waiters.append(wake)
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if wake is not None:
                            wake.cancel()
                    await self._settle(inflight)
                    backoff = 1.0
            except PublishError as exc:
                log.error("outbox: broker refused an event (%s); retrying from the head", exc)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)

    async def _settle(self, inflight: dict[int, asyncio.Future[None]]) -> None:
        done = [seq for seq, fut in inflight.items() if fut.done()]
        acked: list[int] = []
        for seq in done:
            fut = inflight.pop(seq)
            exc = fut.exception()
            if exc is None:
                acked.append(seq)
            elif isinstance(exc, PublishError) and exc.permanent:
                log.error("outbox: event seq %d dead-lettered: %s", seq, exc)
                await self.outbox.dead_letter(seq, str(exc))
                self.counters["dead_letters"] += 1
            else:
                if acked:
                    await self.outbox.ack(acked)
                raise exc
        if acked:
            await self.outbox.ack(acked)
            self.counters["events_sent"] += len(acked)
