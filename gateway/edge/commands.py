"""Downlink: ``…/{device}/command`` → the driver that carries the device → a result on MQTT.

A command is how staff tell an elder "help is coming" (wristband vibrates,
button LED steady) or hush a sounder, and the console must learn whether it
happened. So every command id ends in exactly one ``CommandResultPayload`` on
``…/{device}/command/result``: executed (and via which driver), refused (with
the reason: unknown device, an action the device's profile does not list, a
bad payload, the device said no) or unreachable (no answer after the retries).

What the router promises, and how:

* Taken before acknowledged. A command is recorded in the outbox's ledger
  (``take_command``) before its PUBLISH is acknowledged to the broker (the MQTT
  client acknowledges only on ``ack``, in arrival order). A command the broker
  has forgotten is therefore on disk; one the edge could not record is still
  the broker's, which sends it again on the next connection.
* Bounded. The broker may have at most the client's Receive Maximum commands
  unacknowledged with us; at most ``max_tasks`` are handled at once, and the
  router takes no new message while all are busy.
* Once per id. A redelivered id re-publishes its recorded result instead of
  running again; a command taken but not answered when the edge died is
  carried out on the next start (the device may then see it twice; it was
  never answered, and for these actions twice is harmless).
* Results are durable: the answer and its result message are written in one
  transaction into the outbox queue, which survives a broker outage and an
  edge restart and deletes only on PUBACK.
* Capabilities are checked before the wire: the device's profile lists what
  it can do (``Profile.commands``). An es-ef1 has no hush coil, so ``hush``
  to it is refused, never written.

A device heard by several drivers (a button on two receivers) is tried on each
in turn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from pydantic import ValidationError

from device_drivers import profiles as device_profiles
from device_drivers.model import Command, CommandError, Driver
from device_drivers.model import CommandAction as DriverAction
from gateway import metrics
from gateway.contract.payloads import (
    CommandAction,
    CommandOutcome,
    CommandPayload,
    CommandResultPayload,
    dump,
    now_utc,
)
from gateway.contract.topics import Channel, DeviceTopic, TopicError, parse_topic
from gateway.edge.outbox import RECEIVED, AsyncOutbox, TakenCommand
from gateway.mqtt.client import Message, MqttClient

log = logging.getLogger(__name__)

T = TypeVar("T")

_REASON_MAX = 256  # CommandResultPayload.reason
_LENIENT_MAX = 64 * 1024  # an invalid payload larger than this is not searched for its id
_PURGE_EVERY_S = 3600.0


@dataclass(frozen=True, slots=True)
class Route:
    driver: str
    address: str


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: CommandOutcome
    reason: str | None = None
    via: str | None = None  # the driver that carried it out


@dataclass(frozen=True, slots=True)
class Incoming:
    """A command with an id and an action: it gets a result, even when refused."""

    device: str
    command_id: uuid.UUID
    action: CommandAction
    alert_id: uuid.UUID | None
    payload: CommandPayload | None  # None: the payload failed validation
    refusal: str | None = None  # decided on arrival (bad payload)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _identify(raw: bytes) -> tuple[uuid.UUID, CommandAction, uuid.UUID | None] | None:
    """An invalid command's id and action, when they can be read (to answer it)."""
    if len(raw) > _LENIENT_MAX:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            return None
        command_id = uuid.UUID(str(data["command_id"]))
        action = CommandAction(data["action"])
        alert = data.get("alert_id")
        alert_id = uuid.UUID(alert) if isinstance(alert, str) else None
    except (KeyError, TypeError, ValueError, RecursionError):
        return None
    return command_id, action, alert_id


def decode_command(device: str, raw: bytes) -> Incoming | str:
    """The command in ``raw`` for ``device``, or why it cannot even be answered."""
    try:
        payload = CommandPayload.model_validate_json(raw)
    except ValidationError as exc:
        reason = f"invalid payload: {_errors(exc)}"
        identity = _identify(raw)
        if identity is None:
            return reason
        command_id, action, alert_id = identity
        return Incoming(device, command_id, action, alert_id, None, reason)
    return Incoming(device, payload.command_id, payload.action, payload.alert_id, payload)


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= _REASON_MAX:
        return text
    return text[: _REASON_MAX - 1] + "…"


