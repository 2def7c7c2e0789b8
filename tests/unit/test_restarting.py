"""``run_forever`` restarts a server loop after any failure with a capped, resetting
backoff, tells transient errors from bugs in its log and metric, and stops only when
cancelled.

Time is injected: the sleep records each delay and moves a virtual clock, the loop's
body moves it to stand for a run's length, so nothing waits on the wall clock and
every run takes the same path. The bodies are plain coroutines (what is under test
is the loop around them, not a database).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.restarting import SERVER_LOOP_BACKOFF, run_forever

pytestmark = pytest.mark.timeout(20)

LOG = logging.getLogger("tests.restarting")


class Transient(Exception):
    """Stands for a dropped connection."""


class Failure(Exception):
    """Stands for an expected, non-transient database error."""


class Enough(BaseException):
    """Ends a test's loop from its sleep; the helper must not catch it."""


class VirtualTime:
    """The loop's ``clock`` and ``sleep``: the sleep records its delay and moves the
    clock by it, and raises ``Enough`` once ``sleeps`` delays are recorded."""

    def __init__(self, sleeps: int) -> None:
        self.now = 1_000.0
        self.delays: list[float] = []
        self.sleeps = sleeps

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay
        if len(self.delays) >= self.sleeps:
            raise Enough


def scripted(
    time: VirtualTime, runs: Iterator[tuple[float, BaseException | None]]
) -> Callable[[], Awaitable[None]]:
    """A body whose n-th run lasts ``runs[n][0]`` virtual seconds, then raises
    ``runs[n][1]`` (None: returns)."""

    async def body() -> None:
        lasted, error = next(runs)
        time.now += lasted
        if error is not None:
            raise error

    return body


def crash_counter() -> tuple[Counter, Callable[[], float]]:
    registry = CollectorRegistry()
    counter = Counter("test_loop_crashes", "loops restarted after a bug", registry=registry)
    return counter, lambda: registry.get_sample_value("test_loop_crashes_total") or 0.0


async def drive(time: VirtualTime, body: Callable[[], Awaitable[None]], **options: Any) -> None:
    with pytest.raises(Enough):
        await run_forever(
            "test loop",
            body,
            log=LOG,
            transient=(Transient,),
            sleep=time.sleep,
            clock=time.clock,
            **options,
        )


def test_the_server_policy_is_the_documented_one() -> None:
    assert SERVER_LOOP_BACKOFF.initial_s == 0.2
    assert SERVER_LOOP_BACKOFF.max_s == 5.0
    assert SERVER_LOOP_BACKOFF.stable_after_s == 10.0


async def test_transient_errors_are_retried_with_doubling_delays_capped_at_five_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = VirtualTime(sleeps=8)
    crashes, crashed = crash_counter()
    runs = iter([(0.01, Transient(f"connection refused ({n})")) for n in range(8)])
    caplog.set_level(logging.DEBUG, LOG.name)
    await drive(time, scripted(time, runs), crashes=crashes)
    assert time.delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    warnings = [r for r in caplog.records if r.name == LOG.name]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 8
    assert warnings[0].getMessage() == "test loop: connection refused (0); retrying"
    assert all(r.exc_info is None for r in warnings), "a transient error has no traceback"
    assert crashed() == 0


async def test_a_run_longer_than_ten_seconds_resets_the_backoff() -> None:
    time = VirtualTime(sleeps=8)
    down = Transient("server closed the connection")
    runs = iter([
        (0.0, down), (0.0, down), (0.0, down), (0.0, down),  # 0.2 0.4 0.8 1.6
        (10.5, down),  # up for a while: back to the first delay
        (0.0, down),
        (9.5, down),  # not long enough: the backoff goes on
        (0.0, down),
    ])  # fmt: skip
    await drive(time, scripted(time, runs))
    assert time.delays == [0.2, 0.4, 0.8, 1.6, 0.2, 0.4, 0.8, 1.6]


async def test_a_bug_is_logged_with_its_traceback_counted_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = VirtualTime(sleeps=3)
    crashes, crashed = crash_counter()
    runs = iter([(0.0, KeyError("site")), (0.0, Transient("reset")), (0.0, ValueError("nan"))])
    caplog.set_level(logging.DEBUG, LOG.name)
    await drive(time, scripted(time, runs), crashes=crashes)
    assert time.delays == [0.2, 0.4, 0.8], "each crash is followed by the next run"
    records = [r for r in caplog.records if r.name == LOG.name]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "test loop crashed; restarting it"),
        (logging.WARNING, "test loop: reset; retrying"),
        (logging.ERROR, "test loop crashed; restarting it"),
    ]
    assert records[0].exc_info is not None and records[0].exc_info[0] is KeyError
    assert records[2].exc_info is not None and records[2].exc_info[0] is ValueError
    assert crashed() == 2


async def test_expected_failures_are_logged_as_errors_without_traceback_and_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = VirtualTime(sleeps=1)
    crashes, crashed = crash_counter()
    caplog.set_level(logging.DEBUG, LOG.name)
    runs = iter([(0.0, Failure("duplicate key"))])
    await drive(time, scripted(time, runs), failures=(Failure,), crashes=crashes)
    (record,) = [r for r in caplog.records if r.name == LOG.name]
    assert (record.levelno, record.getMessage()) == (
        logging.ERROR,
        "test loop failed: duplicate key; retrying",
    )
    assert record.exc_info is None
    assert crashed() == 0


async def test_a_run_that_returns_is_started_again_after_the_backoff() -> None:
    time = VirtualTime(sleeps=3)
    runs = iter([(0.0, None), (0.0, None), (0.0, None)])
    await drive(time, scripted(time, runs))
    assert time.delays == [0.2, 0.4, 0.8]


async def test_cancellation_from_the_body_ends_the_loop_at_once() -> None:
    time = VirtualTime(sleeps=99)
    crashes, crashed = crash_counter()
    runs = iter([(0.0, Transient("reset")), (0.0, asyncio.CancelledError())])
    with pytest.raises(asyncio.CancelledError):
        await run_forever(
            "test loop",
            scripted(time, runs),
            log=LOG,
            # even a caller whose "transient" set is too wide cannot swallow a shutdown
            transient=(BaseException,),
            crashes=crashes,
            sleep=time.sleep,
            clock=time.clock,
        )
    assert time.delays == [0.2], "no sleep after the cancellation"
    assert crashed() == 0


async def test_cancelling_the_task_while_it_waits_out_a_backoff_ends_it() -> None:
    backing_off = asyncio.Event()
    never = asyncio.Event()

    async def sleep(delay: float) -> None:
        backing_off.set()
        await never.wait()

    async def body() -> None:
        raise Transient("refused")

    task = asyncio.create_task(
        run_forever("test loop", body, log=LOG, transient=(Transient,), sleep=sleep)
    )
    await backing_off.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
