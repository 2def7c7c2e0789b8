"""The audit log's hash chain: canonical encoding, hashing, and verification that names the bad row.

Each alert's audit rows form one chain (``alert_audit``: ``seq`` 1, 2, …):
``hash = sha256(prev_hash + canonical_row)`` with ``prev_hash`` the previous
row's hash (32 zero bytes before the first row; stored as NULL). A chain per
alert, not one for the whole log, because writers already hold the alert's
row lock when they append: no global lock serialises the servers.

The chain alone cannot show that its newest rows were deleted, so the newest
``(seq, hash)`` is also kept apart (``ChainHead``: on the alert's row or in a
heads table, written in the same transaction). ``verify_chain`` compares both
and names the first bad row: EDITED (its content no longer matches its hash,
or it was rewritten with a recomputed hash), INSERTED (a row the chain does not
link, a duplicate seq, rows beyond the head), DELETED (a gap in seq, rows
missing before the head — the newest included).

The canonical encoding is JSON with sorted keys, no spaces, UTF-8, times in
UTC with microseconds (PostgreSQL's timestamptz precision), so a row read back
from PostgreSQL (jsonb detail, timestamptz) encodes to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from alerting.model import AuditEntry, DetailValue, require_aware

ENCODING_VERSION = 1
GENESIS = bytes(32)


def _detail(detail: Mapping[str, DetailValue]) -> dict[str, DetailValue]:
    out: dict[str, DetailValue] = {}
    for key, value in detail.items():
        if not isinstance(key, str):
            raise ValueError(f"audit detail key {key!r} is not a string")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ValueError(f"audit detail {key!r}: {type(value).__name__} is not a scalar")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"audit detail {key!r}: non-finite number")
        if "\x00" in key or (isinstance(value, str) and "\x00" in value):
            # PostgreSQL text and jsonb cannot hold NUL: the row would never round-trip.
            raise ValueError(f"audit detail {key!r}: NUL character")
        out[key] = value
    return out


def encode_time(at: datetime) -> str:
    return require_aware(at, "audit time").astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_row(
    *,
    alert_id: uuid.UUID,
    seq: int,
    time: datetime,
    actor: str,
    action: str,
    channel: str | None,
    detail: Mapping[str, DetailValue],
) -> bytes:
    """The bytes a row's hash covers (everything but the hashes themselves)."""
    doc = {
        "v": ENCODING_VERSION,
        "alert_id": str(alert_id),
        "seq": seq,
        "time": encode_time(time),
        "actor": actor,
        "action": action,
        "channel": channel,
        "detail": _detail(detail),
    }
    text = json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode()


def link_hash(prev_hash: bytes | None, canonical: bytes) -> bytes:
    return hashlib.sha256((prev_hash or GENESIS) + canonical).digest()


@dataclass(frozen=True, slots=True)
class AuditRow:
    """An ``alert_audit`` row as stored (strings, not enums: tampered rows must still load)."""

    time: datetime
    alert_id: uuid.UUID
    seq: int
    actor: str
    action: str
    channel: str | None
    detail: Mapping[str, DetailValue]
    prev_hash: bytes | None
    hash: bytes

    def canonical(self) -> bytes:
        return canonical_row(
            alert_id=self.alert_id,
            seq=self.seq,
            time=self.time,
            actor=self.actor,
            action=self.action,
            channel=self.channel,
            detail=self.detail,
        )

    def consistent(self) -> bool:
        """Whether the row's content still matches its own hash."""
        try:
            return link_hash(self.prev_hash, self.canonical()) == self.hash
        except ValueError:
            return False  # a detail edited into something the encoding refuses


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest (seq, hash) of one alert's chain, stored apart from the rows."""

    alert_id: uuid.UUID
    seq: int
    hash: bytes


def chain_entry(entry: AuditEntry, head: ChainHead | None) -> tuple[AuditRow, ChainHead]:
    """Append one entry after ``head``: the row to insert and the new head to store."""
    if head is not None and head.alert_id != entry.alert_id:
        raise ValueError(f"head of alert {head.alert_id} used for alert {entry.alert_id}")
    seq = head.seq + 1 if head else 1
    prev = head.hash if head else None
    canonical = canonical_row(
        alert_id=entry.alert_id,
        seq=seq,
        time=entry.time,
        actor=entry.actor,
        action=entry.action.value,
        channel=entry.channel.value if entry.channel else None,
        detail=entry.detail,
    )
    digest = link_hash(prev, canonical)
    row = AuditRow(
        time=entry.time,
        alert_id=entry.alert_id,
        seq=seq,
        actor=entry.actor,
        action=entry.action.value,
        channel=entry.channel.value if entry.channel else None,
        detail=dict(entry.detail),
        prev_hash=prev,
        hash=digest,
    )
    return row, ChainHead(entry.alert_id, seq, digest)


def chain_entries(
    entries: Iterable[AuditEntry], head: ChainHead | None
) -> tuple[tuple[AuditRow, ...], ChainHead | None]:
    rows: list[AuditRow] = []
    for entry in entries:
        row, head = chain_entry(entry, head)
        rows.append(row)
    return tuple(rows), head


