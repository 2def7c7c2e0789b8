"""The start-up heap is frozen once start-up is done, and only then (gateway/heap.py)."""

from __future__ import annotations

import asyncio
import gc

from gateway.heap import freeze_when


def test_freeze_waits_for_start_up_then_keeps_the_heap_out_of_collections() -> None:
    async def scenario() -> tuple[int, int]:
        ready = asyncio.Event()
        task = asyncio.create_task(freeze_when(ready))
        for _ in range(5):
            await asyncio.sleep(0)
        before = gc.get_freeze_count()
        ready.set()
        await task
        return before, gc.get_freeze_count()

    try:
        before, after = asyncio.run(scenario())
    finally:
        gc.unfreeze()
    assert before == 0  # nothing frozen while start-up is under way
    assert after > 10_000  # the interpreter's and the test's modules, at least
