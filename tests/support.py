"""Test support: real broker clients, the server as a real process, database polling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg

from device_drivers.model import Observation

SERVER_PASSWORD = "server-test-secret"
GATEWAY_PASSWORDS = {"gw-site-a": "secret-a", "gw-site-b": "secret-b"}


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

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        c.reason = reason
        (c.refused if reason.is_failure else c.ok).set()

    c.client.on_connect = on_connect
    c.client.connect("127.0.0.1", port, keepalive=30)
    c.client.loop_start()
    deadline = time.monotonic() + timeout
    while not (c.ok.is_set() or c.refused.is_set()) and time.monotonic() < deadline:
        time.sleep(0.01)
    if c.refused.is_set():
        c.client.loop_stop()
    return c


def publish_all(
    port: int,
    username: str,
    password: str,
    messages: Iterable[tuple[str, bytes, int]],
    timeout: float = 30.0,
) -> list[Any]:
    """Publish and wait until the broker acknowledged every QoS 1 message."""
    c = connect(port, username, password)
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


def scalar(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, connect_timeout=3) as conn:
        row = conn.execute(sql, params).fetchone()
        return row[0] if row else None


@dataclass
class ServerProcess:
    """``eldersafe server`` as a real child process (so it can be SIGKILLed)."""

    dsn: str
    mqtt_port: int
    log_path: Path
    client_id: str = "eldersafe-server"
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ELDERSAFE_ENVIRONMENT": "test",
                "ELDERSAFE_DATABASE_URL": self.dsn,
                "ELDERSAFE_MQTT_PORT": str(self.mqtt_port),
                "ELDERSAFE_MQTT_USERNAME": "server",
                "ELDERSAFE_MQTT_PASSWORD": SERVER_PASSWORD,
                "ELDERSAFE_MQTT_CLIENT_ID": self.client_id,
                "ELDERSAFE_MQTT_KEEPALIVE_S": "5",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "server"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_session(self, timeout: float = 30.0) -> None:
        """Wait until the server's session is subscribed (the log says so)."""
        try:
            wait_for(lambda: b"mqtt session up" in self.log_path.read_bytes(), timeout, "session")
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
