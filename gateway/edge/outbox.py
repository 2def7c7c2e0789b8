"""The edge's durable outbox: every alarm event survives a dead broker and a dead edge.

One SQLite file (WAL, ``synchronous=FULL``: a commit is on disk before the
driver is told it was accepted). In one transaction an event gets its stable id
(uuid4, at first sight), joins the queue, and updates the ledgers that decide
whether it is an event at all:

* the dedup ledger for pulses: ``dedup_key`` → event id, kept for the
  occurrence's window, so an RF repeat, a second receiver or a redelivery after
  a restart is the *same* event, never a new one;
* the last level per (device, condition): only changes are events, and a
  restart never re-raises a condition that was already raised.

Events leave in insertion order (``seq``) and are deleted only after the
broker's PUBACK (``ack``); an event the broker refuses for good moves to
``dead_letter`` with the reason.

Downlink commands have a ledger of their own, keyed by command id. A command
is *taken* (``take_command``, state ``received``) before its PUBLISH is
acknowledged to the broker, so one that was acknowledged is never lost; it is
*answered* (``answer_command``) in one transaction with its result joining the
outbox queue, so the result reaches MQTT as durably as an event. A command id
seen again re-queues the recorded result instead of being carried out twice;
commands taken but not answered when the edge died are carried out on the
next start (``unanswered_commands``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Builds (topic, payload) for an event id and phase ("raise"/"clear"/"pulse").
EventBuilder = Callable[[uuid.UUID, str], tuple[str, bytes]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,  -- an event's id, or a fresh one for a command result
    topic      TEXT NOT NULL,
    payload    BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    key        TEXT PRIMARY KEY,
    event_id   TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup (expires_at);
CREATE TABLE IF NOT EXISTS conditions (
    device     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    active     INTEGER NOT NULL,
    event_id   TEXT,
    changed_at REAL NOT NULL,
    PRIMARY KEY (device, kind)
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT NOT NULL,
    topic      TEXT NOT NULL,
    payload    BLOB NOT NULL,
    reason     TEXT NOT NULL,
    at         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    device     TEXT NOT NULL,
    action     TEXT NOT NULL,
    outcome    TEXT NOT NULL,  -- 'received' until answered, then the result's outcome
    at         REAL NOT NULL,
    command    BLOB,           -- the command's payload as taken (carried out after a restart)
    result_topic TEXT,
    result     BLOB            -- the answer, queued again for a redelivered command id
);
"""

RECEIVED = "received"  # a command taken, not yet answered


