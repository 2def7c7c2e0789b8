"""The durable outbox: order, pulse dedup, level changes, and what survives a restart."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from gateway.edge.outbox import RECEIVED, Outbox


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def builder(label: str):  # type: ignore[no-untyped-def]
    def build(event_id: uuid.UUID, phase: str) -> tuple[str, bytes]:
        return f"t/{label}", f"{label}|{phase}|{event_id}".encode()

    return build


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


def test_durable_pragmas(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_events_leave_in_order_and_only_after_ack(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    ids = [box.add_occurrence(f"k{i}", 60, builder(f"e{i}")).event_id for i in range(5)]
    assert all(ids) and len(set(ids)) == 5
    items = box.peek(0, 3)
    assert [i.event_id for i in items] == ids[:3]
    assert [i.topic for i in items] == ["t/e0", "t/e1", "t/e2"]
    assert box.peek(items[-1].seq, 10)[0].event_id == ids[3]  # window continues after seq
    box.ack([items[1].seq])  # PUBACKs may come back in any order
    assert [i.event_id for i in box.peek(0, 10)] == [ids[0], ids[2], ids[3], ids[4]]
    box.ack([i.seq for i in box.peek(0, 10)])
    assert box.pending() == 0


def test_payload_carries_the_event_id(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    event_id = box.add_occurrence("k", 60, builder("x")).event_id
    assert box.peek()[0].payload == f"x|pulse|{event_id}".encode()


def test_repeat_within_window_is_the_same_event(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    first = box.add_occurrence("0001e240:7", 60, builder("a"))
    clock.now += 59
    again = box.add_occurrence("0001e240:7", 60, builder("b"))  # e.g. a second receiver
    assert again.event_id is None and again.repeat_of == first.event_id
    assert box.pending() == 1
    clock.now += 2  # window over: the same key is a new press (seq wrapped)
    later = box.add_occurrence("0001e240:7", 60, builder("c"))
    assert later.event_id not in (None, first.event_id)
    assert box.pending() == 2


def test_dedup_survives_restart_and_ack(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    first = box.add_occurrence("k", 900, builder("a"))
    box.ack([i.seq for i in box.peek()])  # sent and gone from the queue ...
    box.close()
    box = Outbox(path, clock=clock)
    clock.now += 300
    again = box.add_occurrence("k", 900, builder("a"))  # ... still a repeat after a restart
    assert again.event_id is None and again.repeat_of == first.event_id
    assert box.pending() == 0


def test_purge_forgets_only_expired_keys(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    box.add_occurrence("short", 10, builder("a"))
    box.add_occurrence("long", 100, builder("b"))
    clock.now += 50
    assert box.purge_expired() == 1
    assert box.add_occurrence("long", 100, builder("b")).event_id is None


def test_conditions_publish_only_changes(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    # A clear never preceded by a raise is no event (nothing to clear).
    assert box.add_condition("smoke-1", "smoke", False, builder("c")).event_id is None
    raised = box.add_condition("smoke-1", "smoke", True, builder("r")).event_id
    assert raised is not None
    assert box.add_condition("smoke-1", "smoke", True, builder("r")).event_id is None
    other = box.add_condition("smoke-2", "smoke", True, builder("r2")).event_id  # per device
    assert other is not None
    cleared = box.add_condition("smoke-1", "smoke", False, builder("c")).event_id
    assert cleared is not None
    payloads = [i.payload.split(b"|")[1] for i in box.peek()]
    assert payloads == [b"raise", b"raise", b"clear"]


def test_condition_level_survives_restart(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    box.add_condition("btn-1", "device_offline", True, builder("r"))
    box.close()
    box = Outbox(path, clock=clock)
    assert box.condition("btn-1", "device_offline") is True
    assert box.add_condition("btn-1", "device_offline", True, builder("r")).event_id is None
    assert box.add_condition("btn-1", "device_offline", False, builder("c")).event_id is not None


def test_unsent_events_survive_restart_in_order(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    ids = [box.add_occurrence(f"k{i}", 60, builder(str(i))).event_id for i in range(50)]
    box.ack([i.seq for i in box.peek(0, 10)])
    box.close()
    box = Outbox(path, clock=clock)
    assert [i.event_id for i in box.peek(0, 100)] == ids[10:]


def test_builder_failure_leaves_no_trace(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)

    def broken(event_id: uuid.UUID, phase: str) -> tuple[str, bytes]:
        raise ValueError("bad payload")

    with pytest.raises(ValueError):
        box.add_occurrence("k", 60, broken)
    with pytest.raises(ValueError):
        box.add_condition("d", "smoke", True, broken)
    # Neither the dedup key nor the level was recorded: the next try is an event.
    assert box.add_occurrence("k", 60, builder("a")).event_id is not None
    assert box.add_condition("d", "smoke", True, builder("a")).event_id is not None


def test_dead_letter_keeps_event_and_reason(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    event_id = box.add_occurrence("k", 60, builder("a")).event_id
    box.dead_letter(box.peek()[0].seq, "payload format invalid")
    assert box.pending() == 0 and box.dead_letters() == 1
    row = sqlite3.connect(path).execute("SELECT event_id, reason FROM dead_letter").fetchone()
    assert row == (str(event_id), "payload format invalid")


def test_command_ledger_takes_answers_and_answers_again(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    cid = uuid.uuid4()
    assert box.command_outcome(cid) is None
    first = box.take_command(cid, "btn-1", "acknowledge", b'{"cmd": 1}')
    assert (first.new, first.outcome, first.requeued) == (True, RECEIVED, False)
    # Seen again before it is answered: known, nothing queued.
    again = box.take_command(cid, "btn-1", "acknowledge", b'{"cmd": 1}')
    assert (again.new, again.outcome, again.requeued) == (False, RECEIVED, False)
    assert box.pending() == 0
    # Taken, not answered: what a restarted edge must carry out.
    box.close()
    box = Outbox(path, clock=clock)
    assert [(c.command_id, c.device, c.command) for c in box.unanswered_commands()] == [
        (cid, "btn-1", b'{"cmd": 1}')
    ]
    # The answer and its result message are one transaction.
    box.answer_command(cid, "executed", "t/btn-1/command/result", b"result-1")
    assert box.command_outcome(cid) == "executed"
    assert box.unanswered_commands() == []
    assert [(i.topic, i.payload) for i in box.peek(0, 10)] == [
        ("t/btn-1/command/result", b"result-1")
    ]
    box.ack([i.seq for i in box.peek(0, 10)])
    # A redelivery after the answer queues the recorded result again, not a new run.
    redelivered = box.take_command(cid, "btn-1", "acknowledge", b'{"cmd": 1}')
    assert (redelivered.new, redelivered.outcome, redelivered.requeued) == (
        False,
        "executed",
        True,
    )
    assert [i.payload for i in box.peek(0, 10)] == [b"result-1"]


def test_answering_an_unknown_command_changes_nothing(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    with pytest.raises(KeyError):
        box.answer_command(uuid.uuid4(), "executed", "t/x", b"r")
    assert box.pending() == 0


def test_purge_forgets_old_answers_only(path: Path, clock: Clock) -> None:
    box = Outbox(path, clock=clock)
    answered, waiting = uuid.uuid4(), uuid.uuid4()
    box.take_command(answered, "d", "hush", b"a")
    box.answer_command(answered, "refused", "t/d/command/result", b"r")
    box.take_command(waiting, "d", "hush", b"w")
    clock.now += 8 * 24 * 3600
    assert box.purge_commands(7 * 24 * 3600) == 1
    assert box.command_outcome(answered) is None
    assert box.command_outcome(waiting) == RECEIVED  # still to be carried out


def test_ledger_of_an_older_edge_gains_the_result_columns(path: Path, clock: Clock) -> None:
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE commands (command_id TEXT PRIMARY KEY, device TEXT NOT NULL, "
        "action TEXT NOT NULL, outcome TEXT NOT NULL, at REAL NOT NULL)"
    )
    cid = uuid.uuid4()
    old.execute(
        "INSERT INTO commands VALUES (?, 'btn-1', 'acknowledge', 'done via cb', 0)", (str(cid),)
    )
    old.commit()
    old.close()
    box = Outbox(path, clock=clock)
    taken = box.take_command(cid, "btn-1", "acknowledge", b"c")
    assert (taken.new, taken.requeued) == (False, False)  # known; no result to repeat
    assert box.unanswered_commands() == []
