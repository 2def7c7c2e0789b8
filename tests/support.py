"""Test support: real broker clients, the server as a real process, database polling."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg

from device_drivers.model import Observation
from gateway.broker_auth import BrokerAccount, hash_password
from gateway.local.ports import free_port

# The broker names each session after its account (use_username_as_clientid):
# two clients of one account at once knock each other off. So each site has a
# second gateway account for raw test publishers and collectors beside an edge,
# and "server-2" (server rights) watches and commands beside a running server.
SERVER_PASSWORD = "server-test-secret"
SERVER_PASSWORDS = {"server": SERVER_PASSWORD, "server-2": "server-2-test-secret"}
GATEWAY_PASSWORDS = {
    "gw-site-a": "secret-a",
    "gw-site-a-2": "secret-a-2",
    "gw-site-b": "secret-b",
    "gw-site-b-2": "secret-b-2",
}


def accounts_for_tests() -> list[BrokerAccount]:
    """Two server accounts and two gateway accounts per site (see GATEWAY_PASSWORDS)."""
    servers = [BrokerAccount(u, hash_password(p), None) for u, p in SERVER_PASSWORDS.items()]
    return servers + [
        BrokerAccount(user, hash_password(password), user.removeprefix("gw-").removesuffix("-2"))
        for user, password in GATEWAY_PASSWORDS.items()
    ]


def mqtt_client(
    port: int,
    username: str | None,
    password: str | None,
    client_id: str | None = None,
    protocol: int = mqtt.MQTTv5,
) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
        protocol=protocol,
    )
    if username is not None:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    return client


@dataclass
class Connected:
    client: mqtt.Client
    reason: Any = None
    ok: threading.Event = field(default_factory=threading.Event)
    refused: threading.Event = field(default_factory=threading.Event)


def connect(
    port: int,
    username: str | None,
    password: str | None,
    timeout: float = 5.0,
    client_id: str | None = None,
) -> Connected:
    """Connect and wait for CONNACK; ``.ok`` or ``.refused`` tells the outcome."""
    c = Connected(mqtt_client(port, username, password, client_id))
    answered = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        c.reason = reason
        (c.refused if reason.is_failure else c.ok).set()
        answered.set()

    c.client.on_connect = on_connect
    c.client.connect("127.0.0.1", port, keepalive=30)
    c.client.loop_start()
    answered.wait(timeout)
    if c.refused.is_set():
        c.client.loop_stop()
    return c


def publish_all(
    port: int,
    username: str,
    password: str,
    messages: Iterable[tuple[str, bytes, int]],
    timeout: float = 30.0,
    client_id: str | None = None,
) -> list[Any]:
    """Publish and wait until the broker acknowledged every QoS 1 message."""
    c = connect(port, username, password, client_id=client_id)
    assert c.ok.is_set(), f"publisher could not connect: {c.reason}"
    infos = [c.client.publish(t, p, qos=q) for t, p, q in messages]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    c.client.disconnect()
    c.client.loop_stop()
    return [i.rc for i in infos]


class Collector:
    """A subscriber that records what arrives (to prove what a client could or could not do)."""

    def __init__(self, port: int, username: str, password: str, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.c = connect(port, username, password)
        assert self.c.ok.is_set(), self.c.reason
        subscribed = threading.Event()
        self.c.client.on_subscribe = lambda *a: subscribed.set()
        self.c.client.on_message = self._on_message
        self.c.client.subscribe(topic, qos=1)
        assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        self.c.client.disconnect()
        self.c.client.loop_stop()


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def until(
    predicate: Callable[[], object],
    within_s: float = 5.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> Any:
    """Poll a condition with a deadline, in async tests: for state that has no event
    to wait on (a counter, a file, a row). The predicate may be a coroutine function
    (a query on an async connection); its first truthy value is returned."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(interval)


def scalar(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, connect_timeout=3) as conn:
        row = conn.execute(sql, params).fetchone()
        return row[0] if row else None


def sos_events(n: int, site: str = "site-a") -> tuple[list[str], list[tuple[str, bytes, int]]]:
    """``n`` SOS events with fresh ids, one per button: (ids, messages for publish_all)."""
    from gateway.contract.payloads import EventPayload, EventType, Phase, dump

    ids = [uuid.uuid4() for _ in range(n)]
    messages = [
        (
            f"eldersafe/v1/{site}/btn-{i}/event",
            dump(
                EventPayload(
                    v=1,
                    event_id=event_id,
                    type=EventType.SOS,
                    phase=Phase.PULSE,
                    time=datetime.now(UTC),
                    profile="es-cb1",
                    data={"n": i},
                )
            ),
            1,
        )
        for i, event_id in enumerate(ids)
    ]
    return [str(i) for i in ids], messages


