"""The audit hash chain: verify passes untouched and names an edited, inserted or deleted row."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerting.audit import (
    GENESIS,
    AuditRow,
    ChainHead,
    ChainProblem,
    Tamper,
    canonical_row,
    chain_entries,
    chain_entry,
    link_hash,
    verify_chain,
    verify_log,
)
from alerting.model import AuditAction, AuditEntry, Channel

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
A = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
B = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
ACTIONS = [
    AuditAction.OPENED,
    AuditAction.ESCALATED,
    AuditAction.NOTIFIED,
    AuditAction.ESCALATED,
    AuditAction.ACKNOWLEDGED,
    AuditAction.ON_SCENE,
    AuditAction.RESOLVED,
]


def entries(alert_id: uuid.UUID = A, n: int = len(ACTIONS)) -> list[AuditEntry]:
    return [
        AuditEntry(
            T0 + timedelta(seconds=30 * i),
            alert_id,
            "staff:wang.li" if i >= 4 else "system",
            ACTIONS[i % len(ACTIONS)],
            Channel.CONSOLE,
            {"step": i, "note": "跌倒 ok"},
        )
        for i in range(n)
    ]


def chain(alert_id: uuid.UUID = A, n: int = len(ACTIONS)) -> tuple[list[AuditRow], ChainHead]:
    rows, head = chain_entries(entries(alert_id, n), None)
    assert head is not None
    return list(rows), head


def forged(after: AuditRow | None, seq: int, alert_id: uuid.UUID = A) -> AuditRow:
    """A row someone INSERTs with SQL, computing its hash as the code would."""
    entry = AuditEntry(T0 + timedelta(hours=1), alert_id, "staff:intruder", AuditAction.RESOLVED,
                       Channel.CONSOLE, {"outcome": "false_alarm"})
    row, _ = chain_entry(entry, ChainHead(alert_id, seq - 1, after.hash) if after else None)
    return row


def test_the_canonical_row_and_its_hash_are_fixed_bytes() -> None:
    canonical = canonical_row(
        alert_id=A,
        seq=1,
        time=datetime(2026, 11, 23, 10, 0, tzinfo=timezone(timedelta(hours=8))),
        actor="system",
        action="opened",
        channel="device",
        detail={"z": 1, "a": "跌倒", "f": 0.1, "b": True, "n": None},
    )
    assert canonical == (
        '{"action":"opened","actor":"system","alert_id":"00000000-0000-4000-8000-0000000000a1",'
        '"channel":"device","detail":{"a":"跌倒","b":true,"f":0.1,"n":null,"z":1},'
        '"seq":1,"time":"2026-11-23T02:00:00.000000Z","v":1}'
    ).encode()
    assert link_hash(None, canonical) == hashlib.sha256(GENESIS + canonical).digest()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [1], {"x": 1}, "a\x00b"])
def test_details_the_encoding_cannot_round_trip_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="audit detail 'x'"):
        canonical_row(alert_id=A, seq=1, time=T0, actor="a", action="b", channel=None,
                      detail={"x": bad})  # type: ignore[dict-item]


def test_rows_link_to_their_predecessor_and_the_head_holds_the_newest() -> None:
    rows, head = chain()
    assert rows[0].prev_hash is None
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]
    assert [r.seq for r in rows] == list(range(1, len(ACTIONS) + 1))
    assert head == ChainHead(A, len(ACTIONS), rows[-1].hash)
    assert verify_chain(A, rows, head) is None


def test_an_edited_row_is_named() -> None:
    rows, head = chain()
    rows[2] = dataclasses.replace(rows[2], detail={"step": 2, "note": "nobody came"})
    assert verify_chain(A, rows, head) == ChainProblem(
        A, Tamper.EDITED, 3, rows[2],
        "edited row: alert 00000000-0000-4000-8000-0000000000a1 seq 3 "
        "(time 2026-11-23T02:01:00.000000Z, action 'notified'): content does not match hash",
    )


def test_an_edited_time_actor_or_channel_is_named_too() -> None:
    rows, head = chain()
    for change in ({"time": T0 + timedelta(days=1)}, {"actor": "staff:x"}, {"channel": "voice"},
                   {"action": "noted"}):
        bad = list(rows)
        bad[4] = dataclasses.replace(rows[4], **change)
        problem = verify_chain(A, bad, head)
        assert problem is not None and (problem.kind, problem.seq) == (Tamper.EDITED, 5)


def test_the_newest_row_rewritten_with_a_recomputed_hash_is_caught_by_the_head() -> None:
    rows, head = chain()
    last = rows[-1]
    edited = dataclasses.replace(last, actor="staff:someone-else")
    rows[-1] = dataclasses.replace(edited, hash=link_hash(edited.prev_hash, edited.canonical()))
    problem = verify_chain(A, rows, head)
    assert problem is not None
    assert (problem.kind, problem.seq, problem.row) == (Tamper.EDITED, 7, rows[-1])


def test_a_middle_row_rewritten_with_a_recomputed_hash_is_named() -> None:
    rows, head = chain()
    edited = dataclasses.replace(rows[3], actor="staff:someone-else")
    rows[3] = dataclasses.replace(edited, hash=link_hash(edited.prev_hash, edited.canonical()))
    problem = verify_chain(A, rows, head)
    assert problem is not None and (problem.kind, problem.seq) == (Tamper.EDITED, 4)


@pytest.mark.parametrize("before", [True, False])
def test_an_inserted_row_with_a_duplicate_seq_is_named(before: bool) -> None:
    rows, head = chain()
    fake = forged(rows[2], 4)  # links correctly to seq 3, hash self-consistent
    rows[3:3] = [fake] if before else []
    if not before:
        rows[4:4] = [fake]
    problem = verify_chain(A, rows, head)
    assert problem is not None
    assert (problem.kind, problem.seq, problem.row) == (Tamper.INSERTED, 4, fake)


def test_an_inserted_row_with_renumbered_successors_is_named() -> None:
    rows, head = chain()
    fake = forged(rows[2], 4)
    renumbered = [dataclasses.replace(r, seq=r.seq + 1) for r in rows[3:]]
    tampered = [*rows[:3], fake, *renumbered]
    problem = verify_chain(A, tampered, dataclasses.replace(head, seq=head.seq + 1))
    assert problem is not None
    assert (problem.kind, problem.seq, problem.row) == (Tamper.INSERTED, 4, fake)


def test_an_appended_row_behind_the_heads_back_is_named() -> None:
    rows, head = chain()
    fake = forged(rows[-1], 8)
    problem = verify_chain(A, [*rows, fake], head)
    assert problem is not None
    assert (problem.kind, problem.seq, problem.row) == (Tamper.INSERTED, 8, fake)
    far = forged(rows[-1], 42)
    problem = verify_chain(A, [*rows, far], head)
    assert problem is not None and (problem.kind, problem.seq) == (Tamper.INSERTED, 42)


@pytest.mark.parametrize("index", [0, 3, 6])
def test_a_deleted_row_is_named_the_newest_included(index: int) -> None:
    rows, head = chain()
    del rows[index]
    problem = verify_chain(A, rows, head)
    assert problem is not None
    assert (problem.kind, problem.seq, problem.row) == (Tamper.DELETED, index + 1, None)


def test_deleting_every_row_of_an_alert_and_a_chain_without_head_are_named() -> None:
    rows_a, head_a = chain(A)
    rows_b, head_b = chain(B, 3)
    assert verify_log([*rows_a, *rows_b], {A: head_a, B: head_b}) == ()
    problems = verify_log(rows_a, {A: head_a, B: head_b})
    assert [(p.alert_id, p.kind, p.seq) for p in problems] == [(B, Tamper.DELETED, 1)]
    problems = verify_log([*rows_a, *rows_b], {A: head_a})
    assert [(p.alert_id, p.kind, p.seq) for p in problems] == [(B, Tamper.INSERTED, 1)]


def test_rows_read_back_in_another_zone_still_verify() -> None:
    rows, head = chain()
    shanghai = timezone(timedelta(hours=8))
    moved = [dataclasses.replace(r, time=r.time.astimezone(shanghai)) for r in rows]
    assert verify_chain(A, moved, head) is None


# --- any single SQL tampering is named ------------------------------------------------

OPS = st.sampled_from(["edit", "insert_dup", "append", "delete"])


@settings(max_examples=300, deadline=None)
@given(n=st.integers(min_value=1, max_value=12), op=OPS, data=st.data())
def test_any_single_tampering_is_named_exactly(n: int, op: str, data: st.DataObject) -> None:
    rows, head = chain(A, n)
    k = data.draw(st.integers(min_value=0, max_value=n - 1))
    if op == "edit":
        field = data.draw(st.sampled_from(["detail", "actor", "time", "seq_hash"]))
        changes: dict[str, object] = {
            "detail": {"step": -1},
            "actor": "staff:x",
            "time": rows[k].time + timedelta(microseconds=1),
            "seq_hash": rows[k].hash[::-1],
        }
        key = "hash" if field == "seq_hash" else field
        rows[k] = dataclasses.replace(rows[k], **{key: changes[field]})  # type: ignore[arg-type]
        expected = (Tamper.EDITED, k + 1)
    elif op == "insert_dup":
        fake = forged(rows[k - 1] if k else None, k + 1)
        rows.insert(k + data.draw(st.integers(min_value=0, max_value=1)), fake)
        expected = (Tamper.INSERTED, k + 1)
    elif op == "append":
        rows.append(forged(rows[-1], n + 1))
        expected = (Tamper.INSERTED, n + 1)
    else:
        del rows[k]
        expected = (Tamper.DELETED, k + 1)
    problem = verify_chain(A, rows, head)
    assert problem is not None
    assert (problem.kind, problem.seq) == expected
