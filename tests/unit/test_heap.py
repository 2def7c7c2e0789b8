"""The start-up heap is frozen once start-up is done, and only then (gateway/heap.py)."""

from __future__ import annotations

import asyncio
import gc

from gateway.heap import freeze_when


class WatchedEvent(asyncio.Event):
    """An event that says when someone has started waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_on = asyncio.Event()

    async def wait(self) -> bool:  # type: ignore[override]
        self.waited_on.set()
        return await super().wait()


def test_freeze_waits_for_start_up_then_keeps_the_heap_out_of_collections() -> None:
    async def scenario() -> tuple[int, int]:
        ready = WatchedEvent()
        task = asyncio.create_task(freeze_when(ready))
        await ready.waited_on.wait()  # the task is parked on start-up's end
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
