"""Scripted staff for the demo: people who use the HTTP API as real staff would.

Every duty person on shift logs in, takes their open alerts from
``GET /api/alerts?status=open`` and, a few seconds later, handles each one still open:
most are acknowledged, some then put on scene, and resolved with an outcome; one in
``MISS_EVERY`` is missed, so the ladder climbs (supervisor and family at 15 s, the
street at 30 s). Supervisors pick up what reached the street. Misses are counted, not
drawn at random, so the first escalation comes within the first minute of every run
(the demo's test waits for it); a missed alert that the resident cancels before it
escalates passes its miss on to the next alert. Timing and outcome follow from the
alert's id; every action carries an ``Idempotency-Key`` (a retry is answered, never
done twice).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx

log = logging.getLogger(__name__)

POLL_S = 3.0  # per person: ten people polling keep the server busy enough
MISS_EVERY = 4  # the 2nd, 6th, 10th… alert decided on is never answered by duty
ON_SCENE_PERCENT = 50  # of answered alerts someone goes to before resolving
SUPERVISOR_FROM_LEVEL = 2  # the street has been paged: the supervisor steps in


class Handling(StrEnum):
    ACKNOWLEDGE = "acknowledge"  # then resolve
    GO_THERE = "go_there"  # acknowledge, on scene, resolve


@dataclass(frozen=True, slots=True)
class Plan:
    """What the duty person does with one alert, and after how long (seconds)."""

    handling: Handling
    acknowledge_after_s: float
    then_after_s: float
    outcome: str


_OUTCOMES = ("handled", "handled", "false_alarm", "sent_to_hospital")


def plan_for(alert_id: uuid.UUID) -> Plan:
    """Deterministic from the alert's id: a restart does not change anyone's mind."""
    n = alert_id.int
    go_there = (n >> 8) % 100 < ON_SCENE_PERCENT
    handling = Handling.GO_THERE if go_there else Handling.ACKNOWLEDGE
    return Plan(handling, 3.0 + (n >> 16) % 6, 5.0 + (n >> 24) % 6,
                _OUTCOMES[(n >> 32) % len(_OUTCOMES)])  # fmt: skip


@dataclass
class StaffCounts:
    """What the scripted staff did, for the demo's live line."""

    acknowledged: int = 0
    on_scene: int = 0
    resolved: int = 0
    missed: int = 0
    refused: int = 0  # 409: the alert moved on meanwhile (a resident's cancel, a colleague)
    errors: int = 0


class StaffSession:
    """One person logged in over HTTP; logs in again when the token runs out."""

    def __init__(self, client: httpx.AsyncClient, username: str, password: str) -> None:
        self.client = client
        self.username = username
        self.password = password
        self._headers: dict[str, str] = {}

    async def login(self) -> None:
        answer = await self.client.post(
            "/api/auth/login", json={"username": self.username, "password": self.password}
        )
        answer.raise_for_status()
        self._headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if not self._headers:
            await self.login()
        headers = {**self._headers, **kw.pop("headers", {})}
        answer = await self.client.request(method, path, headers=headers, **kw)
        if answer.status_code == 401:  # expired token: log in again, once
            await self.login()
            headers.update(self._headers)
            answer = await self.client.request(method, path, headers=headers, **kw)
        return answer

    async def alert(self, alert_id: str) -> dict[str, Any]:
        answer = await self.request("GET", f"/api/alerts/{alert_id}")
        answer.raise_for_status()
        return dict(answer.json())

    async def open_alerts(self) -> list[dict[str, Any]]:
        answer = await self.request("GET", "/api/alerts", params={"status": "open", "limit": 50})
        answer.raise_for_status()
        return list(answer.json()["items"])

    async def act(self, alert_id: str, action: str, body: dict[str, Any] | None = None) -> int:
        answer = await self.request(
            "POST", f"/api/alerts/{alert_id}/{action}", json=body,
            headers={"Idempotency-Key": f"demo-{self.username}-{action}-{alert_id}"},
        )  # fmt: skip
        return answer.status_code


def _any(alert: dict[str, Any]) -> bool:
    return True


def _missed_long(alert: dict[str, Any]) -> bool:
    """What a supervisor takes: missed long enough to have reached the street."""
    return int(alert["level"]) >= SUPERVISOR_FROM_LEVEL