def assert_stored_once(dsn: str, sent: list[str], within_s: float = 30) -> None:
    """Every sent event id is in the database once, and nothing else is."""
    count = "SELECT count(*) FROM device_events"
    try:
        wait_for(lambda: scalar(dsn, count) >= len(sent), within_s, "every event")
    except AssertionError:
        raise AssertionError(
            f"{scalar(dsn, count)} of {len(sent)} events in the database after {within_s} s"
        ) from None
    with psycopg.connect(dsn) as conn:
        stored = [str(r[0]) for r in conn.execute("SELECT event_id FROM device_events")]
        ledger = conn.execute("SELECT count(*) FROM event_ledger").fetchone()
    assert sorted(stored) == sorted(sent), "events lost, doubled or invented"
    assert ledger == (len(sent),)


@dataclass
class ServerProcess:
    """``eldersafe server`` as a real child process (so it can be SIGKILLed)."""

    dsn: str
    mqtt_port: int
    log_path: Path
    username: str = "server"
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    sessions_before_start: int = 0
    api_port: int = field(default_factory=free_port)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ELDERSAFE_ENVIRONMENT": "test",
                "ELDERSAFE_DATABASE_URL": self.dsn,
                "ELDERSAFE_MQTT_PORT": str(self.mqtt_port),
                "ELDERSAFE_MQTT_USERNAME": self.username,
                "ELDERSAFE_MQTT_PASSWORD": SERVER_PASSWORDS[self.username],
                "ELDERSAFE_MQTT_KEEPALIVE_S": "5",
                "ELDERSAFE_API_PORT": str(self.api_port),
            }
        )
        env.update(self.extra_env)
        return env

    def sessions_up(self) -> int:
        """How many times the log says a session came up (over every start)."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_bytes().count(b"mqtt session up")

    def start(self) -> None:
        self.sessions_before_start = self.sessions_up()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "server"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_session(self, timeout: float = 30.0, count: int = 1) -> None:
        """Wait until ``count`` sessions came up since the latest start (the log says so)."""
        try:
            wait_for(
                lambda: self.sessions_up() - self.sessions_before_start >= count,
                timeout,
                f"session {count} since start",
            )
        except AssertionError:
            raise AssertionError(f"server session not up; its log:\n{self.log_tail()}") from None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class EventStream:
    """Publishes SOS events with fresh ids at a steady rate from a thread (a busy district)."""

    def __init__(self, port: int, username: str, password: str, site: str, rate: float) -> None:
        self.ids: list[str] = []
        self.rate = rate
        self.site = site
        self._stop = threading.Event()
        self._conn = connect(port, username, password)
        assert self._conn.ok.is_set(), self._conn.reason
        self._infos: list[Any] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EventStream:
        self._thread.start()
        return self

    def _run(self) -> None:
        from gateway.contract.payloads import EventPayload, EventType, Phase, dump, now_utc

        interval = 1.0 / self.rate
        next_at = time.monotonic()
        n = 0
        while not self._stop.is_set():
            event_id = uuid.uuid4()
            payload = dump(
                EventPayload(
                    v=1,
                    event_id=event_id,
                    type=EventType.SOS,
                    phase=Phase.PULSE,
                    time=now_utc(),
                    profile="es-cb1",
                    data={"n": n},
                )
            )
            self._infos.append(
                self._conn.client.publish(
                    f"eldersafe/v1/{self.site}/btn-{n % 50}/event", payload, qos=1
                )
            )
            self.ids.append(str(event_id))
            n += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self, timeout: float = 30.0) -> list[str]:
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + timeout
        for info in self._infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert all(i.is_published() for i in self._infos), "broker did not take every event"
        self._conn.client.disconnect()
        self._conn.client.loop_stop()
        return self.ids


class ObservationCollector:
    """A driver's ObservationSink that tests can wait on."""

    def __init__(self, within_s: float = 3.0) -> None:
        self.items: list[Observation] = []
        self.within_s = within_s
        self._changed = asyncio.Condition()

    async def __call__(self, observation: Observation) -> None:
        async with self._changed:
            self.items.append(observation)
            self._changed.notify_all()

    async def wait_for(
        self,
        predicate: Callable[[Observation], bool],
        within_s: float | None = None,
        start: int = 0,
    ) -> Any:
        """First observation from index ``start`` on that matches."""
        async with asyncio.timeout(within_s or self.within_s), self._changed:
            while True:
                for item in self.items[start:]:
                    if predicate(item):
                        return item
                await self._changed.wait()
