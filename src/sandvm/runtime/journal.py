"""The runtime's journal: SQLite (WAL, synchronous writes) under ``$SANDVM_HOME/runtime``.

Every effect on a managed sandbox is recorded as an *intent* before it happens and a
*result* after, so a manager that was SIGKILLed in between can tell, on restart, what
it owned and what may be half-done. The ``sandboxes`` table is the current state,
rebuilt from the same writes. Nothing secret is ever written here: callers pass only
ids, paths, sizes and reasons.

A sandbox's state is a ``JournalState``: ``add`` records it STARTING, its keeper moves
it to RUNNING (``update``), ``end`` to ENDED (terminal, first reason wins).

Stdlib only: the keeper (``runtime/keeper.py``, run as ``python -I -S``) loads this file
by path, without the sandvm package.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: a JournalState's name, typed for the HTTP models and the CLI
StateName = Literal["starting", "running", "ended"]


class JournalState(enum.StrEnum):
    """A managed sandbox's state in the journal::

        STARTING ──▶ RUNNING ──▶ ENDED (terminal, with a reason)
            └──────────────────────▲

    STARTING: recorded, its keeper not registered yet; RUNNING: its keeper runs QEMU;
    ENDED: gone (killed, expired, failed to start, repaired). Only ``end`` ends one.
    """

    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"

    @property
    def label(self) -> StateName:
        """This state's name, as the HTTP API and the CLI show it."""
        return _LABELS[self]


_LABELS: dict[JournalState, StateName] = {
    JournalState.STARTING: "starting", JournalState.RUNNING: "running",
    JournalState.ENDED: "ended"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,              -- starting | running | ended
    created REAL NOT NULL,
    deadline REAL,                    -- TTL: killed after this time (epoch seconds)
    keeper_pid INTEGER, keeper_start TEXT,
    qemu_pid INTEGER,
    rundir TEXT, diskdir TEXT,
    record TEXT NOT NULL DEFAULT '{}', -- spec, image, accelerator: what reattaching needs
    ticket_sha256 TEXT,               -- a detach ticket, hashed
    ended REAL, end_reason TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    sandbox_id TEXT NOT NULL,
    op TEXT NOT NULL,
    phase TEXT NOT NULL,              -- intent | result
    intent_seq INTEGER,               -- for a result: its intent
    ok INTEGER,
    detail TEXT NOT NULL DEFAULT '{}',
    owner TEXT                        -- for an intent: "pid start-time" of who did it
);
CREATE INDEX IF NOT EXISTS events_by_sandbox ON events (sandbox_id, seq);
CREATE INDEX IF NOT EXISTS events_by_intent ON events (intent_seq);
"""

_FIELDS = ("state", "deadline", "keeper_pid", "keeper_start", "qemu_pid", "rundir", "diskdir",
           "record", "ticket_sha256", "ended", "end_reason")


def open_wal_db(path: Path, schema: str) -> sqlite3.Connection:
    """A SQLite database for one process and its threads: WAL, synchronous writes,
    ``schema`` applied. The file is created 0600 before SQLite opens it, so its -wal
    and -shm files take the same mode."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock at once) … ``COMMIT``; rolled back on error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def journal_path() -> Path:
    """``$SANDVM_JOURNAL`` or ``$SANDVM_HOME/runtime/journal.db``."""
    env = os.environ.get("SANDVM_JOURNAL")
    if env:
        return Path(env)
    from sandvm.assets import sandvm_home

    return sandvm_home() / "runtime" / "journal.db"


@dataclass(frozen=True)
class SandboxRecord:
    """One managed sandbox as the journal knows it."""

    id: str
    state: JournalState
    created: float
    deadline: float | None
    keeper_pid: int | None
    keeper_start: str | None
    qemu_pid: int | None
    rundir: str | None
    diskdir: str | None
    record: dict[str, Any]
    ticket_sha256: str | None
    ended: float | None
    end_reason: str | None


