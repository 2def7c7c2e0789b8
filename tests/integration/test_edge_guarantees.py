"""The edge's two delivery guarantees, each forced into its dangerous interleaving.

Real processes throughout: ``eldersafe edge`` as a child process, Mosquitto
stopped with SIGSTOP and killed with SIGKILL, the call-button receiver on a
pty, the outbox's own SQLite file held locked from here.

* Uplink: an event leaves the outbox only on the broker's PUBACK. The broker
  is stopped, so the edge writes events into a socket nobody reads; then both
  processes die and what sat in the socket is gone. Only the outbox can bring
  the events back. An edge that deletes at send time loses them, every run.
* Downlink: a command is acknowledged to the broker only once the edge has it
  in its ledger. The ledger is locked, so the edge receives the command but
  cannot take it; then the edge dies. Only the broker can bring the command
  back. A client that acknowledges on receipt (paho's default) loses it,
  every run.
"""

# The fixtures ``sim`` and ``edge`` come from test_edge.py; tests take them as arguments.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import SERVER_PASSWORD, publish_all
from test_edge import (  # the edge harness of test_edge.py
    BUTTONS,
    SITE,
    EdgeProcess,
    SessionCollector,
    edge,  # noqa: F401  (fixture)
    edge_reading,
    health,
    sim,  # noqa: F401  (fixture)
    until,
    write_config,
)

from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.local.mosquitto import MosquittoInstance
from simulators.callbutton_receiver import CallButtonReceiverSimulator

pytestmark = pytest.mark.timeout(120)

MIN_EVENT_BYTES = 200  # an SOS event's PUBLISH: a 32-byte topic and ~200 bytes of JSON


def outbox_path(tmp_path: Path) -> Path:
    return tmp_path / "edge-state" / "outbox.sqlite3"


def queued_bytes(port: int) -> tuple[int, int]:
    """(bytes the broker's sockets hold unread, bytes its clients' sockets hold unsent).

    Read from ``/proc/net/tcp`` (what ``ss`` shows as Recv-Q and Send-Q) for
    the established loopback connections to ``port``.
    """
    unread = unsent = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        tx, rx = (int(q, 16) for q in fields[4].split(":"))
        if state != "01":  # ESTABLISHED
            continue
        if int(local.split(":")[1], 16) == port:  # the broker's end
            unread += rx
        elif int(remote.split(":")[1], 16) == port:  # a client's end
            unsent += tx
    return unread, unsent


def command(action: CommandAction = CommandAction.ACKNOWLEDGE) -> CommandPayload:
    return CommandPayload(v=1, command_id=uuid.uuid4(), action=action, time=now_utc())


async def publish_commands(port: int, commands: list[tuple[str, CommandPayload]]) -> None:
    messages = [(f"eldersafe/v1/{SITE}/{d}/command", dump(c), 1) for d, c in commands]
    rcs = await asyncio.to_thread(publish_all, port, "server", SERVER_PASSWORD, messages)
    assert rcs == [0] * len(messages)


async def edge_subscribed(tmp_path: Path, pid: int) -> None:
    await until(
        lambda: (
            health(tmp_path).get("pid") == pid
            and health(tmp_path).get("mqtt", {}).get("subscribed") is True
        ),
        20,
        "the edge subscribed to its commands",
    )