class Tamper(StrEnum):
    EDITED = "edited"
    INSERTED = "inserted"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first bad row of a chain: ``row`` is the offending row (None when deleted)."""

    alert_id: uuid.UUID
    kind: Tamper
    seq: int
    row: AuditRow | None
    message: str


def _problem(
    alert_id: uuid.UUID, kind: Tamper, seq: int, row: AuditRow | None, why: str
) -> ChainProblem:
    where = f"alert {alert_id} seq {seq}"
    if row is not None:
        where += f" (time {encode_time(row.time)}, action {row.action!r})"
    return ChainProblem(alert_id, kind, seq, row, f"{kind.value} row: {where}: {why}")


def verify_chain(
    alert_id: uuid.UUID, rows: Sequence[AuditRow], head: ChainHead | None
) -> ChainProblem | None:
    """Check one alert's rows (ordered by seq, as ``ORDER BY seq, time`` returns them)."""
    rows = sorted(rows, key=lambda r: r.seq)
    expected_prev: bytes | None = None
    before_prev: bytes | None = None
    expected_seq = 1
    last: AuditRow | None = None
    i = 0
    while i < len(rows):
        row = rows[i]
        j = i
        while j + 1 < len(rows) and rows[j + 1].seq == row.seq:
            j += 1
        if j > i:
            nxt = rows[j + 1] if j + 1 < len(rows) else None
            return _duplicate(alert_id, rows[i : j + 1], expected_prev, nxt, head)
        if row.seq > expected_seq:
            if head is not None and row.seq > head.seq:
                return _problem(alert_id, Tamper.INSERTED, row.seq, row, "beyond the chain head")
            if row.prev_hash == expected_prev and not row.consistent():
                return _problem(alert_id, Tamper.EDITED, row.seq, row, "seq changed")
            return _problem(
                alert_id, Tamper.DELETED, expected_seq, None, f"missing before seq {row.seq}"
            )
        if row.prev_hash != expected_prev:
            if last is not None and row.prev_hash == before_prev:
                return _problem(
                    alert_id, Tamper.INSERTED, last.seq, last, "the next row links past it"
                )
            if not row.consistent():
                return _problem(alert_id, Tamper.EDITED, row.seq, row, "link and hash changed")
            if last is not None:
                return _problem(
                    alert_id, Tamper.EDITED, last.seq, last, "rewritten with a recomputed hash"
                )
            return _problem(alert_id, Tamper.EDITED, row.seq, row, "first row has a prev_hash")
        if not row.consistent():
            return _problem(alert_id, Tamper.EDITED, row.seq, row, "content does not match hash")
        before_prev, expected_prev, last = expected_prev, row.hash, row
        expected_seq += 1
        i += 1
    return _check_head(alert_id, last, head)


def _check_head(
    alert_id: uuid.UUID, last: AuditRow | None, head: ChainHead | None
) -> ChainProblem | None:
    last_seq = last.seq if last else 0
    if head is None:
        if last is None:
            return None
        return _problem(alert_id, Tamper.INSERTED, 1, None, "rows without a chain head")
    if head.seq > last_seq:
        return _problem(
            alert_id, Tamper.DELETED, last_seq + 1, None, f"the head is at seq {head.seq}"
        )
    if head.seq < last_seq:  # rows past the head all linked: appended behind its back
        return _problem(alert_id, Tamper.INSERTED, head.seq + 1, last, "beyond the chain head")
    if last is not None and last.hash != head.hash:
        return _problem(alert_id, Tamper.EDITED, last.seq, last, "newest row differs from head")
    return None


def _duplicate(
    alert_id: uuid.UUID,
    group: Sequence[AuditRow],
    expected_prev: bytes | None,
    nxt: AuditRow | None,
    head: ChainHead | None,
) -> ChainProblem:
    """Two rows claim one seq: the genuine one links both ways; name the other."""
    successor = nxt.prev_hash if nxt is not None else (head.hash if head else None)

    def genuine(r: AuditRow) -> bool:
        linked = successor is None or r.hash == successor
        return r.consistent() and r.prev_hash == expected_prev and linked

    flags = [genuine(r) for r in group]
    # Exactly one genuine row: the other is the insert. Otherwise the later one is named.
    others = [r for r, ok in zip(group, flags, strict=True) if not ok]
    bad = others[0] if flags.count(True) == 1 else group[-1]
    return _problem(alert_id, Tamper.INSERTED, bad.seq, bad, "a second row with this seq")


def verify_log(
    rows: Iterable[AuditRow], heads: Mapping[uuid.UUID, ChainHead]
) -> tuple[ChainProblem, ...]:
    """Check every chain; a head whose rows are all gone is a deletion too."""
    chains: dict[uuid.UUID, list[AuditRow]] = {}
    for row in rows:
        chains.setdefault(row.alert_id, []).append(row)
    problems = []
    for alert_id in sorted(set(chains) | set(heads)):
        problem = verify_chain(alert_id, chains.get(alert_id, []), heads.get(alert_id))
        if problem is not None:
            problems.append(problem)
    return tuple(problems)
