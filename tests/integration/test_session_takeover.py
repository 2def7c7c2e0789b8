"""Sessions belong to accounts: nobody else's client id can disturb the server or another site.

The broker names every session after the account that opens it
(``use_username_as_clientid``), so a gateway that sends the server's client id,
or another gateway's, gets its own session and nothing else. What is left (a
second connection of the server's own account, a broker that lost its state)
is an incident the server reports: an ERROR line, the metric
``eldersafe_mqtt_sessions_lost_total{kind}`` and a row in
``mqtt_session_incidents``.

Mosquitto 2.0.11 (this machine's) closes a taken-over connection without the
MQTT 5 DISCONNECT 0x8E (sent from 2.0.15 on), so here a takeover shows as the
session the intruder wiped: ``session_lost``.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
import uuid
from typing import Any

import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support import (
    GATEWAY_PASSWORDS,
    SERVER_PASSWORD,
    SERVER_PASSWORDS,
    assert_stored_once,
    mqtt_client,
    publish_all,
    scalar,
    sos_events,
    wait_for,
)

from gateway.contract.payloads import CommandAction, CommandPayload, dump, now_utc
from gateway.local.ports import free_port
from gateway.mqtt.codec import ConnAck, encode_connect, read_packets

SITE_B_EDGE_ID = "eldersafe-edge-site-b-gw-b"  # the edge's default client id


class SiteEdgeStandIn:
    """A persistent subscriber of site-b's commands, counting every (dis)connect."""

    def __init__(self, port: int) -> None:
        self.connects = 0
        self.disconnects = 0
        self.commands: list[bytes] = []
        self.subscribed = threading.Event()
        self.client = mqtt_client(
            port,
            "gw-site-b",
            GATEWAY_PASSWORDS["gw-site-b"],
            client_id="eldersafe-edge-site-b-gw-b",
        )

        def on_connect(client: Any, *_: Any) -> None:
            self.connects += 1
            client.subscribe("eldersafe/v1/site-b/+/command", qos=1)

        def on_disconnect(*_: Any) -> None:
            self.disconnects += 1

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda c, u, msg: self.commands.append(bytes(msg.payload))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_connect(port: int, username: str, password: str, client_id: str) -> socket.socket:
    """A connection that does not reconnect when knocked off (unlike paho), clean start."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(encode_connect(client_id, username=username, password=password, clean_start=True))
    buf = bytearray()
    while True:
        chunk = sock.recv(4096)
        assert chunk, "broker closed the connection before CONNACK"
        buf += chunk
        packets, _ = read_packets(buf)
        if packets:
            assert packets[0] == ConnAck(False, 0), packets
            return sock


def incidents(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT client_id, kind, detail FROM mqtt_session_incidents ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def test_client_ids_of_the_server_and_of_another_site_take_nothing_over(
    broker, database, make_server
) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    site_b = SiteEdgeStandIn(broker.port)
    try:
        # site-a's gateway account, with clean start (which would also wipe what it took),
        # sends each victim's client id: the server's default and effective ones, site-b's
        # edge default and its account name. Each publishes events while it is connected.
        victims = ["eldersafe-server", "server", SITE_B_EDGE_ID, "gw-site-b"]
        sent: list[str] = []
        for victim in victims:
            ids, messages = sos_events(5)
            rcs = publish_all(
                broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], messages, client_id=victim
            )
            assert rcs == [0] * 5
            sent += ids
        # One more intruder stays connected while site-b gets a command.
        intruder = raw_connect(
            broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], SITE_B_EDGE_ID
        )
        command = CommandPayload(
            v=1, command_id=uuid.uuid4(), action=CommandAction.ACKNOWLEDGE, time=now_utc()
        )
        publish_all(
            broker.port,
            "server-2",
            SERVER_PASSWORDS["server-2"],
            [("eldersafe/v1/site-b/btn-1/command", dump(command), 1)],
        )
        wait_for(lambda: len(site_b.commands) == 1, 10, "site-b's command")
        intruder.close()

        assert_stored_once(database, sent)
        assert (site_b.connects, site_b.disconnects) == (1, 0), "site-b's edge was knocked off"
        assert server.sessions_up() == 1, server.log_tail()
        assert b"incident" not in server.log_path.read_bytes()
        assert incidents(database) == []
        assert b"already connected" not in broker.log_file.read_bytes()
    finally:
        site_b.close()


def metric(port: int, sample: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[1])
    raise AssertionError(f"no sample {sample}")


def test_a_second_connection_of_the_server_account_is_an_incident(
    broker, database, make_server
) -> None:
    """Two processes on one account (a copied config, a leaked password) are loud."""
    metrics_port = free_port()
    server = make_server(database, broker.port, ELDERSAFE_METRICS_PORT=str(metrics_port))
    server.start()
    server.wait_session()
    lost = 'eldersafe_mqtt_sessions_lost_total{kind="session_lost"}'
    assert metric(metrics_port, lost) == 0

    intruder = raw_connect(broker.port, "server", SERVER_PASSWORD, "some-other-server")
    try:
        wait_for(lambda: len(incidents(database)) == 1, 20, "the incident row")
        ((client_id, kind, detail),) = incidents(database)
        assert (client_id, kind) == ("server", "session_lost")
        assert "this process had it" in detail
        assert metric(metrics_port, lost) == 1
        assert b"ERROR gateway.mqtt.consumer: mqtt session incident" in server.log_path.read_bytes()
    finally:
        intruder.close()
    # The server took its account back and ingests again, same process.
    server.wait_session(count=2)
    sent, messages = sos_events(5)
    publish_all(broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"], messages)
    assert_stored_once(database, sent)
    assert server.proc is not None and server.proc.poll() is None


def test_a_restarted_server_reports_the_session_its_broker_lost(
    broker, database, make_server
) -> None:
    server = make_server(database, broker.port)
    server.start()
    server.wait_session()
    recorded = "SELECT count(*) FROM mqtt_server_sessions WHERE client_id = 'server'"
    wait_for(lambda: scalar(database, recorded) == 1, 10, "the session's record")
    server.stop()
    server.start()  # the broker kept the session: nothing to report
    server.wait_session()
    server.stop()
    broker.stop()
    (broker.data_dir / "mosquitto.db").unlink()  # a broker that lost its state
    broker.start()
    server.start()
    server.wait_session()
    wait_for(lambda: len(incidents(database)) == 1, 20, "the incident row")
    ((client_id, kind, detail),) = incidents(database)
    assert (client_id, kind) == ("server", "session_lost")
    assert "this server had it at" in detail