async def test_events_leave_the_outbox_only_on_puback(
    broker: MosquittoInstance, sim: CallButtonReceiverSimulator, edge: Any, tmp_path: Path
) -> None:
    assert broker.process is not None
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/+/event")
    # keepalive long enough that the edge keeps its (dead) connection while the broker is stopped
    process: EdgeProcess = edge(write_config(tmp_path, broker.port, sim.slave_path, keepalive_s=60))
    pid = process.start()
    names = list(BUTTONS)
    try:
        await edge_reading(tmp_path, sim, pid)
        await until(lambda: health(tmp_path).get("connected") is True, 10, "edge connected")

        os.kill(broker.process.pid, signal.SIGSTOP)  # no PUBACK will come
        pressed = [(name, await sim.press(BUTTONS[name])) for name in names]

        # The edge has sent every event (handed to the connection, in flight) and the
        # bytes sit in the stopped broker's socket, unread.
        await until(
            lambda: health(tmp_path).get("mqtt", {}).get("inflight", {}).get("event") == len(names),
            20,
            f"{len(names)} events in flight; health {health(tmp_path)}",
        )
        at = health(tmp_path)["time"]

        def in_the_brokers_socket() -> bool:
            unread, unsent = queued_bytes(broker.port)
            return unread >= MIN_EVENT_BYTES * len(names) and unsent == 0

        await until(
            in_the_brokers_socket,
            10,
            f"the events in the broker's socket (unread, unsent: {queued_bytes(broker.port)})",
        )
        # One more health round trip through the outbox's (single, ordered) thread:
        # whatever the edge did with the outbox when it sent them is on disk now.
        await until(lambda: health(tmp_path).get("time", 0) > at, 5, "a later health report")

        process.kill()
        broker.kill()  # SIGKILL on the stopped broker: its unread socket data is gone
        subscriptions = collector.subscriptions
        await asyncio.to_thread(broker.start)
        await until(
            lambda: collector.subscriptions > subscriptions, 20, "the collector subscribed again"
        )
        assert collector.events() == []  # nothing got through before the kill

        pid = process.start()
        await edge_reading(tmp_path, sim, pid)
        # Whatever the restarted edge still has, it sends; once its outbox is empty (every
        # event acknowledged by the broker), one more press is the barrier behind them all.
        await until(
            lambda: (
                health(tmp_path).get("pid") == pid
                and health(tmp_path).get("connected") is True
                and health(tmp_path).get("outbox_pending") == 0
            ),
            30,
            f"the restarted edge's outbox drained: {health(tmp_path)}",
        )
        barrier = ("btn-00", await sim.press(BUTTONS["btn-00"]))
        await until(
            lambda: any(
                (t.split("/")[3], e["data"]["seq"]) == barrier for t, e in collector.events()
            ),
            10,
            "the barrier event",
        )

        events = [
            (t.split("/")[3], e["data"]["seq"], e["event_id"])
            for t, e in collector.events()
            if (t.split("/")[3], e["data"]["seq"]) != barrier
        ]
        per_press = Counter((device, seq) for device, seq, _ in events)
        assert set(per_press) == set(pressed), f"every press arrived; got {sorted(per_press)}"
        assert all(n == 1 for n in per_press.values()), f"each exactly once: {per_press}"
        assert len({event_id for *_, event_id in events}) == len(pressed)
    finally:
        collector.close()
        print(process.tail())