@dataclass(frozen=True, slots=True)
class OutboxItem:
    seq: int
    event_id: uuid.UUID
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the outbox made of an observation: a new event, or why not."""

    event_id: uuid.UUID | None  # None: not an event (repeat, or no level change)
    repeat_of: uuid.UUID | None = None  # for a deduplicated pulse: the original event


@dataclass(frozen=True, slots=True)
class TakenCommand:
    """What the ledger knew of a command id when it was taken."""

    command_id: uuid.UUID
    device: str
    command: bytes  # the payload as first taken
    outcome: str  # RECEIVED (not answered yet) or the recorded result's outcome
    new: bool  # first time this id was seen
    requeued: bool = False  # answered before: the recorded result was queued again


class Outbox:
    """Synchronous core (one connection, one thread); see ``AsyncOutbox`` for the edge."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock  # wall clock: windows must survive a reboot
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(commands)")}
        for column, type_ in (("command", "BLOB"), ("result_topic", "TEXT"), ("result", "BLOB")):
            if column not in columns:  # a ledger written before command results existed
                self._db.execute(f"ALTER TABLE commands ADD COLUMN {column} {type_}")

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _enqueue(
        self, db: sqlite3.Connection, event_id: uuid.UUID, built: tuple[str, bytes]
    ) -> None:
        topic, payload = built
        db.execute(
            "INSERT INTO outbox (event_id, topic, payload, created_at) VALUES (?, ?, ?, ?)",
            (str(event_id), topic, payload, self._clock()),
        )

    # -- producers ---------------------------------------------------------------------

    def add_occurrence(self, dedup_key: str, window_s: float, build: EventBuilder) -> Accepted:
        """A pulse: a new event unless ``dedup_key`` was seen within its window."""
        now = self._clock()
        db = self._tx()
        try:
            row = db.execute(
                "SELECT event_id, expires_at FROM dedup WHERE key = ?", (dedup_key,)
            ).fetchone()
            if row is not None and row[1] > now:
                self._commit()
                return Accepted(None, repeat_of=uuid.UUID(row[0]))
            event_id = uuid.uuid4()
            self._enqueue(db, event_id, build(event_id, "pulse"))
            db.execute(
                "INSERT OR REPLACE INTO dedup (key, event_id, expires_at) VALUES (?, ?, ?)",
                (dedup_key, str(event_id), now + window_s),
            )
            self._commit()
            return Accepted(event_id)
        except BaseException:
            self._rollback()
            raise

    def add_condition(self, device: str, kind: str, active: bool, build: EventBuilder) -> Accepted:
        """A level: an event (raise/clear) only when it differs from the last one stored.

        The first level ever seen is an event only if it is active: clearing a
        condition that was never raised would be noise.
        """
        now = self._clock()
        db = self._tx()
        try:
            row = db.execute(
                "SELECT active FROM conditions WHERE device = ? AND kind = ?", (device, kind)
            ).fetchone()
            previous = None if row is None else bool(row[0])
            if previous == active or (previous is None and not active):
                if previous is None:
                    db.execute(
                        "INSERT INTO conditions (device, kind, active, event_id, changed_at) "
                        "VALUES (?, ?, 0, NULL, ?)",
                        (device, kind, now),
                    )
                self._commit()
                return Accepted(None)
            event_id = uuid.uuid4()
            self._enqueue(db, event_id, build(event_id, "raise" if active else "clear"))
            db.execute(
                "INSERT OR REPLACE INTO conditions (device, kind, active, event_id, changed_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (device, kind, int(active), str(event_id), now),
            )
            self._commit()
            return Accepted(event_id)
        except BaseException:
            self._rollback()
            raise

    def condition(self, device: str, kind: str) -> bool | None:
        row = self._db.execute(
            "SELECT active FROM conditions WHERE device = ? AND kind = ?", (device, kind)
        ).fetchone()
        return None if row is None else bool(row[0])

    # -- the sender --------------------------------------------------------------------

    def peek(self, after_seq: int = 0, limit: int = 100) -> list[OutboxItem]:
        """The oldest events after ``after_seq``, in order."""
        rows = self._db.execute(
            "SELECT seq, event_id, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [OutboxItem(r[0], uuid.UUID(r[1]), r[2], bytes(r[3])) for r in rows]

    def ack(self, seqs: Iterable[int]) -> None:
        """Delete events the broker acknowledged (PUBACK), in one transaction."""
        seqs = list(seqs)
        if not seqs:
            return
        db = self._tx()
        try:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
            self._commit()
        except BaseException:
            self._rollback()
            raise

    def dead_letter(self, seq: int, reason: str) -> None:
        """Move an event the broker refuses for good out of the queue, keeping it and why."""
        db = self._tx()
        try:
            db.execute(
                "INSERT OR REPLACE INTO dead_letter (seq, event_id, topic, payload, reason, at) "
                "SELECT seq, event_id, topic, payload, ?, ? FROM outbox WHERE seq = ?",
                (reason, self._clock(), seq),
            )
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._commit()
        except BaseException:
            self._rollback()
            raise

    def pending(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def dead_letters(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM dead_letter").fetchone()[0])

    def purge_expired(self) -> int:
        """Forget dedup keys whose window has passed (keeps the ledger small)."""
        db = self._tx()
        try:
            n = db.execute("DELETE FROM dedup WHERE expires_at <= ?", (self._clock(),)).rowcount
            self._commit()
            return int(n)
        except BaseException:
            self._rollback()
            raise

    # -- commands ----------------------------------------------------------------------

    def take_command(
        self, command_id: uuid.UUID, device: str, action: str, command: bytes
    ) -> TakenCommand:
        """Record a command as received (durable before its PUBACK), or say what is known.

        For an id answered before, the recorded result joins the outbox queue
        again (same transaction), so a redelivery is answered, not executed.
        """
        db = self._tx()
        try:
            row = db.execute(
                "SELECT device, outcome, command, result_topic, result FROM commands "
                "WHERE command_id = ?",
                (str(command_id),),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO commands (command_id, device, action, outcome, at, command) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (str(command_id), device, action, RECEIVED, self._clock(), command),
                )
                self._commit()
                return TakenCommand(command_id, device, command, RECEIVED, new=True)
            known_device, outcome, known_command, result_topic, result = row
            requeued = outcome != RECEIVED and result_topic is not None and result is not None
            if requeued:
                self._enqueue(db, uuid.uuid4(), (result_topic, bytes(result)))
            self._commit()
            return TakenCommand(
                command_id,
                known_device,
                bytes(known_command or b""),
                outcome,
                new=False,
                requeued=requeued,
            )
        except BaseException:
            self._rollback()
            raise

    def answer_command(
        self, command_id: uuid.UUID, outcome: str, result_topic: str, result: bytes
    ) -> None:
        """Record a command's answer and queue the result message, in one transaction."""
        db = self._tx()
        try:
            updated = db.execute(
                "UPDATE commands SET outcome = ?, result_topic = ?, result = ?, at = ? "
                "WHERE command_id = ?",
                (outcome, result_topic, result, self._clock(), str(command_id)),
            ).rowcount
            if updated != 1:
                raise KeyError(f"command {command_id} was never taken")
            self._enqueue(db, uuid.uuid4(), (result_topic, result))
            self._commit()
        except BaseException:
            self._rollback()
            raise

    def command_outcome(self, command_id: uuid.UUID) -> str | None:
        row = self._db.execute(
            "SELECT outcome FROM commands WHERE command_id = ?", (str(command_id),)
        ).fetchone()
        return None if row is None else str(row[0])

    def unanswered_commands(self) -> list[TakenCommand]:
        """Commands taken (their PUBLISH acknowledged) but not answered: carry them out."""
        rows = self._db.execute(
            "SELECT command_id, device, command FROM commands WHERE outcome = ? ORDER BY at",
            (RECEIVED,),
        ).fetchall()
        return [
            TakenCommand(uuid.UUID(r[0]), r[1], bytes(r[2] or b""), RECEIVED, new=False)
            for r in rows
        ]

    def purge_commands(self, older_than_s: float = 7 * 24 * 3600) -> int:
        """Forget answered commands older than ``older_than_s`` (a redelivery comes sooner)."""
        db = self._tx()
        try:
            n = db.execute(
                "DELETE FROM commands WHERE outcome != ? AND at < ?",
                (RECEIVED, self._clock() - older_than_s),
            ).rowcount
            self._commit()
            return int(n)
        except BaseException:
            self._rollback()
            raise


class AsyncOutbox:
    """The outbox for asyncio code: every call runs on one dedicated thread.

    fsync on each commit must not stall the event loop (MQTT keepalive,
    serial reads); one thread keeps SQLite's single connection serialised.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.sync = outbox
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        # The level each (device, kind) is known to have on disk, and the calls for
        # it still running: a Modbus poll reports every level every second, and a
        # repeat of a stored level needs no transaction. Only a key with nothing in
        # flight is answered from memory, so a raise queued behind a clear is never
        # mistaken for "unchanged".
        self._levels: dict[tuple[str, str], bool] = {}
        self._level_calls: dict[tuple[str, str], int] = {}

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def add_occurrence(
        self, dedup_key: str, window_s: float, build: EventBuilder
    ) -> Accepted:
        return await self._run(partial(self.sync.add_occurrence, dedup_key, window_s, build))

    async def add_condition(
        self, device: str, kind: str, active: bool, build: EventBuilder
    ) -> Accepted:
        key = (device, kind)
        if not self._level_calls.get(key) and self._levels.get(key) is active:
            return Accepted(None)
        self._level_calls[key] = self._level_calls.get(key, 0) + 1
        try:
            accepted = await self._run(
                partial(self.sync.add_condition, device, kind, active, build)
            )
        finally:
            left = self._level_calls[key] - 1
            if left:
                self._level_calls[key] = left
            else:
                del self._level_calls[key]
        self._levels[key] = active  # committed: the stored level is this one
        return accepted

    async def peek(self, after_seq: int, limit: int) -> list[OutboxItem]:
        return await self._run(partial(self.sync.peek, after_seq, limit))

    async def ack(self, seqs: Sequence[int]) -> None:
        await self._run(partial(self.sync.ack, seqs))

    async def dead_letter(self, seq: int, reason: str) -> None:
        await self._run(partial(self.sync.dead_letter, seq, reason))

    async def pending(self) -> int:
        return await self._run(self.sync.pending)

    async def dead_letters(self) -> int:
        return await self._run(self.sync.dead_letters)

    async def purge_expired(self) -> int:
        return await self._run(self.sync.purge_expired)

    async def take_command(
        self, command_id: uuid.UUID, device: str, action: str, command: bytes
    ) -> TakenCommand:
        return await self._run(partial(self.sync.take_command, command_id, device, action, command))

    async def answer_command(
        self, command_id: uuid.UUID, outcome: str, result_topic: str, result: bytes
    ) -> None:
        await self._run(
            partial(self.sync.answer_command, command_id, outcome, result_topic, result)
        )

    async def command_outcome(self, command_id: uuid.UUID) -> str | None:
        return await self._run(partial(self.sync.command_outcome, command_id))

    async def unanswered_commands(self) -> list[TakenCommand]:
        return await self._run(self.sync.unanswered_commands)

    async def purge_commands(self, older_than_s: float = 7 * 24 * 3600) -> int:
        return await self._run(partial(self.sync.purge_commands, older_than_s))

    async def close(self) -> None:
        await self._run(self.sync.close)
        self._executor.shutdown(wait=True)
