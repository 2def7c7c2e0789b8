"""Guarantees of ingest and of the production broker, each with its dangerous moment forced.

- Ingest acknowledges only what is committed: the test holds the lock the
  event write needs, waits until the server's write is seen blocked on it,
  SIGKILLs the server and only then releases. Acknowledging before the commit
  loses the blocked batch every time.
- The production broker config (deploy/mosquitto) keeps queued QoS 1 messages
  across a broker crash: the test waits for the broker's own save, then
  SIGKILLs it. Without ``autosave_interval`` no save comes in time; without
  ``use_username_as_clientid`` a gateway wipes the session by its client id.
- The server survives whatever happens to its broker (killed, restarted,
  refusing the account) with one PID, and an acknowledgement meant for a
  closed connection never reaches the next one.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support import (
    GATEWAY_PASSWORDS,
    SERVER_PASSWORD,
    accounts_for_tests,
    assert_stored_once,
    mqtt_client,
    publish_all,
    scalar,
    sos_events,
    wait_for,
)

from gateway.broker_auth import BrokerAccount, hash_password, write_broker_files
from gateway.local.mosquitto import MosquittoInstance
from gateway.mqtt.codec import Publish
from gateway.mqtt.consumer import MqttConsumer, MqttEndpoint

REPO = Path(__file__).resolve().parents[2]
GW_A = ("gw-site-a", GATEWAY_PASSWORDS["gw-site-a"])


def blocked_on_a_lock(dsn: str) -> bool:
    """A session of this database waits for a lock while writing events (the server's write)."""
    return bool(
        scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            r" AND query ~* '(insert\s+into|copy)\s+(event_ledger|device_events)'",
        )
    )


def test_ingest_acknowledges_only_what_is_committed(broker, database, make_server) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    sent, messages = sos_events(20)
    with psycopg.connect(database) as holder:  # a transaction stays open until rollback
        holder.execute("LOCK TABLE event_ledger, device_events IN ACCESS EXCLUSIVE MODE")
        assert all(rc == 0 for rc in publish_all(broker.port, *GW_A, messages))
        # The server has read the events and its write waits for our lock: whatever it
        # acknowledged by now was acknowledged before anything was committed.
        wait_for(lambda: blocked_on_a_lock(database), 20, "the server's write blocked on the lock")
        server.kill()
        holder.rollback()
    assert scalar(database, "SELECT count(*) FROM device_events") == 0
    server.start()
    server.wait_session()
    assert_stored_once(database, sent)


# -- the production broker config --------------------------------------------------


def production_config(instance: MosquittoInstance) -> str:
    """deploy/mosquitto/mosquitto.conf with its files in ``instance``'s directory and port."""
    text = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    replacements = [
        (r"^password_file /mosquitto/config/passwd$", f"password_file {instance.password_file}"),
        (r"^acl_file /mosquitto/config/acl$", f"acl_file {instance.acl_file}"),
        (r"^persistence_location /mosquitto/data/$", f"persistence_location {instance.data_dir}/"),
        (r"^listener 1883$", f"listener {instance.port} 127.0.0.1"),
    ]
    for pattern, replacement in replacements:
        text, n = re.subn(pattern, replacement, text, flags=re.M)
        assert n == 1, f"deploy config has no line {pattern!r}"
    return text + f"\nlog_dest file {instance.log_file}\n"


def persistent_subscriber(port: int, topic: str) -> tuple[mqtt.Client, list[bytes]]:
    """A ``server`` session (expiry 1 h) subscribed at QoS 1; returns it connected."""
    received: list[bytes] = []
    client = mqtt_client(port, "server", SERVER_PASSWORD)
    ready = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = lambda c, u, msg: received.append(bytes(msg.payload))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
    client.loop_start()
    assert ready.wait(5), "subscription not acknowledged"
    return client, received


