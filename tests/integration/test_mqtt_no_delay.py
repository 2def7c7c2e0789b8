"""No Nagle on the alarm path's MQTT sockets. With Nagle's algorithm on, a small
PUBLISH (an alarm) written while an earlier segment waits for its ACK is held by the
kernel until that ACK, which Linux may delay by 40 ms: bench/alert_latency.py showed
presses 30-40 ms late every 5 s (where the presses beat against the edge's readings)
until the edge's client and the broker set TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from support import GATEWAY_PASSWORDS

from gateway.local.mosquitto import MosquittoInstance
from gateway.mqtt.client import MqttClient, MqttSettings

REPO = Path(__file__).resolve().parents[2]


async def test_the_edge_client_socket_has_nagle_off(broker: MosquittoInstance) -> None:
    account = "gw-site-a"
    settings = MqttSettings(host="127.0.0.1", port=broker.port, client_id=account,
                            username=account, password=GATEWAY_PASSWORDS[account])  # fmt: skip
    async with MqttClient(settings) as client:
        await asyncio.wait_for(client.connected.wait(), 10)
        sock = client._client.socket() if client._client is not None else None
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_both_broker_configurations_turn_nagle_off(broker: MosquittoInstance) -> None:
    # Mosquitto's default is false; the production file is started for real by
    # test_ingest_guarantees.py, so an option it did not know would fail there.
    for conf in (broker.conf_file, REPO / "deploy" / "mosquitto" / "mosquitto.conf"):
        assert "set_tcp_nodelay true" in conf.read_text().splitlines(), conf