class Journal:
    """Intent/result log and sandbox table. One connection per process and thread."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or journal_path()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = open_wal_db(self.path, SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(events)")}
        if "owner" not in cols:  # a journal from before owners were recorded
            with self._tx() as db:  # checked again under the write lock: one adds it
                if "owner" not in {r[1] for r in db.execute("PRAGMA table_info(events)")}:
                    db.execute("ALTER TABLE events ADD COLUMN owner TEXT")
        self._owner, self._owner_pid = _me(), os.getpid()

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    # ------------------------------------------------------------------ events

    def intent(self, sandbox_id: str, op: str, **detail: Any) -> int:
        """Record that ``op`` is about to happen; returns its sequence number."""
        if self._owner_pid != os.getpid():  # a forked child writes as itself
            self._owner, self._owner_pid = _me(), os.getpid()
        with self._tx() as db:
            cur = db.execute("INSERT INTO events (ts, sandbox_id, op, phase, detail, owner)"
                             " VALUES (?, ?, ?, 'intent', ?, ?)",
                             (time.time(), sandbox_id, op, json.dumps(detail), self._owner))
            return int(cur.lastrowid or 0)

    def result(self, seq: int, *, ok: bool, **detail: Any) -> None:
        """Record how the intent ``seq`` ended."""
        with self._tx() as db:
            row = db.execute("SELECT sandbox_id, op FROM events WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                raise KeyError(f"no intent {seq} in the journal")
            db.execute("INSERT INTO events (ts, sandbox_id, op, phase, intent_seq, ok, detail)"
                       " VALUES (?, ?, ?, 'result', ?, ?, ?)",
                       (time.time(), row[0], row[1], seq, int(ok), json.dumps(detail)))

    def events(self, sandbox_id: str) -> list[dict[str, Any]]:
        """Every event of one sandbox, oldest first."""
        rows = self._db.execute(
            "SELECT seq, ts, op, phase, intent_seq, ok, detail FROM events"
            " WHERE sandbox_id = ? ORDER BY seq", (sandbox_id,)).fetchall()
        return [{"seq": r[0], "ts": r[1], "op": r[2], "phase": r[3], "intent_seq": r[4],
                 "ok": None if r[5] is None else bool(r[5]), "detail": json.loads(r[6])}
                for r in rows]

    def unfinished(self, sandbox_id: str) -> list[dict[str, Any]]:
        """Intents of ``sandbox_id`` that have no result (effects that may be half-done)."""
        done = {e["intent_seq"] for e in self.events(sandbox_id) if e["phase"] == "result"}
        return [e for e in self.events(sandbox_id)
                if e["phase"] == "intent" and e["seq"] not in done]

    def interrupted(self) -> list[dict[str, Any]]:
        """Intents, of any sandbox, that have no result and whose process is gone: effects
        a SIGKILL (or a crash) may have left half-done. Oldest first."""
        rows = self._db.execute(
            "SELECT i.seq, i.ts, i.sandbox_id, i.op, i.detail, i.owner FROM events i"
            " WHERE i.phase = 'intent' AND NOT EXISTS (SELECT 1 FROM events r"
            " WHERE r.phase = 'result' AND r.intent_seq = i.seq) ORDER BY i.seq").fetchall()
        out = []
        for seq, ts, sid, op, detail, owner in rows:
            if owner is not None and _alive(owner):
                continue  # still being done by a live process
            out.append({"seq": seq, "ts": ts, "sandbox_id": sid, "op": op,
                        "detail": json.loads(detail), "owner": owner})
        return out

    def being_created(self, sandbox_id: str) -> bool:
        """Whether a live process is still creating ``sandbox_id`` (its ``create``
        intent has no result and its process runs), however long that takes."""
        rows = self._db.execute(
            "SELECT i.owner FROM events i WHERE i.sandbox_id = ? AND i.op = 'create' AND"
            " i.phase = 'intent' AND NOT EXISTS (SELECT 1 FROM events r WHERE"
            " r.phase = 'result' AND r.intent_seq = i.seq)", (sandbox_id,)).fetchall()
        return any(owner is not None and _alive(owner) for (owner,) in rows)

    # ------------------------------------------------------------------ sandboxes

    def add(self, sandbox_id: str, **fields: Any) -> None:
        """Record a new sandbox (STARTING unless given). Raises KeyError for an unknown
        field, ValueError for a state but STARTING or RUNNING."""
        fields.setdefault("state", JournalState.STARTING)
        bad = set(fields) - set(_FIELDS)
        if bad:
            raise KeyError(f"unknown sandbox fields {sorted(bad)}")
        fields["state"] = _live_state(fields["state"])
        if "record" in fields:
            fields["record"] = json.dumps(fields["record"])
        cols = ", ".join(["id", "created", *fields])
        marks = ", ".join("?" * (len(fields) + 2))
        with self._tx() as db:
            db.execute(f"INSERT INTO sandboxes ({cols}) VALUES ({marks})",
                       (sandbox_id, time.time(), *fields.values()))

    def update(self, sandbox_id: str, *, unless_ended: bool = False, **fields: Any) -> bool:
        """Change fields of a sandbox; with ``unless_ended`` only of one not ended yet
        (returns False if it was). Raises KeyError for an unknown field or sandbox,
        ValueError for a state but STARTING or RUNNING (``end`` ends a sandbox)."""
        bad = set(fields) - set(_FIELDS)
        if bad:
            raise KeyError(f"unknown sandbox fields {sorted(bad)}")
        if "state" in fields:
            fields["state"] = _live_state(fields["state"])
        if "record" in fields:
            fields["record"] = json.dumps(fields["record"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        where = "id = ? AND state != ?" if unless_ended else "id = ?"
        with self._tx() as db:
            cur = db.execute(f"UPDATE sandboxes SET {sets} WHERE {where}",
                             (*fields.values(), sandbox_id,
                              *((JournalState.ENDED.value,) if unless_ended else ())))
            if cur.rowcount == 1:
                return True
            if db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone():
                return False
        raise KeyError(f"no sandbox {sandbox_id!r} in the journal")

    def end(self, sandbox_id: str, reason: str) -> bool:
        """Mark a sandbox ended (first reason wins); False if it already was."""
        with self._tx() as db:
            cur = db.execute("UPDATE sandboxes SET state = ?, ended = ?, end_reason = ?"
                             " WHERE id = ? AND state != ?",
                             (JournalState.ENDED.value, time.time(), reason, sandbox_id,
                              JournalState.ENDED.value))
            return cur.rowcount == 1

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute("SELECT id, state, created, deadline, keeper_pid, keeper_start,"
                               " qemu_pid, rundir, diskdir, record, ticket_sha256, ended,"
                               " end_reason FROM sandboxes WHERE id = ?",
                               (sandbox_id,)).fetchone()
        return _record(row) if row else None

    def sandboxes(self, *, include_ended: bool = False) -> list[SandboxRecord]:
        where = "" if include_ended else " WHERE state != ?"
        rows = self._db.execute("SELECT id, state, created, deadline, keeper_pid, keeper_start,"
                                " qemu_pid, rundir, diskdir, record, ticket_sha256, ended,"
                                " end_reason FROM sandboxes" + where +
                                " ORDER BY created",
                                () if include_ended else (JournalState.ENDED.value,)
                                ).fetchall()
        return [_record(r) for r in rows]


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _me() -> str:
    return f"{os.getpid()} {_start_time(os.getpid())}"


def _alive(owner: str) -> bool:
    """Whether the process ``"pid start-time"`` still runs (not a reused pid)."""
    try:
        pid_s, start = owner.split()
        return _start_time(int(pid_s)) == start
    except ValueError:
        return False


def _live_state(state: str) -> str:
    """``state`` as stored for ``add``/``update``: STARTING or RUNNING. Raises ValueError."""
    if state not in (JournalState.STARTING, JournalState.RUNNING):
        raise ValueError(f"a sandbox's state can be set to starting or running, not"
                         f" {state!r} (end() ends it)")
    return str(JournalState(state).value)


def _state(value: str) -> JournalState:
    try:
        return JournalState(value)
    except ValueError:  # written by a newer sandvm: alive as far as this one can tell
        return JournalState.RUNNING


def _record(row: tuple[Any, ...]) -> SandboxRecord:
    return SandboxRecord(id=row[0], state=_state(row[1]), created=row[2], deadline=row[3],
                         keeper_pid=row[4], keeper_start=row[5], qemu_pid=row[6],
                         rundir=row[7], diskdir=row[8], record=json.loads(row[9] or "{}"),
                         ticket_sha256=row[10], ended=row[11], end_reason=row[12])
