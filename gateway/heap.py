"""The interpreter's heap after start-up, moved out of the garbage collector's way.

A long-running process builds most of its objects once (modules, pydantic models, the
API's routes, profiles): ≈ 115,000 in ``eldersafe server``. CPython's oldest generation
is collected when enough objects survived into it, and such a collection walks every
one of them: 30-90 ms with the event loop stopped, measured during bench/alert_latency.py,
long enough to put an alarm behind by that much. ``gc.freeze()`` (the approach of
CPython's own documentation for pre-fork servers, and of Instagram's Django fleet) moves
the start-up heap into a permanent generation the collector never walks; objects made
afterwards are collected as before, so no cycle leaks."""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def freeze_when(ready: asyncio.Event) -> None:
    """Freeze once ``ready`` is set (start-up done: the session or the drivers are up)."""
    await ready.wait()
    frozen = freeze_startup_heap()
    log.info("start-up heap frozen: %d objects kept out of collections", frozen)
