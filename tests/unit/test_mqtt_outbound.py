"""The server session's publishing half: packet ids never in use, PUBACK settles, DUP re-send
after a reconnect, one message per key however often it is asked for."""

from __future__ import annotations

from gateway.mqtt.codec import PubAck, Publish, read_packets
from gateway.mqtt.outbound import SUBSCRIBE_PACKET_ID, Outbound


def sent(wire: list[bytes]) -> list[Publish]:
    packets, _ = read_packets(bytearray(b"".join(wire)))
    return [p for p in packets if isinstance(p, Publish)]


async def test_acked_messages_settle_and_in_flight_ones_are_sent_again_with_dup() -> None:
    out = Outbound(window=2)
    wire: list[bytes] = []
    a = out.publish("t/a", b"A", key="a")
    b = out.publish("t/b", b"B", key="b")
    c = out.publish("t/c", b"C", key="c")
    assert out.in_flight == 0 and out.pending == 3  # nothing written before a connection
    out.attach(wire.append, session_present=True)
    first = sent(wire)
    assert [p.payload for p in first] == [b"A", b"B"]  # the window holds c back
    assert SUBSCRIBE_PACKET_ID not in {p.packet_id for p in first}
    assert not any(p.dup for p in first)

    out.acked(PubAck(first[0].packet_id))
    assert a.done() and a.result() == 0 and not b.done()
    assert [p.payload for p in sent(wire)][-1] == b"C"  # the window moved on

    out.detach()  # connection lost: b and c stay in flight
    wire.clear()
    out.attach(wire.append, session_present=True)
    again = sent(wire)
    assert [(p.payload, p.dup) for p in again] == [(b"B", True), (b"C", True)]
    assert [p.packet_id for p in again] == [p.packet_id for p in first[1:]] + [again[1].packet_id]

    wire.clear()
    out.detach()
    out.attach(wire.append, session_present=False)  # the broker lost the session: new messages
    assert [(p.payload, p.dup) for p in sent(wire)] == [(b"B", False), (b"C", False)]
    out.acked(PubAck(again[0].packet_id, 0x87))
    assert b.result() == 0x87 and not c.done()


async def test_asking_again_for_a_key_in_flight_or_acked_sends_nothing_new() -> None:
    out = Outbound()
    wire: list[bytes] = []
    out.attach(wire.append, session_present=True)
    first = out.publish("t", b"x", key="cmd-1")
    assert out.publish("t", b"x", key="cmd-1") is first  # still in flight: the same message
    assert len(sent(wire)) == 1
    out.acked(PubAck(sent(wire)[0].packet_id))
    assert out.publish("t", b"x", key="cmd-1") is first  # acked, not yet collected
    assert len(sent(wire)) == 1
    out.publish("t", b"x", key="cmd-1")  # collected before: a new publish now
    assert len(sent(wire)) == 2


async def test_packet_ids_skip_the_subscribe_and_every_id_in_use() -> None:
    out = Outbound(window=10)
    wire: list[bytes] = []
    out.attach(wire.append, session_present=True)
    out._next_id = 65_534  # near the wrap-around
    for i in range(4):
        out.publish("t", b"x", key=i)
    ids = [p.packet_id for p in sent(wire)]
    assert ids == [65_535, 2, 3, 4]
    out.acked(PubAck(3))
    out._next_id = 1
    out.publish("t", b"x", key="again")
    assert sent(wire)[-1].packet_id == 3  # 2 is in flight, 3 was freed