async def test_a_command_is_acknowledged_to_the_broker_only_once_taken(
    broker: MosquittoInstance, sim: CallButtonReceiverSimulator, edge: Any, tmp_path: Path
) -> None:
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/+/command/result")
    process: EdgeProcess = edge(write_config(tmp_path, broker.port, sim.slave_path))
    pid = process.start()
    cmd = command()
    try:
        await edge_reading(tmp_path, sim, pid)
        await edge_subscribed(tmp_path, pid)

        # Hold the ledger's database: the edge can receive the command, not take it.
        lock = sqlite3.connect(outbox_path(tmp_path), isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            await publish_commands(broker.port, [("btn-03", cmd)])
            received = f"command {cmd.command_id} acknowledge for btn-03 received".encode()
            await until(lambda: received in process.log.read_bytes(), 10, "command received")
            process.kill()
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert sim.acks == []

        # Only the broker still has the command; a restarted edge gets it again.
        pid = process.start()
        await edge_reading(tmp_path, sim, pid)
        await until(lambda: collector.results(cmd.command_id) != [], 20, "the command's result")
        ((device, result),) = collector.results(cmd.command_id)
        assert device == "btn-03"
        assert (result["outcome"], result["via"]) == ("executed", "cb"), result
        assert len(sim.acks) == 1 and sim.acks[0].button_id == BUTTONS["btn-03"]
    finally:
        collector.close()
        print(process.tail())


async def test_commands_beyond_the_receive_maximum_wait_at_the_broker(
    broker: MosquittoInstance, sim: CallButtonReceiverSimulator, edge: Any, tmp_path: Path
) -> None:
    """100 commands while the edge cannot take any: 32 come (our Receive Maximum), none lost."""
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/+/command/result")
    process: EdgeProcess = edge(write_config(tmp_path, broker.port, sim.slave_path))
    pid = process.start()
    names = list(BUTTONS)
    commands = [(names[i % len(names)], command()) for i in range(100)]
    try:
        await edge_reading(tmp_path, sim, pid)
        await edge_subscribed(tmp_path, pid)

        lock = sqlite3.connect(outbox_path(tmp_path), isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            await publish_commands(broker.port, commands)
            # A QoS 0 message after them is not held by the window: once it is at the
            # edge, so is every QoS 1 message the broker was going to send meanwhile.
            barrier = [(f"eldersafe/v1/{SITE}/btn-00/command", b"barrier", 0)]
            await asyncio.to_thread(publish_all, broker.port, "server", SERVER_PASSWORD, barrier)
            await until(
                lambda: b"delivered (QoS 0)" in process.log.read_bytes(), 20, "the QoS 0 barrier"
            )
            delivered = [
                int(n)
                for n in re.findall(
                    rb"delivered \((\d+) unacknowledged\)", process.log.read_bytes()
                )
            ]
            assert max(delivered) == 32, (
                f"unacknowledged while the edge could take none: {delivered}"
            )
        finally:
            lock.execute("ROLLBACK")
            lock.close()

        def answered() -> int:
            return sum(
                1
                for t, p, _ in collector.snapshot()
                if t.endswith("/command/result") and json.loads(p)["outcome"] == "executed"
            )

        await until(lambda: answered() >= len(commands), 60, f"100 results (got {answered()})")
        await until(lambda: len(sim.acks) >= len(commands), 10, "100 frames at the receiver")
        ids = Counter(
            json.loads(p)["command_id"]
            for t, p, _ in collector.snapshot()
            if t.endswith("/command/result")
        )
        assert set(ids) == {str(c.command_id) for _, c in commands}
        assert len(sim.acks) == len(commands)  # each carried out once
        await until(
            lambda: health(tmp_path).get("mqtt", {}).get("acked", 0) >= len(commands),
            10,
            "a health report after the last PUBACK",
        )
        report = health(tmp_path)
        assert report["mqtt"]["dropped_qos0"] == 0
        assert report["commands"]["invalid"] == 1  # the barrier: no id, nothing to answer
        # Once PUBACKs flow, Mosquitto 2.0.11 sends past the window; kept, and counted.
        print("beyond the Receive Maximum:", report["mqtt"]["receive_maximum_exceeded"])
    finally:
        collector.close()
        print(process.tail())


async def test_a_command_taken_across_a_reconnect_is_acknowledged_on_the_new_connection(
    broker: MosquittoInstance, sim: CallButtonReceiverSimulator, edge: Any, tmp_path: Path
) -> None:
    """The connection that delivered a command is gone by the time the edge has taken it:
    its PUBACK cannot go there. The broker delivers the command again on the new
    connection; the edge recognises it, acknowledges it there, and carries it out once."""
    collector = SessionCollector(broker.port, f"eldersafe/v1/{SITE}/+/command/result")
    process: EdgeProcess = edge(write_config(tmp_path, broker.port, sim.slave_path))
    pid = process.start()
    first, barrier = command(), command()
    received = f"command {first.command_id} acknowledge for btn-03 received".encode()
    connected = b"mqtt connected to"
    try:
        await edge_reading(tmp_path, sim, pid)
        await edge_subscribed(tmp_path, pid)

        lock = sqlite3.connect(outbox_path(tmp_path), isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            await publish_commands(broker.port, [("btn-03", first)])
            await until(lambda: received in process.log.read_bytes(), 10, "command received")
            await asyncio.to_thread(broker.stop)  # keeps the unacknowledged command
            await asyncio.to_thread(broker.start)
            await until(
                lambda: process.log.read_bytes().count(received) == 2,
                30,
                "the command delivered again on the new connection",
            )
            assert process.log.read_bytes().count(connected) == 2
        finally:
            lock.execute("ROLLBACK")
            lock.close()

        await until(lambda: collector.results(first.command_id) != [], 20, "the result")
        assert len(sim.acks) == 1

        # Restarted, the edge gets nothing again: the command was acknowledged. A second
        # command behind it is the barrier (the broker keeps the order).
        process.kill()
        pid = process.start()
        await edge_reading(tmp_path, sim, pid)
        await publish_commands(broker.port, [("btn-04", barrier)])
        await until(lambda: collector.results(barrier.command_id) != [], 20, "the barrier")
        assert process.log.read_bytes().count(received) == 2
        assert len(sim.acks) == 2
        # one answer; the edge may publish it again if it was killed before the
        # broker's PUBACK reached it (at least once: the server keeps one per id)
        answers = {json.dumps(r, sort_keys=True) for _, r in collector.results(first.command_id)}
        assert len(answers) == 1
    finally:
        collector.close()
        print(process.tail())