class CommandRouter:
    def __init__(
        self,
        site: str,
        routes: Mapping[str, Sequence[Route]],
        drivers: Mapping[str, Driver],
        outbox: AsyncOutbox,
        *,
        profiles: Mapping[str, str],
        on_result: Callable[[], None] | None = None,
        max_tasks: int = 16,
        timeout_s: float = 15.0,
        retries: int = 2,
        retry_delay_s: float = 1.0,
        ledger_retry_max_s: float = 10.0,
    ) -> None:
        """``profiles``: device id → profile name (what the device can be told)."""
        if max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        self.site = site
        self.routes = routes
        self.drivers = drivers
        self.outbox = outbox
        self.profiles = profiles
        self.on_result = on_result or (lambda: None)
        self.max_tasks = max_tasks
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.ledger_retry_max_s = ledger_retry_max_s
        self.outcomes: Counter[str] = Counter()
        self._in_progress: set[uuid.UUID] = set()
        self._device_locks: dict[str, asyncio.Lock] = {}  # configured devices only
        self._slots = asyncio.Semaphore(max_tasks)
        self._tasks: set[asyncio.Task[None]] = set()

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        metrics.EDGE_COMMANDS.labels(outcome).inc()

    @property
    def in_progress(self) -> int:
        return len(self._in_progress)

    # -- the loop ----------------------------------------------------------------------

    async def run(self, client: MqttClient) -> None:
        """Resume unanswered commands, then handle messages, ``max_tasks`` at a time."""
        purge = asyncio.create_task(self._purge_loop(), name="command-ledger-purge")
        try:
            unanswered = await self._durably(
                self.outbox.unanswered_commands, "read the unanswered commands"
            )
            for taken in unanswered:
                incoming = decode_command(taken.device, taken.command)
                if isinstance(incoming, str):  # never stored so; kept for the type
                    log.error("command %s in the ledger is unreadable", taken.command_id)
                    continue
                log.warning(
                    "command %s %s for %s was taken before a restart and never answered: "
                    "carrying it out now",
                    incoming.command_id,
                    incoming.action.value,
                    incoming.device,
                )
                await self._slots.acquire()
                self._in_progress.add(incoming.command_id)
                self._spawn(self._carry_out(incoming))
            while True:
                await self._slots.acquire()
                try:
                    message = await client.receive()
                except BaseException:
                    self._slots.release()
                    raise
                self._spawn(self.handle(message, partial(client.ack, message)))
        finally:
            purge.cancel()
            for task in list(self._tasks):
                task.cancel()

    def _spawn(self, coro: Awaitable[None]) -> None:
        """Run one command in a task holding a slot (taken by the caller)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            self._count("internal_error")
            log.error("command task failed", exc_info=task.exception())

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(_PURGE_EVERY_S)
            try:
                await self.outbox.purge_commands()
            except sqlite3.Error as exc:
                log.warning("command ledger: purge failed (%s)", exc)

    # -- one message -------------------------------------------------------------------

    async def handle(self, message: Message, ack: Callable[[], None]) -> None:
        """Take one command message durably, acknowledge it, then answer it once."""
        self.outcomes["received"] += 1
        incoming = self._decode(message)
        if isinstance(incoming, str):
            log.error(
                "command on %s refused (dead letter, no id to answer): %s; payload %r",
                message.topic,
                incoming,
                message.payload[:200],
            )
            self._count("invalid")
            ack()
            return
        key = incoming.command_id
        log.info("command %s %s for %s received", key, incoming.action.value, incoming.device)
        taken = await self._durably(
            partial(
                self.outbox.take_command,
                key,
                incoming.device,
                incoming.action.value,
                # as carried out after a restart: canonical when valid (bounded by the
                # schema); an invalid one was small enough to be read for its id
                dump(incoming.payload) if incoming.payload is not None else message.payload,
            ),
            f"take command {key}",
        )
        if taken.new:
            self._in_progress.add(key)
        ack()
        if not taken.new:
            if taken.outcome != RECEIVED or key in self._in_progress:
                self._duplicate(taken)
                return
            log.warning("command %s: taken before, never answered: carrying it out now", key)
            self._in_progress.add(key)
        await self._carry_out(incoming)

    def _decode(self, message: Message) -> Incoming | str:
        try:
            topic = parse_topic(message.topic)
        except TopicError as exc:
            return f"bad topic: {exc}"
        if (
            not isinstance(topic, DeviceTopic)
            or topic.channel is not Channel.COMMAND
            or topic.site != self.site
        ):
            return "not a command topic of this site"
        return decode_command(topic.device, message.payload)

    def _duplicate(self, taken: TakenCommand) -> None:
        self._count("duplicate")
        if taken.requeued:
            log.info(
                "command %s for %s: seen before (%s); its result is published again",
                taken.command_id,
                taken.device,
                taken.outcome,
            )
            self.on_result()
        elif taken.outcome == RECEIVED:
            log.info(
                "command %s for %s: seen before, still being carried out",
                taken.command_id,
                taken.device,
            )
        else:  # answered by an edge that kept no result
            log.info(
                "command %s for %s: answered before (%s), not carried out again",
                taken.command_id,
                taken.device,
                taken.outcome,
            )

    async def _carry_out(self, incoming: Incoming) -> None:
        # In progress until the answer is in the ledger: a redelivery that arrives
        # between the device's action and the recorded answer (the ledger still says
        # "received") must not take the command for one a restart left unanswered.
        try:
            await self._carry_out_and_record(incoming)
        finally:
            self._in_progress.discard(incoming.command_id)

    async def _carry_out_and_record(self, incoming: Incoming) -> None:
        answer = await self._answer(incoming)
        result = CommandResultPayload(
            v=1,
            command_id=incoming.command_id,
            action=incoming.action,
            outcome=answer.outcome,
            time=now_utc(),
            reason=_clip(answer.reason),
            via=answer.via,
            alert_id=incoming.alert_id,
        )
        topic = str(DeviceTopic(self.site, incoming.device, Channel.COMMAND_RESULT))
        await self._durably(
            partial(
                self.outbox.answer_command,
                incoming.command_id,
                answer.outcome.value,
                topic,
                dump(result),
            ),
            f"answer command {incoming.command_id}",
        )
        self._count(answer.outcome.value)
        log.log(
            logging.INFO if answer.outcome is CommandOutcome.EXECUTED else logging.ERROR,
            "command %s %s for %s (alert %s): %s%s",
            incoming.command_id,
            incoming.action.value,
            incoming.device,
            incoming.alert_id,
            answer.outcome.value,
            f" via {answer.via}" if answer.via else f": {answer.reason}",
        )
        self.on_result()

    async def _durably(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """A ledger write; retried while the disk or a lock says no (never dropped)."""
        delay = 0.5
        while True:
            try:
                return await op()
            except sqlite3.Error as exc:
                self.outcomes["ledger_errors"] += 1
                log.error("command ledger: cannot %s (%s); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.ledger_retry_max_s)

    # -- deciding and executing --------------------------------------------------------

    async def _answer(self, incoming: Incoming) -> Answer:
        if incoming.refusal is not None or incoming.payload is None:
            return Answer(CommandOutcome.REFUSED, incoming.refusal or "invalid payload")
        routes = self.routes.get(incoming.device)
        if not routes:
            return Answer(CommandOutcome.REFUSED, f"unknown device {incoming.device!r}")
        refusal = self._beyond_capabilities(incoming.device, incoming.action)
        if refusal is not None:
            return Answer(CommandOutcome.REFUSED, refusal)
        # one device's commands run one at a time, in the order they were taken
        lock = self._device_locks.setdefault(incoming.device, asyncio.Lock())
        async with lock:
            return await self._execute(incoming.device, incoming.payload, routes)

    def _beyond_capabilities(self, device: str, action: CommandAction) -> str | None:
        """Why the device's profile does not allow ``action``, or None if it does."""
        name = self.profiles.get(device)
        if name is None:
            return f"no profile known for device {device!r}"
        try:
            profile = device_profiles.get(name)
        except KeyError:
            return f"profile {name!r} is not known to this edge"
        if action.value not in profile.commands:
            can = ", ".join(sorted(profile.commands)) or "nothing"
            return f"{name} cannot {action.value} (it can: {can})"
        return None

    async def _execute(
        self, device: str, payload: CommandPayload, routes: Sequence[Route]
    ) -> Answer:
        action = DriverAction(payload.action.value)
        last = ""
        for attempt in range(self.retries + 1):
            for route in routes:
                command = Command(route.address, action, dict(payload.args))
                try:
                    await asyncio.wait_for(
                        self.drivers[route.driver].execute(command), self.timeout_s
                    )
                except CommandError as exc:
                    last = f"{route.driver}: {exc}"
                    if not exc.recoverable:
                        return Answer(CommandOutcome.REFUSED, last)
                    continue
                except TimeoutError:
                    last = f"{route.driver}: timed out after {self.timeout_s} s"
                    continue
                except Exception as exc:  # a driver bug must not kill the router
                    last = f"{route.driver}: {type(exc).__name__}: {exc}"
                    log.exception("command %s: driver %s raised", payload.command_id, route.driver)
                    continue
                return Answer(CommandOutcome.EXECUTED, via=route.driver)
            if attempt < self.retries:
                log.warning(
                    "command %s %s on %s: attempt %d failed (%s); retrying",
                    payload.command_id,
                    action.value,
                    device,
                    attempt + 1,
                    last,
                )
                await asyncio.sleep(self.retry_delay_s * (attempt + 1))
        return Answer(
            CommandOutcome.UNREACHABLE, f"no answer after {self.retries + 1} attempts: {last}"
        )
