"""Keeps one of the server's long-running loops running, whatever ends one run of it.

The engine's intake and timers, the downlink, the notifier passes, the live feed's
reader, the stall guard and the MQTT session each (re)open their connections in one
run and must outlive a database restart or a bug in one pass: ingest and the API run
beside them in the same process. So a run that ends is started again after a backoff,
and the three ways a run ends are told apart:

- a transient error (the database restarting, a connection dropped, a serialization
  failure, a session the stall guard ended): a warning "…; retrying", no traceback;
- an expected but not transient error (``failures``; the engine's other PostgreSQL
  errors): an error line, no traceback;
- anything else is a bug: logged with its traceback, counted (``crashes``) so a loop
  stuck in a crash cycle shows on the dashboards, and the loop restarts.

``asyncio.CancelledError`` always goes through: the server cancels its tasks to stop.

The backoff has the shape of the edge's driver supervisor's (``Backoff``):
0.2 s doubling to 5 s, back to 0.2 s once a run lasted longer than 10 s, so a
database that is down costs a log line every 5 s, not a busy loop, and one that comes
back is reconnected to within 5 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from prometheus_client import Counter


@dataclass(frozen=True, slots=True)
class Backoff:
    """Doubling restart delays, from ``initial_s`` to ``max_s``, back to ``initial_s``
    after a run of ``stable_after_s`` (the edge's driver supervisor uses it too)."""

    initial_s: float = 1.0
    max_s: float = 30.0
    stable_after_s: float = 60.0

    def next(self, current: float) -> float:
        return min(self.max_s, current * 2)

SERVER_LOOP_BACKOFF = Backoff(initial_s=0.2, max_s=5.0, stable_after_s=10.0)


async def run_forever(
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    log: logging.Logger,
    transient: tuple[type[BaseException], ...],
    failures: tuple[type[BaseException], ...] = (),
    crashes: Counter | None = None,
    backoff: Backoff = SERVER_LOOP_BACKOFF,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> NoReturn:
    """Run ``body`` again and again until cancelled; ``name`` starts each log line."""
    delay = backoff.initial_s
    while True:
        started = clock()
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except transient as exc:
            log.warning("%s: %s; retrying", name, exc)
        except failures as exc:
            log.error("%s failed: %s; retrying", name, exc)
        except Exception:
            log.exception("%s crashed; restarting it", name)
            if crashes is not None:
                crashes.inc()
        if clock() - started > backoff.stable_after_s:
            delay = backoff.initial_s
        await sleep(delay)
        delay = backoff.next(delay)
