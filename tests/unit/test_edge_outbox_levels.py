"""The outbox answers a repeated level from memory, but never one queued behind a change."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

from support import until

from gateway.edge.outbox import AsyncOutbox, Outbox


def build(event_id: uuid.UUID, phase: str) -> tuple[str, bytes]:
    return "t/smoke", f"{phase}|{event_id}".encode()


async def test_a_raise_queued_behind_a_clear_is_not_taken_for_a_repeat(tmp_path: Path) -> None:
    box = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3"))
    try:
        assert (await box.add_condition("sd-1", "smoke", True, build)).event_id is not None
        # a repeat of the stored level: no event (answered from memory or from disk)
        assert (await box.add_condition("sd-1", "smoke", True, build)).event_id is None

        # hold the outbox's one thread, so the clear is queued and not yet stored
        gate = threading.Event()
        held = asyncio.ensure_future(box._run(gate.wait))
        key = ("sd-1", "smoke")
        clear = asyncio.ensure_future(box.add_condition("sd-1", "smoke", False, build))
        await until(lambda: box._level_calls.get(key) == 1, 5, "the clear queued behind the hold")
        raise_again = asyncio.ensure_future(box.add_condition("sd-1", "smoke", True, build))
        await until(lambda: box._level_calls.get(key) == 2, 5, "the raise queued behind the clear")
        gate.set()
        await held
        cleared, raised = await clear, await raise_again
        assert cleared.event_id is not None
        assert raised.event_id is not None, "the raise after the clear was lost"
        assert box.sync.condition("sd-1", "smoke") is True
        phases = [item.payload.split(b"|")[0] for item in await box.peek(0, 10)]
        assert phases == [b"raise", b"clear", b"raise"]
    finally:
        await box.close()