@dataclass
class ScriptedStaff:
    """Duty people on shift and supervisors, each polling their own open alerts.

    ``on_duty`` names who is on shift at a moment (the district's shifts), asked every
    round, so a demo left running past a change of shift hands over like a real one."""

    base_url: str
    password: str
    on_duty: Callable[[datetime], Sequence[str]]
    supervisors: Sequence[str]
    counts: StaffCounts = field(default_factory=StaffCounts)
    sleep: Callable[[float], Any] = asyncio.sleep
    _duty_took: set[str] = field(default_factory=set)
    _supervisor_took: set[str] = field(default_factory=set)
    _decided: int = 0
    misses_owed: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self) -> None:
        """Until cancelled: a round of polls by everyone at work, every ``POLL_S``."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30.0) as client:
            sessions: dict[str, StaffSession] = {}

            def session(user: str) -> StaffSession:
                return sessions.setdefault(user, StaffSession(client, user, self.password))

            try:
                while True:
                    duty = self.on_duty(datetime.now(UTC))
                    await asyncio.gather(
                        *(self._poll(session(u), self._duty_took, _any, self._duty_handles)
                          for u in duty),
                        *(self._poll(session(u), self._supervisor_took, _missed_long,
                                     self._supervisor_handles) for u in self.supervisors),
                    )  # fmt: skip
                    await self.sleep(POLL_S)
            finally:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self, me: StaffSession, took: set[str],
                    take: Callable[[dict[str, Any]], bool],
                    handle: Callable[[StaffSession, dict[str, Any]], Any]) -> None:  # fmt: skip
        """Each alert is taken once per tier (``took``), however many polls list it."""
        try:
            for alert in await me.open_alerts():
                key = alert["id"]
                if key not in took and take(alert):
                    took.add(key)
                    self._spawn(self._guarded(handle(me, alert)))
        except httpx.HTTPError as exc:  # a slow or restarting server: try again next round
            self.counts.errors += 1
            log.warning("scripted staff %s: %s", me.username, exc)

    async def _guarded(self, coro: Any) -> None:
        try:
            await coro
        except httpx.HTTPError as exc:
            self.counts.errors += 1
            log.warning("scripted staff: %s", exc)

    def _count(self, status: int, done: str) -> bool:
        if status == 409:
            self.counts.refused += 1
            return False
        if status >= 400:
            self.counts.errors += 1
            return False
        setattr(self.counts, done, getattr(self.counts, done) + 1)
        return True

    async def _duty_handles(self, me: StaffSession, alert: dict[str, Any]) -> None:
        plan = plan_for(uuid.UUID(alert["id"]))
        await self.sleep(plan.acknowledge_after_s)
        if (await me.alert(alert["id"]))["status"] != "open":
            return  # the resident cancelled, or it cleared: nothing to decide
        if self.next_is_miss():
            await self._miss(me, alert["id"])
            return
        if not self._count(await me.act(alert["id"], "acknowledge"), "acknowledged"):
            return
        if plan.handling is Handling.GO_THERE:
            await self.sleep(plan.then_after_s)
            if not self._count(await me.act(alert["id"], "on-scene"), "on_scene"):
                return
        await self.sleep(plan.then_after_s)
        self._count(await me.act(alert["id"], "resolve", {"outcome": plan.outcome,
                                                           "note": "脚本演示"}), "resolved")

    def next_is_miss(self) -> bool:
        self._decided += 1
        if self.misses_owed:
            self.misses_owed -= 1
            return True
        return self._decided % MISS_EVERY == 2

    async def _miss(self, me: StaffSession, alert_id: str) -> None:
        """Leave it; the supervisor's poll takes it once it reaches the street. Closed
        before its first escalation (a resident's cancel), the miss goes to the next one."""
        self.counts.missed += 1
        while True:
            await self.sleep(POLL_S)
            now = await me.alert(alert_id)
            if int(now["level"]) >= 1:
                return
            if now["status"] != "open":
                self.misses_owed += 1
                return

    async def _supervisor_handles(self, me: StaffSession, alert: dict[str, Any]) -> None:
        if not self._count(await me.act(alert["id"], "acknowledge"), "acknowledged"):
            return
        await self.sleep(8.0)
        self._count(await me.act(alert["id"], "resolve", {"outcome": "handled",
                                                           "note": "主管跟进"}), "resolved")
