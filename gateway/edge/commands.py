"""Downlink: ``…/{device}/command`` → the driver that carries the device → ``execute``.

A command is how staff tell an elder "help is coming" (wristband vibrates,
button LED steady) or hush a sounder, so every one ends in a logged outcome:
refused (bad topic, bad payload, unknown device), done, or failed after
retries. Each command id is carried out once: redeliveries (QoS 1, persistent
session, a restart) are recognised from the durable command ledger. A device
heard by several drivers (a button on two receivers) is tried on each in turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from device_drivers.model import Command, CommandAction, CommandError, Driver
from gateway.contract.payloads import CommandPayload
from gateway.contract.topics import Channel, DeviceTopic, TopicError, parse_topic
from gateway.edge.outbox import AsyncOutbox
from gateway.mqtt.client import Message, MqttClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    driver: str
    address: str


class CommandRouter:
    def __init__(
        self,
        site: str,
        routes: Mapping[str, Sequence[Route]],
        drivers: Mapping[str, Driver],
        outbox: AsyncOutbox,
        *,
        timeout_s: float = 15.0,
        retries: int = 2,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.site = site
        self.routes = routes
        self.drivers = drivers
        self.outbox = outbox
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.outcomes: dict[str, int] = {}
        self._in_progress: set[str] = set()
        self._tasks: set[asyncio.Task[str]] = set()

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def run(self, client: MqttClient) -> None:
        """Handle every command message until cancelled (each in its own task)."""
        try:
            async for message in client.messages():
                task = asyncio.create_task(self.handle(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()

    async def handle(self, message: Message) -> str:
        """Validate, dedupe, route and execute one message; returns the outcome."""
        try:
            topic = parse_topic(message.topic)
        except TopicError as exc:
            return self._refuse(message, f"bad topic: {exc}")
        if (
            not isinstance(topic, DeviceTopic)
            or topic.channel is not Channel.COMMAND
            or topic.site != self.site
        ):
            return self._refuse(message, "not a command topic of this site")
        try:
            payload = CommandPayload.model_validate_json(message.payload)
        except ValidationError as exc:
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return self._refuse(message, f"invalid payload: {reason}")
        key = str(payload.command_id)
        if key in self._in_progress or await self.outbox.command_done(payload.command_id):
            log.info("command %s for %s: duplicate, not executed again", key, topic.device)
            self._count("duplicate")
            return "duplicate"
        routes = self.routes.get(topic.device)
        if not routes:
            outcome = "refused: unknown device"
            log.error("command %s: %s for unknown device %s", key, payload.action, topic.device)
            await self.outbox.record_command(
                payload.command_id, topic.device, payload.action, outcome
            )
            self._count("unknown_device")
            return outcome
        self._in_progress.add(key)
        try:
            outcome = await self._execute(topic.device, payload, routes)
        finally:
            self._in_progress.discard(key)
        await self.outbox.record_command(payload.command_id, topic.device, payload.action, outcome)
        return outcome

    def _refuse(self, message: Message, reason: str) -> str:
        log.error(
            "command on %s refused (dead letter): %s; payload %r",
            message.topic,
            reason,
            message.payload[:200],
        )
        self._count("refused")
        return f"refused: {reason}"

    async def _execute(self, device: str, payload: CommandPayload, routes: Sequence[Route]) -> str:
        action = CommandAction(payload.action.value)
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
                        log.error(
                            "command %s %s on %s failed: %s",
                            payload.command_id,
                            action.value,
                            device,
                            last,
                        )
                        self._count("failed")
                        return f"failed: {last}"
                    continue
                except TimeoutError:
                    last = f"{route.driver}: timed out after {self.timeout_s} s"
                    continue
                except Exception as exc:  # a driver bug must not kill the router
                    last = f"{route.driver}: {type(exc).__name__}: {exc}"
                    log.exception("command %s: driver %s raised", payload.command_id, route.driver)
                    continue
                log.info(
                    "command %s %s on %s done via %s (alert %s)",
                    payload.command_id,
                    action.value,
                    device,
                    route.driver,
                    payload.alert_id,
                )
                self._count("done")
                return f"done via {route.driver}"
            if attempt < self.retries:
                await asyncio.sleep(self.retry_delay_s * (attempt + 1))
        log.error(
            "command %s %s on %s failed after %d attempts: %s",
            payload.command_id,
            action.value,
            device,
            self.retries + 1,
            last,
        )
        self._count("failed")
        return f"failed: {last}"