def test_production_broker_keeps_queued_messages_across_a_crash(service_dir) -> None:
    broker = MosquittoInstance(service_dir / "mqtt")
    broker.configure(
        [
            BrokerAccount("server", hash_password(SERVER_PASSWORD), None),
            BrokerAccount(GW_A[0], hash_password(GW_A[1]), "site-a"),
        ]
    )
    broker.conf_file.write_text(production_config(broker))
    broker.start()
    try:
        topic = "eldersafe/v1/site-a/+/event"
        client, _ = persistent_subscriber(broker.port, topic)
        client.disconnect()
        client.loop_stop()
        sent, messages = sos_events(50)
        assert all(rc == 0 for rc in publish_all(broker.port, *GW_A, messages))
        # A gateway sending the subscriber's client id with clean start takes nothing
        # over: the production config names sessions after accounts too.
        publish_all(broker.port, *GW_A, [], client_id="server")
        acked_at_ns = time.time_ns()
        # The broker saves in its one thread, between messages: a file written after the
        # last PUBACK arrived holds every message.
        db_file = broker.data_dir / "mosquitto.db"
        wait_for(
            lambda: db_file.exists() and db_file.stat().st_mtime_ns > acked_at_ns,
            20,
            "the broker's next save of its persistence file (autosave_interval)",
        )
        broker.kill()
        broker.start()
        client, received = persistent_subscriber(broker.port, topic)
        try:
            wait_for(lambda: len(received) >= len(sent), 20, "the queued messages")
        finally:
            client.disconnect()
            client.loop_stop()
        assert sorted(received) == sorted(p for _, p, _ in messages)
    finally:
        broker.stop()


# -- the server and its broker ------------------------------------------------------


def test_server_outlives_broker_restarts_and_refusals(broker, database, make_server) -> None:
    """Killed, restarted, refusing the server's account: one server PID throughout.

    The broker killed before it saved (its file removed, to be sure) has lost the
    server's session: that is one incident, and the only one.
    """
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    pid = server.proc.pid

    broker.kill()
    (broker.data_dir / "mosquitto.db").unlink(missing_ok=True)
    broker.start()
    server.wait_session(count=2)
    wait_for(lambda: incidents(database) == [("server", "session_lost")], 10, "the incident")

    broker.stop()  # a clean stop saves the session
    broker.start()
    server.wait_session(count=3)

    broker.stop()
    everyone_but_the_server = [
        BrokerAccount(GW_A[0], hash_password(GW_A[1]), "site-a"),
    ]
    write_broker_files(everyone_but_the_server, broker.password_file, broker.acl_file)
    broker.start()
    refusals = server.log_path.read_bytes().count(b"broker refused the connection")
    wait_for(
        lambda: (
            server.log_path.read_bytes().count(b"broker refused the connection") >= refusals + 2
        ),
        20,
        "the server retrying after refusals",
    )
    write_broker_files(accounts_for_tests(), broker.password_file, broker.acl_file)
    broker.reload()
    server.wait_session(count=4)

    sent, messages = sos_events(5)
    publish_all(broker.port, *GW_A, messages)
    assert_stored_once(database, sent)
    assert server.proc.poll() is None and server.proc.pid == pid
    assert incidents(database) == [("server", "session_lost")]


def incidents(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [
            (r[0], r[1])
            for r in conn.execute(
                "SELECT client_id, kind FROM mqtt_session_incidents ORDER BY id"
            ).fetchall()
        ]


async def test_acks_of_a_closed_connection_never_reach_the_next(broker) -> None:
    received: list[tuple[int, Publish]] = []
    arrived = asyncio.Event()

    def on_publish(epoch: int, pub: Publish) -> None:
        received.append((epoch, pub))
        arrived.set()

    consumer = MqttConsumer(
        MqttEndpoint("127.0.0.1", broker.port, "server", SERVER_PASSWORD),
        client_id="server",
        filters=["eldersafe/v1/#"],
        on_publish=on_publish,
        keepalive=5,
    )

    def in_epoch(epoch: int) -> list[Publish]:
        return [p for e, p in received if e == epoch]

    async def delivered_after(epoch: int, n: int) -> tuple[int, list[Publish]]:
        """The first connection after ``epoch`` that got ``n`` messages (attempts count too)."""
        async with asyncio.timeout(20):
            while True:
                done = sorted(e for e in {e for e, _ in received} if e > epoch)
                done = [e for e in done if len(in_epoch(e)) >= n]
                if done:
                    return done[0], in_epoch(done[0])
                arrived.clear()
                await arrived.wait()

    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.connected.wait(), 20)
        _, messages = sos_events(10)
        await asyncio.to_thread(publish_all, broker.port, *GW_A, messages)
        first, publishes = await delivered_after(0, 10)
        stale = [p.packet_id for p in publishes if p.packet_id is not None]

        # Connection 1 ends (a clean broker restart keeps the session and what is in flight).
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        second, _ = await delivered_after(first, 10)
        assert consumer.epoch == second
        assert consumer.ack(first, stale) is False
        # Had the stale acks gone out on connection 2, the broker would have dropped the
        # messages; it delivers them once more on connection 3.
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        _, again = await delivered_after(second, 10)
        assert sorted(p.payload for p in again) == sorted(p for _, p, _ in messages)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.close()
