"""``on_own_loop``: the server runs the engine's intake on an event loop of its own in a
thread; its end, its failure and its cancellation must reach the server's task."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.alerts.workers import on_own_loop


async def test_work_runs_on_another_thread_and_loop_and_its_error_comes_back() -> None:
    outer_loop = asyncio.get_running_loop()
    seen: list[tuple[str, bool]] = []

    async def work() -> None:
        seen.append((threading.current_thread().name, asyncio.get_running_loop() is outer_loop))
        raise ValueError("from the intake")

    with pytest.raises(ValueError, match="from the intake"):
        await on_own_loop(work, "engine-intake-test")
    assert seen == [("engine-intake-test", False)]


async def test_cancelling_cancels_the_work_and_waits_for_its_thread() -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = asyncio.create_task(on_own_loop(work, "engine-intake-test"))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()  # set before the thread ended, and the task waited for it
    assert not any(t.name == "engine-intake-test" for t in threading.enumerate())
