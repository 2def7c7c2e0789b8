"""The sans-IO MQTT codec: whole packets parsed, partial ones left for the next read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.mqtt.codec import (
    ConnAck,
    Disconnect,
    MqttProtocolError,
    PubAck,
    Publish,
    SubAck,
    encode_pubacks,
    encode_publish,
    encode_varint,
    read_packets,
)


def test_publish_round_trip_and_partial_reads() -> None:
    wire = encode_publish("eldersafe/v1/a/b/event", b"x" * 300, qos=1, packet_id=513, retain=True)
    wire += encode_publish("t/0", b"", qos=0)
    for cut in range(len(wire) + 1):
        buf = bytearray(wire[:cut])
        packets, used = read_packets(buf)
        whole = [p for p in packets if isinstance(p, Publish)]
        assert used <= cut
        buf = bytearray(wire[used:])
        rest, used2 = read_packets(buf)
        assert whole + list(rest) == [
            Publish("eldersafe/v1/a/b/event", b"x" * 300, 1, 513, retain=True),
            Publish("t/0", b"", 0, None),
        ]
        assert used + used2 == len(wire)


def test_control_packets() -> None:
    wire = bytes([0x20, 3, 1, 0, 0]) + bytes([0x90, 4, 0, 1, 0, 1]) + encode_pubacks([1, 65535])
    packets, used = read_packets(bytearray(wire))
    assert used == len(wire)
    assert packets == [ConnAck(True, 0), SubAck(1, (1,)), PubAck(1), PubAck(65535)]


def test_connack_with_properties_and_disconnect_reasons() -> None:
    """What the session watch reads: session present, and DISCONNECT "session taken over".

    The CONNACK is Mosquitto 2.0.11's answer to an empty client id under
    use_username_as_clientid (Assigned Client Identifier "gw-a", Topic Alias
    Maximum 10); a client id that is sent gets the same CONNACK without 0x12.
    """
    connack = bytes.fromhex("200d01000a22000a12000467772d61")
    taken_over = bytes([0xE0, 0x0C, 0x8E, 0x0A, 0x1F, 0x00, 0x07]) + b"taken!!"
    plain = bytes([0xE0, 0x00])
    packets, used = read_packets(bytearray(connack + taken_over + plain))
    assert used == len(connack + taken_over + plain)
    assert packets == [ConnAck(True, 0), Disconnect(0x8E), Disconnect(0)]


@given(st.integers(min_value=1, max_value=268_435_455))
def test_a_packet_announced_but_not_complete_asks_for_more_bytes(n: int) -> None:
    packets, used = read_packets(bytearray(bytes([0x30]) + encode_varint(n)))
    assert (packets, used) == ([], 0)


@given(st.binary(min_size=0, max_size=40))
def test_garbage_inside_a_whole_packet_is_a_protocol_error_not_a_crash(body: bytes) -> None:
    wire = bytearray(bytes([0x32]) + encode_varint(len(body)) + body)
    try:
        packets, used = read_packets(wire)
    except MqttProtocolError:
        return
    assert used == len(wire) and len(packets) == 1


@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(min_value=1, max_value=64))
def test_stream_split_anywhere_yields_the_same_packets(payloads: list[bytes], step: int) -> None:
    wire = b"".join(
        encode_publish(f"t/{i}", p, qos=1, packet_id=i + 1) for i, p in enumerate(payloads)
    )
    buf = bytearray()
    got: list[Publish] = []
    for i in range(0, len(wire), step):
        buf += wire[i : i + step]
        packets, used = read_packets(buf)
        del buf[:used]
        got += [p for p in packets if isinstance(p, Publish)]
    assert [p.payload for p in got] == payloads and not buf


@given(st.binary(min_size=0, max_size=40), st.binary(max_size=40))
def test_a_malformed_publish_never_reads_into_the_next_packet(body: bytes, after: bytes) -> None:
    """The inline PUBLISH parser checks each index against its own packet's end."""
    alone = bytearray(bytes([0x32]) + encode_varint(len(body)) + body)
    followed = alone + encode_publish("t/next", after, qos=1, packet_id=7)
    try:
        first, _ = read_packets(alone)
    except MqttProtocolError:
        with pytest.raises(MqttProtocolError):  # not completed with the next packet's bytes
            read_packets(followed)
        return
    packets, used = read_packets(followed)
    assert used == len(followed)
    assert packets == [*first, Publish("t/next", after, 1, 7)]
