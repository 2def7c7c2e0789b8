"""A command redelivered while its answer is being recorded is a duplicate, never run again.

The interleaving is forced: the outbox's one thread is held so the redelivery's
ledger read lands between the device's action and the recorded answer (where the
ledger still says "received", as it does for a command a restart left unanswered).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

from support import until

import device_drivers  # noqa: F401  registers the shipped profiles
from device_drivers.model import Command
from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.edge.commands import CommandRouter, Route
from gateway.edge.outbox import AsyncOutbox, Outbox
from gateway.mqtt.client import Message


class Receiver:
    """A driver that records what it was told and can be held mid-command."""

    def __init__(self) -> None:
        self.executed: list[Command] = []
        self.started = asyncio.Event()
        self.proceed = asyncio.Event()

    async def run(self, sink: object) -> None:
        await asyncio.Event().wait()

    async def execute(self, command: Command) -> None:
        self.executed.append(command)
        self.started.set()
        await self.proceed.wait()

    def counters_snapshot(self) -> dict[str, object]:
        return {}


async def test_a_redelivery_before_the_answer_is_recorded_is_not_carried_out_again(
    tmp_path: Path,
) -> None:
    box = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3"))
    receiver = Receiver()
    router = CommandRouter(
        "site-a",
        {"btn-03": [Route("rx", "00000003")]},
        {"rx": receiver},  # type: ignore[dict-item]
        box,
        profiles={"btn-03": "es-cb1"},
    )
    payload = CommandPayload(
        v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=now_utc()
    )
    message = Message("eldersafe/v1/site-a/btn-03/command", dump(payload), 1, False, mid=7)
    queue = box._executor._work_queue  # the outbox thread's queue
    gate = threading.Event()
    try:
        first = asyncio.create_task(router.handle(message, lambda: None))
        await asyncio.wait_for(receiver.started.wait(), 5)  # taken, and at the device
        held = asyncio.ensure_future(box._run(gate.wait))  # the outbox thread is busy
        await until(lambda: queue.qsize() == 0, what="the gate running", interval=0.001)
        again = asyncio.create_task(router.handle(message, lambda: None))
        await until(lambda: queue.qsize() == 1, what="the redelivery's ledger read queued",
                    interval=0.001)
        receiver.proceed.set()  # the device is done; its answer queues behind the read
        await until(lambda: queue.qsize() == 2, what="the answer queued", interval=0.001)
        gate.set()
        await held
        await asyncio.wait_for(asyncio.gather(first, again), 10)
        assert len(receiver.executed) == 1, "the command was carried out twice"
        assert router.outcomes["duplicate"] == 1
    finally:
        gate.set()
        await box.close()
