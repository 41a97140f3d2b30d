"""The embedded store: SQLite in the data dir.

The database runs in WAL mode so readers never block the writer, and every
write transaction starts with ``BEGIN IMMEDIATE``, which makes seq
assignment and the (sender, cid) idempotency index atomic across threads
*and* processes (the tests run several replicas on one data dir).
Production uses MongoDB.

Where the work runs:

* **The hot path** (:meth:`SqliteStore.write`: sends, marks, receipt acks,
  group-committed by the service) runs its statements on the trio thread,
  on a connection of its own, and only the fsync goes to a worker thread.
  A worker thread running the statements costs more than the statements:
  sqlite3 releases the GIL around every step, and each hand-back is a
  futex round trip with the event loop (docs/performance.md measures it).
  That connection uses ``synchronous=NORMAL`` — commit without fsync — and
  :meth:`SqliteStore.write` then calls ``fdatasync`` on the WAL file before
  it returns: the same durability as ``synchronous=FULL``. It never waits
  in SQLite's busy handler (which sleeps, and would stop the event loop):
  a ``BEGIN IMMEDIATE`` that finds another process writing is retried
  after a trio sleep. Auto-checkpoints are off on it; every
  :data:`CHECKPOINT_EVERY` commits a PASSIVE checkpoint runs in a worker
  thread instead.
* **Everything else** (reads, accounts, conversations, administration) is
  a blocking call in a worker thread behind a limiter, on a pooled
  connection with ``synchronous=FULL`` and a busy timeout; its writes are
  serialised with the hot path's by SQLite's own lock (they wait in their
  thread, never in trio's).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import outcome
import trio

from chatd.core.delivery import SETTLED_BY_ACK, apply_mark
from chatd.core.errors import Conflict, NotFound, Unavailable
from chatd.core.events import Refusal, Target, judge, manages, plan_membership
from chatd.core.model import (
    Appended,
    Conversation,
    ConversationSummary,
    Device,
    Epoch,
    EpochShare,
    EventKind,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMembership,
    NewMessage,
    Receipt,
    ReceiptKey,
    Sealed,
    Status,
    StoredEvent,
    StoredMessage,
    Transition,
    User,
)
from chatd.core.names import GROUP_PREFIX, dm_id, rid
from chatd.ports import Reseal, Store, StoreStats, UserDeleted, Writes, Written

T = TypeVar("T")

log = logging.getLogger("chatd.store.sqlite")

SCHEMA = """
-- disabled: 0 active, 1 disabled, 2 deleted (a tombstone; see Store.delete_user).
CREATE TABLE IF NOT EXISTS users (
    username    TEXT PRIMARY KEY,
    pw_hash     TEXT NOT NULL,
    created_ts  INTEGER NOT NULL,
    last_seen   INTEGER,
    disabled    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversations (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    title       TEXT,
    created_ts  INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    last_ts     INTEGER
);
CREATE TABLE IF NOT EXISTS members (
    conversation TEXT NOT NULL,
    username     TEXT NOT NULL,
    PRIMARY KEY (conversation, username)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_user ON members (username, conversation);
CREATE TABLE IF NOT EXISTS messages (
    id           TEXT PRIMARY KEY,
    conversation TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    sender       TEXT NOT NULL,
    cid          TEXT NOT NULL,
    ts           INTEGER NOT NULL,
    key_id       TEXT NOT NULL,
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,
    UNIQUE (conversation, seq),
    UNIQUE (sender, cid)
);
-- One row per (message, recipient): the receipt state and whether the
-- sender has acked each receipt.
CREATE TABLE IF NOT EXISTS receipts (
    message_id   TEXT NOT NULL,
    username     TEXT NOT NULL,
    conversation TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    sender       TEXT NOT NULL,
    delivered_ts INTEGER,
    seen_ts      INTEGER,
    d_acked      INTEGER NOT NULL DEFAULT 0,
    s_acked      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, username)
) WITHOUT ROWID;
-- "owed to user": messages not yet delivered, in conversation/seq order.
CREATE INDEX IF NOT EXISTS owed_messages ON receipts (username, conversation, seq)
    WHERE delivered_ts IS NULL;
-- "unread per conversation".
CREATE INDEX IF NOT EXISTS unseen ON receipts (username, conversation)
    WHERE seen_ts IS NULL;
-- "receipts owed to the sender".
CREATE INDEX IF NOT EXISTS owed_receipts ON receipts (sender, message_id, username)
    WHERE (delivered_ts IS NOT NULL AND d_acked = 0) OR (seen_ts IS NOT NULL AND s_acked = 0);
-- Reactions, edits and deletions, in each conversation's own event order.
CREATE TABLE IF NOT EXISTS events (
    id           TEXT PRIMARY KEY,
    conversation TEXT NOT NULL,
    eseq         INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    by_user      TEXT NOT NULL,
    cid          TEXT NOT NULL,
    ts           INTEGER NOT NULL,
    emoji        TEXT,
    on_          INTEGER NOT NULL DEFAULT 1,
    UNIQUE (conversation, eseq),
    UNIQUE (by_user, cid)
);
CREATE INDEX IF NOT EXISTS events_by_message ON events (message_id);
-- One row per (event, member) until one of the member's devices acks it.
CREATE TABLE IF NOT EXISTS event_owed (
    username     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    conversation TEXT NOT NULL,
    eseq         INTEGER NOT NULL,
    PRIMARY KEY (username, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_owed_order ON event_owed (username, conversation, eseq);
CREATE INDEX IF NOT EXISTS event_owed_by_event ON event_owed (event_id);
-- End-to-end devices: public keys only, self-signed; never deleted.
CREATE TABLE IF NOT EXISTS devices (
    username     TEXT NOT NULL,
    device       TEXT NOT NULL,
    sig_key      TEXT NOT NULL,
    dh_key       TEXT NOT NULL,
    name         TEXT NOT NULL,
    self_sig     TEXT NOT NULL,
    created_ts   INTEGER NOT NULL,
    removed_ts   INTEGER,
    PRIMARY KEY (username, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reactions (
    message_id   TEXT NOT NULL,
    username     TEXT NOT NULL,
    emoji        TEXT NOT NULL,
    ts           INTEGER NOT NULL,
    PRIMARY KEY (message_id, username, emoji)
) WITHOUT ROWID;
-- A device id is one device's, whoever's (shares are addressed by it).
CREATE UNIQUE INDEX IF NOT EXISTS devices_by_id ON devices (device);
-- End-to-end epochs: who made each, and its key sealed to each device.
CREATE TABLE IF NOT EXISTS e2e_epochs (
    conversation TEXT NOT NULL,
    epoch        TEXT NOT NULL,
    username     TEXT NOT NULL,
    device       TEXT NOT NULL,
    created_ts   INTEGER NOT NULL,
    PRIMARY KEY (conversation, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS e2e_shares (
    conversation TEXT NOT NULL,
    epoch        TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    share        TEXT NOT NULL,
    PRIMARY KEY (conversation, epoch, recipient)
) WITHOUT ROWID;
"""

#: Columns added after the first release: (table, column, definition). A
#: database made before gets them at open (see :func:`_migrate`).
COLUMNS = (
    ("conversations", "created_by", "TEXT"),
    ("conversations", "last_eseq", "INTEGER NOT NULL DEFAULT 0"),
    ("messages", "reply_to", "TEXT"),
    ("messages", "edited_ts", "INTEGER"),
    ("messages", "edits", "INTEGER NOT NULL DEFAULT 0"),
    ("messages", "deleted", "INTEGER NOT NULL DEFAULT 0"),
    # The first seq a member may read (a member added later sees from there).
    ("members", "joined_seq", "INTEGER NOT NULL DEFAULT 1"),
    ("members", "admin", "INTEGER NOT NULL DEFAULT 0"),
    # A members event's action, users and the group after it (JSON).
    ("events", "detail", "TEXT"),
    # End-to-end (issue 12): set at creation or by the first e2e message.
    ("conversations", "e2e", "INTEGER NOT NULL DEFAULT 0"),
)


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns of :data:`COLUMNS` a database lacks (several replicas
    opening one file at once: the first one adds, the others find it)."""
    for table, column, definition in COLUMNS:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column in have:
            continue
        try:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


#: Hot-path commits between two checkpoints of the WAL into the database.
CHECKPOINT_EVERY = 500
#: How long a hot-path write waits, in total, for another process's write
#: lock before it gives up (Unavailable).
BUSY_WAIT = 30.0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, so ``sent`` survives a power
    # cut too. Group commit keeps the number of fsyncs per message low.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=30000")
    # A deleted message's ciphertext is overwritten in the database pages,
    # not only unlinked (docs/security.md: what remains in the WAL).
    conn.execute("PRAGMA secure_delete=ON")
    return conn


#: A receipt row that owes its sender at least one receipt.
_OWED_RECEIPT = (
    "(delivered_ts IS NOT NULL AND d_acked = 0) OR (seen_ts IS NOT NULL AND s_acked = 0)"
)


#: What acking a receipt of each status sets, derived from SETTLED_BY_ACK.
#: Only a receipt that happened is marked acked: an ack ahead of it must not
#: swallow the real one later.
_ACK_COLUMN = {
    Status.DELIVERED: "d_acked = (delivered_ts IS NOT NULL) OR d_acked",
    Status.SEEN: "s_acked = (seen_ts IS NOT NULL) OR s_acked",
}
_ACK_SET = {status: ", ".join(_ACK_COLUMN[s] for s in SETTLED_BY_ACK[status]) for status in Status}


class _Tx:
    """``with _Tx(conn):`` runs a BEGIN IMMEDIATE … COMMIT/ROLLBACK block."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def _message(row: sqlite3.Row | tuple) -> StoredMessage:
    id_, conversation, seq, sender, ts, key_id, nonce, ct = row[:8]
    msg = StoredMessage(
        id=id_,
        conversation=conversation,
        seq=seq,
        sender=sender,
        ts=ts,
        body=Sealed(key_id=key_id, nonce=bytes(nonce), ciphertext=bytes(ct)),
    )
    if len(row) > 8:
        cid, reply_to, edited_ts, edits, deleted = row[8:]
        msg = replace(
            msg,
            cid=cid,
            reply_to=reply_to,
            edited_ts=edited_ts,
            edits=edits,
            deleted=bool(deleted),
        )
    return msg


_MSG_COLS = "m.id, m.conversation, m.seq, m.sender, m.ts, m.key_id, m.nonce, m.ciphertext"
#: The columns history shows besides :data:`_MSG_COLS`.
_FULL_COLS = _MSG_COLS + ", m.cid, m.reply_to, m.edited_ts, m.edits, m.deleted"
#: What an erased (deleted) body is stored as.
_ERASED = ("", b"", b"")
_USER_COLS = "username, pw_hash, created_ts, last_seen, disabled"
_DISABLED, _DELETED = 1, 2


def _user(row: sqlite3.Row | tuple) -> User:
    name, pw_hash, created_ts, last_seen, disabled = row
    return User(name, pw_hash, created_ts, last_seen, bool(disabled), disabled == _DELETED)


def _append_rows(db: sqlite3.Connection, batch: Sequence[NewMessage]) -> list[Appended]:
    """Store messages inside the caller's transaction (see Store.append)."""
    out: list[Appended] = []
    for msg in batch:
        row = db.execute(
            "SELECT id, conversation, seq, ts FROM messages WHERE sender = ? AND cid = ?",
            (msg.sender, msg.cid),
        ).fetchone()
        if row is not None:
            out.append(Appended(row[0], row[1], row[2], row[3], duplicate=True))
            continue
        recipients = msg.recipients
        if msg.conversation.startswith(GROUP_PREFIX):
            # The group as it is now, whatever the caller saw: a member
            # removed a moment ago sends nothing and receives nothing.
            members = {
                r[0]
                for r in db.execute(
                    "SELECT username FROM members WHERE conversation = ?", (msg.conversation,)
                )
            }
            if msg.sender not in members:
                out.append(
                    Appended(msg.id, msg.conversation, 0, msg.ts, False, refused="forbidden")
                )
                continue
            recipients = tuple(sorted(members - {msg.sender}))
        # An end-to-end message switches the conversation (one way); a plain
        # one in an end-to-end conversation matches no row.
        seq_row = db.execute(
            "UPDATE conversations SET last_seq = last_seq + 1, last_ts = ?, e2e = e2e | ?"
            " WHERE id = ? AND (e2e = 0 OR ?) RETURNING last_seq",
            (msg.ts, int(msg.e2e), msg.conversation, int(msg.e2e)),
        ).fetchone()
        if seq_row is None:
            if db.execute(
                "SELECT 1 FROM conversations WHERE id = ?", (msg.conversation,)
            ).fetchone():
                out.append(
                    Appended(msg.id, msg.conversation, 0, msg.ts, False, refused="e2e_required")
                )
                continue
            # Rolls the whole batch back: nothing is half-written.
            raise NotFound(f"conversation {msg.conversation} does not exist")
        seq = seq_row[0]
        db.execute(
            "INSERT INTO messages (id, conversation, seq, sender, cid, ts, key_id,"
            " nonce, ciphertext, reply_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                msg.id,
                msg.conversation,
                seq,
                msg.sender,
                msg.cid,
                msg.ts,
                msg.body.key_id,
                msg.body.nonce,
                msg.body.ciphertext,
                msg.reply_to,
            ),
        )
        db.executemany(
            "INSERT INTO receipts (message_id, username, conversation, seq, sender)"
            " VALUES (?, ?, ?, ?, ?)",
            [(msg.id, r, msg.conversation, seq, msg.sender) for r in recipients],
        )
        out.append(Appended(msg.id, msg.conversation, seq, msg.ts, False, recipients))
    return out


def _mark_rows(db: sqlite3.Connection, batch: Sequence[Mark]) -> list[MarkResult]:
    """Apply marks inside the caller's transaction (see Store.mark)."""
    out: list[MarkResult] = []
    for mark in batch:
        row = db.execute(
            "SELECT conversation, sender, delivered_ts, seen_ts FROM receipts"
            " WHERE message_id = ? AND username = ?",
            (mark.message_id, mark.user),
        ).fetchone()
        if row is None:
            # The sender's own message, or one deleted for everyone (an ack
            # that crossed the deletion): nothing to do, and not an error.
            own = db.execute(
                "SELECT 1 FROM messages WHERE id = ? AND (sender = ? OR deleted = 1)",
                (mark.message_id, mark.user),
            ).fetchone()
            out.append(MarkResult((), known=own is not None))
            continue
        conversation, sender, d_ts, s_ts = row
        ts = mark.ts
        new_d, new_s, made = apply_mark(d_ts, s_ts, mark.status, ts)
        if made:
            db.execute(
                "UPDATE receipts SET delivered_ts = ?, seen_ts = ?"
                " WHERE message_id = ? AND username = ?",
                (new_d, new_s, mark.message_id, mark.user),
            )
        out.append(
            MarkResult(
                tuple(
                    Transition(mark.message_id, conversation, sender, mark.user, s, ts)
                    for s in made
                ),
                known=True,
            )
        )
    return out


def _ack_rows(db: sqlite3.Connection, acks: Sequence[tuple[str, ReceiptKey]]) -> None:
    """Apply receipt acks inside the caller's transaction (see Store.ack_receipts)."""
    by_status: dict[Status, list[tuple[str, str, str]]] = {}
    for sender, key in acks:
        by_status.setdefault(key.status, []).append((key.message_id, key.member, sender))
    for status, rows in by_status.items():
        db.executemany(
            f"UPDATE receipts SET {_ACK_SET[status]}"
            " WHERE message_id = ? AND username = ? AND sender = ?",
            rows,
        )


def _event(row: tuple) -> StoredEvent:
    id_, conversation, eseq, kind, message_id, by, ts, emoji, on, detail = row[:10]
    body = None
    if len(row) > 10 and kind == EventKind.EDITED and row[10]:
        body = Sealed(key_id=row[10], nonce=bytes(row[11]), ciphertext=bytes(row[12]))
    event = StoredEvent(
        id_, conversation, eseq, EventKind(kind), message_id, by, ts, emoji, bool(on), body
    )
    if detail:
        d = json.loads(detail)
        event = replace(
            event,
            action=d["action"],
            users=tuple(d["users"]),
            members=tuple(d["members"]),
            admins=tuple(d["admins"]),
            title=d["title"],
        )
    return event


_EVENT_COLS = (
    "e.id, e.conversation, e.eseq, e.kind, e.message_id, e.by_user, e.ts, e.emoji, e.on_, e.detail"
)


def _group(db: sqlite3.Connection, conversation: str) -> tuple[list[str], list[str], int] | None:
    """A group's members (in join order), its admins and its last seq; None
    if it is not a group."""
    row = db.execute(
        "SELECT last_seq FROM conversations WHERE id = ? AND kind = 'group'", (conversation,)
    ).fetchone()
    if row is None:
        return None
    rows = db.execute(
        "SELECT username, admin FROM members WHERE conversation = ? ORDER BY joined_seq, username",
        (conversation,),
    ).fetchall()
    return [r[0] for r in rows], [r[0] for r in rows if r[1]], row[0]


def _event_rows(db: sqlite3.Connection, batch: Sequence[NewEvent]) -> list[EventResult]:
    """Judge and apply events inside the caller's transaction (see Store)."""
    out: list[EventResult] = []
    for ev in batch:
        row = db.execute(
            f"SELECT {_EVENT_COLS} FROM events e WHERE e.by_user = ? AND e.cid = ?",
            (ev.by, ev.cid),
        ).fetchone()
        if row is not None:
            out.append(EventResult(_event(row), duplicate=True))
            continue
        msg = db.execute(
            "SELECT conversation, sender, ts, deleted, seq FROM messages WHERE id = ?",
            (ev.message_id,),
        ).fetchone()
        target = None if msg is None else Target(msg[0], msg[1], msg[2], bool(msg[3]), msg[4])
        recipients = ev.recipients
        visible_from = 1
        moderator = ev.moderator
        if ev.conversation.startswith(GROUP_PREFIX):
            group = _group(db, ev.conversation)
            members, admins = (group[0], group[1]) if group else ([], [])
            if ev.by in members:
                visible_from = db.execute(
                    "SELECT joined_seq FROM members WHERE conversation = ? AND username = ?",
                    (ev.conversation, ev.by),
                ).fetchone()[0]
                moderator = moderator or manages(ev.by, admins)
            elif not ev.moderator:  # an operator acts from outside
                target = None
            recipients = tuple(m for m in members if m != ev.by)
        mine, already = 0, False
        if ev.kind is EventKind.REACTION and target is not None:
            mine, already = db.execute(
                "SELECT count(*), coalesce(sum(emoji = ?), 0) FROM reactions"
                " WHERE message_id = ? AND username = ?",
                (ev.emoji, ev.message_id, ev.by),
            ).fetchone()
        refusal = judge(
            ev.kind,
            ev.by,
            ev.conversation,
            target,
            ev.ts,
            window_ms=ev.window_ms,
            moderator=moderator,
            visible_from=visible_from,
            reactions_by_user=mine,
            reacted_already=bool(already),
            on=ev.on,
        )
        if refusal is not None:
            out.append(EventResult(None, refused=refusal.code, reason=refusal.reason))
            continue
        eseq = db.execute(
            "UPDATE conversations SET last_eseq = last_eseq + 1 WHERE id = ? RETURNING last_eseq",
            (ev.conversation,),
        ).fetchone()[0]
        dropped: list[tuple[str, str]] = []
        if ev.kind is EventKind.REACTION:
            if ev.on:
                db.execute(
                    "INSERT OR IGNORE INTO reactions (message_id, username, emoji, ts)"
                    " VALUES (?, ?, ?, ?)",
                    (ev.message_id, ev.by, ev.emoji, ev.ts),
                )
            else:
                db.execute(
                    "DELETE FROM reactions WHERE message_id = ? AND username = ? AND emoji = ?",
                    (ev.message_id, ev.by, ev.emoji),
                )
        elif ev.kind is EventKind.EDITED:
            if ev.body is None:
                raise ValueError("an edit without a body")
            db.execute(
                "UPDATE messages SET key_id = ?, nonce = ?, ciphertext = ?, edited_ts = ?,"
                " edits = edits + 1 WHERE id = ?",
                (ev.body.key_id, ev.body.nonce, ev.body.ciphertext, ev.ts, ev.message_id),
            )
        else:
            dropped = _erase(db, ev.message_id)
        db.execute(
            "INSERT INTO events (id, conversation, eseq, kind, message_id, by_user, cid, ts,"
            " emoji, on_) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ev.id,
                ev.conversation,
                eseq,
                ev.kind.value,
                ev.message_id,
                ev.by,
                ev.cid,
                ev.ts,
                ev.emoji,
                int(ev.on),
            ),
        )
        db.executemany(
            "INSERT INTO event_owed (username, event_id, conversation, eseq) VALUES (?, ?, ?, ?)",
            [(r, ev.id, ev.conversation, eseq) for r in recipients],
        )
        stored = StoredEvent(
            ev.id,
            ev.conversation,
            eseq,
            ev.kind,
            ev.message_id,
            ev.by,
            ev.ts,
            ev.emoji,
            ev.on,
            ev.body,
        )
        out.append(EventResult(stored, dropped=tuple(dropped), recipients=recipients))
    return out


def _erase(db: sqlite3.Connection, message_id: str) -> list[tuple[str, str]]:
    """Delete a message for everyone: erase its body, its reactions, its
    receipt rows and what is owed of it and of its earlier events; the
    (user, queue key) entries that leaves stale."""
    dropped: list[tuple[str, str]] = []
    for member, sender, d_ts, s_ts, d_acked, s_acked in db.execute(
        "SELECT username, sender, delivered_ts, seen_ts, d_acked, s_acked FROM receipts"
        " WHERE message_id = ?",
        (message_id,),
    ).fetchall():
        if d_ts is None:
            dropped.append((member, message_id))
        if d_ts is not None and not d_acked:
            dropped.append((sender, rid(message_id, member, Status.DELIVERED)))
        if s_ts is not None and not s_acked:
            dropped.append((sender, rid(message_id, member, Status.SEEN)))
    dropped += db.execute(
        "SELECT o.username, o.event_id FROM events e JOIN event_owed o ON o.event_id = e.id"
        " WHERE e.message_id = ?",
        (message_id,),
    ).fetchall()
    db.execute(
        "DELETE FROM event_owed WHERE event_id IN (SELECT id FROM events WHERE message_id = ?)",
        (message_id,),
    )
    db.execute("DELETE FROM receipts WHERE message_id = ?", (message_id,))
    db.execute("DELETE FROM reactions WHERE message_id = ?", (message_id,))
    db.execute(
        "UPDATE messages SET key_id = ?, nonce = ?, ciphertext = ?, deleted = 1 WHERE id = ?",
        (*_ERASED, message_id),
    )
    return [(d[0], d[1]) for d in dropped]


def _event_ack_rows(db: sqlite3.Connection, acks: Sequence[tuple[str, str]]) -> None:
    db.executemany("DELETE FROM event_owed WHERE username = ? AND event_id = ?", acks)


class SqliteStore:
    """The Store port on SQLite. Open with :meth:`open`; close with :meth:`aclose`."""

    def __init__(self, path: Path, pool_size: int = 4) -> None:
        self.path = path
        self._pool = [_connect(path) for _ in range(pool_size)]
        self._free = list(self._pool)
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(pool_size)
        self._write_lock = trio.Lock()
        # CREATE ... IF NOT EXISTS throughout: safe when several replicas
        # sharing the data dir start at once (the busy timeout serialises them).
        self._pool[0].executescript(SCHEMA)
        _migrate(self._pool[0])
        # The hot path's own connection (see the module docstring).
        self._hot = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        self._hot.execute("PRAGMA synchronous=NORMAL")
        self._hot.execute("PRAGMA wal_autocheckpoint=0")
        self._hot.execute("PRAGMA secure_delete=ON")
        self._wal_path = f"{path}-wal"
        self._wal_fd: int | None = None
        self._commits = 0
        # Checkpoints run on a connection of their own in a worker thread,
        # beside the hot path (never holding it up).
        self._checkpointer = _connect(path)
        self._checkpoint_idle = trio.Event()
        self._checkpoint_idle.set()

    @classmethod
    def open(cls, data_dir: Path, pool_size: int = 4, *, create: bool = True) -> SqliteStore:
        """The store in ``data_dir``; with ``create=False`` an existing one only
        (raises FileNotFoundError)."""
        path = data_dir / "chatd.sqlite3"
        if not create and not path.is_file():
            raise FileNotFoundError(f"no {path.name} there")
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(path, pool_size=pool_size)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        async with self._limiter:
            with self._lock:
                conn = self._free.pop()
            try:
                return await trio.to_thread.run_sync(_guard, fn, conn, *args)
            finally:
                with self._lock:
                    self._free.append(conn)

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        # In a worker thread like a read: SQLite serialises it with the hot
        # path's writes (its busy handler sleeps in this thread, not in trio's).
        return await self._run(fn, *args)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._checkpoint_idle.wait()
        for conn in self._pool:
            conn.close()
        self._hot.close()
        self._checkpointer.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # -- the hot path ------------------------------------------------------------

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE on the hot connection, waiting (in trio) while
        another process holds the write lock."""
        delay, waited = 0.0001, 0.0
        while True:
            try:
                self._hot.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise Unavailable(f"store error: {exc}") from None
            if waited >= BUSY_WAIT:
                raise Unavailable(f"store is locked by another writer for {BUSY_WAIT:g} s")
            await trio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.002)  # the holder commits without fsync: soon

    def _wal(self) -> int:
        """An fd on the WAL file as it is now (SQLite creates it on first
        use; reopened if it was replaced)."""
        fd = self._wal_fd
        if fd is not None:
            try:
                if os.fstat(fd).st_ino == os.stat(self._wal_path).st_ino:
                    return fd
            except OSError:
                pass
            os.close(fd)
        self._wal_fd = fd = os.open(self._wal_path, os.O_RDONLY)
        return fd

    async def _hot_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one transaction on the hot connection; durable on return."""
        async with self._write_lock:
            await self._begin()
            db = self._hot
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise Unavailable(f"store error: {exc}") from None
                raise
            try:
                # Made durable before anyone hears of it; shielded so that a
                # cancelled caller does not leave a commit unsynced for the next.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(os.fdatasync, self._wal())
            except OSError as exc:
                raise Unavailable(f"store could not sync its log: {exc}") from None
            self._commits += 1
            if self._commits % CHECKPOINT_EVERY == 0:
                self._checkpoint_soon()
            return result

    def _checkpoint_soon(self) -> None:
        """Copy the WAL into the database in a worker thread (PASSIVE: it never
        waits for writers or readers); writes go on meanwhile."""
        if not self._checkpoint_idle.is_set():
            return
        self._checkpoint_idle = idle = trio.Event()
        token = trio.lowlevel.current_trio_token()
        conn = self._checkpointer

        def work() -> None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

        def done(result: outcome.Outcome[None]) -> None:
            if isinstance(result, outcome.Error):
                log.warning("WAL checkpoint failed", extra={"reason": str(result.error)})
            token.run_sync_soon(idle.set)

        trio.lowlevel.start_thread_soon(work, done, name="chatd sqlite checkpoint")

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    # -- users ---------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        def fn(db: sqlite3.Connection) -> None:
            try:
                with _Tx(db):
                    db.execute(
                        "INSERT INTO users (username, pw_hash, created_ts, disabled)"
                        " VALUES (?, ?, ?, ?)",
                        (
                            user.username,
                            user.password_hash,
                            user.created_ts,
                            _DELETED if user.deleted else int(user.disabled),
                        ),
                    )
            except sqlite3.IntegrityError:
                raise Conflict(f"username '{user.username}' is taken") from None

        await self._write(fn)

    async def get_user(self, username: str) -> User | None:
        def fn(db: sqlite3.Connection) -> User | None:
            row = db.execute(
                f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,)
            ).fetchone()
            return None if row is None else _user(row)

        return await self._run(fn)

    async def set_last_seen(self, username: str, ts: int) -> None:
        def fn(db: sqlite3.Connection) -> None:
            with _Tx(db):
                db.execute(
                    "UPDATE users SET last_seen = max(coalesce(last_seen, 0), ?)"
                    " WHERE username = ?",
                    (ts, username),
                )

        await self._write(fn)

    # -- conversations -------------------------------------------------------------

    @staticmethod
    def _conversation(db: sqlite3.Connection, id: str) -> Conversation | None:
        row = db.execute(
            "SELECT id, kind, title, created_ts, created_by, e2e FROM conversations WHERE id = ?",
            (id,),
        ).fetchone()
        if row is None:
            return None
        rows = db.execute(
            "SELECT username, admin, joined_seq FROM members WHERE conversation = ?"
            " ORDER BY username",
            (id,),
        ).fetchall()
        return Conversation(
            id=row[0],
            kind=row[1],
            members=tuple(r[0] for r in rows),
            title=row[2],
            created_ts=row[3],
            created_by=row[4],
            admins=tuple(r[0] for r in rows if r[1]),
            joined=tuple((r[0], r[2]) for r in rows if r[2] > 1),
            e2e=bool(row[5]),
        )

    async def ensure_dm(self, a: str, b: str, ts: int) -> Conversation:
        id = dm_id(a, b)
        first, second = sorted((a, b))

        def fn(db: sqlite3.Connection) -> Conversation:
            conv = self._conversation(db, id)
            if conv is not None:
                return conv
            with _Tx(db):
                cur = db.execute(
                    "INSERT OR IGNORE INTO conversations (id, kind, title, created_ts)"
                    " VALUES (?, 'dm', NULL, ?)",
                    (id, ts),
                )
                if cur.rowcount:
                    db.executemany(
                        "INSERT INTO members (conversation, username) VALUES (?, ?)",
                        [(id, first), (id, second)],
                    )
            conv = self._conversation(db, id)
            if conv is None:
                raise Unavailable(f"conversation {id} vanished")
            return conv

        return await self._write(fn)

    async def create_group(
        self,
        id: str,
        title: str | None,
        members: Sequence[str],
        ts: int,
        creator: str | None = None,
        e2e: bool = False,
    ) -> Conversation:
        def fn(db: sqlite3.Connection) -> Conversation:
            with _Tx(db):
                try:
                    db.execute(
                        "INSERT INTO conversations (id, kind, title, created_ts, created_by, e2e)"
                        " VALUES (?, 'group', ?, ?, ?, ?)",
                        (id, title, ts, creator, int(e2e)),
                    )
                except sqlite3.IntegrityError:
                    raise Conflict(f"conversation '{id}' exists") from None
                db.executemany(
                    "INSERT INTO members (conversation, username, admin) VALUES (?, ?, ?)",
                    [(id, m, int(m == creator)) for m in sorted(set(members))],
                )
            conv = self._conversation(db, id)
            if conv is None:
                raise Unavailable(f"conversation {id} vanished")
            return conv

        return await self._write(fn)

    async def change_group(self, change: NewMembership) -> EventResult:
        def fn(db: sqlite3.Connection) -> EventResult:
            with _Tx(db):
                row = db.execute(
                    "SELECT kind, title FROM conversations WHERE id = ?", (change.conversation,)
                ).fetchone()
                if row is None:
                    return EventResult(None, refused="not_found", reason="no such conversation")
                group = _group(db, change.conversation)
                members, admins, last_seq = group if group is not None else ([], [], 0)
                plan = plan_membership(
                    change.action,
                    change.by,
                    change.users,
                    change.title,
                    kind=row[0],
                    members=members,
                    admins=admins,
                    current_title=row[1],
                )
                if isinstance(plan, Refusal):
                    return EventResult(None, refused=plan.code, reason=plan.reason)
                eseq = db.execute(
                    "UPDATE conversations SET last_eseq = last_eseq + 1, title = ?"
                    " WHERE id = ? RETURNING last_eseq",
                    (plan.title, change.conversation),
                ).fetchone()[0]
                db.executemany(
                    "DELETE FROM members WHERE conversation = ? AND username = ?",
                    [(change.conversation, u) for u in plan.removed],
                )
                db.executemany(
                    "INSERT INTO members (conversation, username, joined_seq, admin)"
                    " VALUES (?, ?, ?, 0)",
                    [(change.conversation, u, last_seq + 1) for u in plan.added],
                )
                db.executemany(
                    "UPDATE members SET admin = ? WHERE conversation = ? AND username = ?",
                    [(int(m in plan.admins), change.conversation, m) for m in plan.members],
                )
                event = StoredEvent(
                    change.id,
                    change.conversation,
                    eseq,
                    EventKind.MEMBERS,
                    "",
                    change.by,
                    change.ts,
                    action=change.action.value,
                    users=plan.added or plan.removed or tuple(change.users),
                    members=plan.members,
                    admins=plan.admins,
                    title=plan.title,
                )
                detail = {
                    "action": event.action,
                    "users": list(event.users),
                    "members": list(plan.members),
                    "admins": list(plan.admins),
                    "title": plan.title,
                }
                db.execute(
                    "INSERT INTO events (id, conversation, eseq, kind, message_id, by_user, cid,"
                    " ts, detail) VALUES (?, ?, ?, 'members', '', ?, ?, ?, ?)",
                    (
                        change.id,
                        change.conversation,
                        eseq,
                        change.by,
                        change.id,
                        change.ts,
                        json.dumps(detail),
                    ),
                )
                db.executemany(
                    "INSERT INTO event_owed (username, event_id, conversation, eseq)"
                    " VALUES (?, ?, ?, ?)",
                    [(u, change.id, change.conversation, eseq) for u in plan.notify],
                )
                return EventResult(event, recipients=plan.notify)

        return await self._write(fn)

    # -- end-to-end devices --------------------------------------------------------

    async def put_device(self, device: Device, limit: int) -> str:
        def fn(db: sqlite3.Connection) -> str:
            with _Tx(db):
                row = db.execute(
                    "SELECT sig_key, dh_key, self_sig, removed_ts FROM devices"
                    " WHERE username = ? AND device = ?",
                    (device.user, device.device),
                ).fetchone()
                if row is not None:
                    same = row[:3] == (device.sig_key, device.dh_key, device.self_sig)
                    if not same or row[3] is not None:
                        return "conflict"
                    db.execute(
                        "UPDATE devices SET name = ? WHERE username = ? AND device = ?",
                        (device.name, device.user, device.device),
                    )
                    return "same"
                if db.execute(
                    "SELECT 1 FROM devices WHERE device = ?", (device.device,)
                ).fetchone():
                    return "conflict"  # another user's device id
                count = db.execute(
                    "SELECT count(*) FROM devices WHERE username = ?", (device.user,)
                ).fetchone()[0]
                if count >= limit:
                    return "full"
                db.execute(
                    "INSERT INTO devices (username, device, sig_key, dh_key, name, self_sig,"
                    " created_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        device.user,
                        device.device,
                        device.sig_key,
                        device.dh_key,
                        device.name,
                        device.self_sig,
                        device.created_ts,
                    ),
                )
                return "created"

        return await self._write(fn)

    async def remove_device(self, user: str, device: str, ts: int) -> bool:
        def fn(db: sqlite3.Connection) -> bool:
            with _Tx(db):
                cur = db.execute(
                    "UPDATE devices SET removed_ts = ? WHERE username = ? AND device = ?"
                    " AND removed_ts IS NULL",
                    (ts, user, device),
                )
            return cur.rowcount == 1

        return await self._write(fn)

    async def devices(self, user: str) -> list[Device]:
        def fn(db: sqlite3.Connection) -> list[Device]:
            return [
                Device(user, *row)
                for row in db.execute(
                    "SELECT device, sig_key, dh_key, name, self_sig, created_ts, removed_ts"
                    " FROM devices WHERE username = ? ORDER BY created_ts, device",
                    (user,),
                )
            ]

        return await self._run(fn)

    async def contacts(self, username: str) -> list[str]:
        def fn(db: sqlite3.Connection) -> list[str]:
            return [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT m2.username FROM members m1"
                    " JOIN members m2 ON m2.conversation = m1.conversation"
                    " WHERE m1.username = ? AND m2.username != ? ORDER BY m2.username",
                    (username, username),
                )
            ]

        return await self._run(fn)

    async def sent_id(self, sender: str, cid: str) -> str | None:
        def fn(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT id FROM messages WHERE sender = ? AND cid = ?", (sender, cid)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._run(fn)

    async def active_devices(self, users: Sequence[str]) -> list[str]:
        def fn(db: sqlite3.Connection) -> list[str]:
            marks = ",".join("?" * len(users))
            return [
                r[0]
                for r in db.execute(
                    f"SELECT device FROM devices WHERE username IN ({marks})"
                    " AND removed_ts IS NULL ORDER BY device",
                    tuple(users),
                )
            ]

        if not users:
            return []
        return await self._run(fn)

    # -- end-to-end epochs ---------------------------------------------------------

    async def put_epoch(
        self,
        conversation: str,
        epoch: str,
        user: str,
        device: str,
        shares: Mapping[str, str],
        ts: int,
    ) -> str:
        def fn(db: sqlite3.Connection) -> str:
            with _Tx(db):
                row = db.execute(
                    "SELECT username, device FROM e2e_epochs WHERE conversation = ? AND epoch = ?",
                    (conversation, epoch),
                ).fetchone()
                if row is not None and tuple(row) != (user, device):
                    return "conflict"
                have = dict(
                    db.execute(
                        "SELECT recipient, share FROM e2e_shares"
                        " WHERE conversation = ? AND epoch = ?",
                        (conversation, epoch),
                    ).fetchall()
                )
                if any(have.get(d, s) != s for d, s in shares.items()):
                    return "conflict"
                if row is None:
                    db.execute(
                        "INSERT INTO e2e_epochs (conversation, epoch, username, device,"
                        " created_ts) VALUES (?, ?, ?, ?, ?)",
                        (conversation, epoch, user, device, ts),
                    )
                db.executemany(
                    "INSERT OR IGNORE INTO e2e_shares (conversation, epoch, recipient, share)"
                    " VALUES (?, ?, ?, ?)",
                    [(conversation, epoch, d, s) for d, s in sorted(shares.items())],
                )
                return "created" if row is None else "added"

        return await self._write(fn)

    async def get_epoch(self, conversation: str, epoch: str) -> Epoch | None:
        def fn(db: sqlite3.Connection) -> Epoch | None:
            row = db.execute(
                "SELECT username, device, created_ts FROM e2e_epochs"
                " WHERE conversation = ? AND epoch = ?",
                (conversation, epoch),
            ).fetchone()
            if row is None:
                return None
            to = db.execute(
                "SELECT recipient FROM e2e_shares WHERE conversation = ? AND epoch = ?"
                " ORDER BY recipient",
                (conversation, epoch),
            ).fetchall()
            return Epoch(conversation, epoch, row[0], row[1], tuple(r[0] for r in to), row[2])

        return await self._run(fn)

    async def epoch_shares(
        self, conversation: str, epochs: Sequence[str], devices: Sequence[str]
    ) -> list[EpochShare]:
        def fn(db: sqlite3.Connection) -> list[EpochShare]:
            e_marks = ",".join("?" * len(epochs))
            d_marks = ",".join("?" * len(devices))
            return [
                EpochShare(*row)
                for row in db.execute(
                    "SELECT s.epoch, e.username, e.device, s.recipient, s.share"
                    " FROM e2e_shares s JOIN e2e_epochs e"
                    " ON e.conversation = s.conversation AND e.epoch = s.epoch"
                    f" WHERE s.conversation = ? AND s.epoch IN ({e_marks})"
                    f" AND s.recipient IN ({d_marks}) ORDER BY s.epoch, s.recipient",
                    (conversation, *epochs, *devices),
                )
            ]

        if not epochs or not devices:
            return []
        return await self._run(fn)

    async def get_conversation(self, id: str) -> Conversation | None:
        return await self._run(self._conversation, id)

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        def fn(db: sqlite3.Connection) -> list[ConversationSummary]:
            rows = db.execute(
                "SELECT c.id, c.kind, c.title, c.last_seq, c.last_ts, c.created_ts, c.e2e"
                " FROM members m JOIN conversations c ON c.id = m.conversation"
                " WHERE m.username = ?",
                (username,),
            ).fetchall()
            unread = dict(
                db.execute(
                    "SELECT conversation, count(*) FROM receipts"
                    " WHERE username = ? AND seen_ts IS NULL GROUP BY conversation",
                    (username,),
                ).fetchall()
            )
            members: dict[str, list[str]] = {}
            admins: dict[str, list[str]] = {}
            joined: dict[str, list[tuple[str, int]]] = {}
            for conv, member, admin, joined_seq in db.execute(
                "SELECT m2.conversation, m2.username, m2.admin, m2.joined_seq FROM members m1"
                " JOIN members m2 ON m2.conversation = m1.conversation"
                " WHERE m1.username = ? ORDER BY m2.username",
                (username,),
            ):
                members.setdefault(conv, []).append(member)
                if admin:
                    admins.setdefault(conv, []).append(member)
                if joined_seq > 1:
                    joined.setdefault(conv, []).append((member, joined_seq))
            last: dict[str, StoredMessage] = {}
            for row in db.execute(
                f"SELECT {_FULL_COLS} FROM members mb"
                " JOIN conversations c ON c.id = mb.conversation"
                " JOIN messages m ON m.conversation = c.id AND m.seq = c.last_seq"
                " WHERE mb.username = ? AND m.seq >= mb.joined_seq",
                (username,),
            ):
                msg = _message(row)
                last[msg.conversation] = msg
            last = {m.conversation: m for m in self._with_receipts(db, list(last.values()))}
            out = [
                ConversationSummary(
                    id=r[0],
                    kind=r[1],
                    title=r[2],
                    members=tuple(members.get(r[0], ())),
                    last_seq=r[3],
                    unread=unread.get(r[0], 0),
                    last_ts=r[4],
                    last_message=last.get(r[0]),
                    admins=tuple(admins.get(r[0], ())),
                    joined=tuple(joined.get(r[0], ())),
                    e2e=bool(r[6]),
                )
                for r in rows
            ]
            created = {r[0]: r[5] for r in rows}
            out.sort(key=lambda s: (s.last_ts or created[s.id], s.id), reverse=True)
            return out

        return await self._run(fn)

    async def shares_conversation(self, a: str, b: str) -> bool:
        def fn(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM members m1 JOIN members m2 ON m1.conversation = m2.conversation"
                " WHERE m1.username = ? AND m2.username = ? LIMIT 1",
                (a, b),
            ).fetchone()
            return row is not None

        return await self._run(fn)

    async def dm_peers(self, username: str) -> list[str]:
        def fn(db: sqlite3.Connection) -> list[str]:
            return [
                r[0]
                for r in db.execute(
                    "SELECT m2.username FROM members m1"
                    " JOIN conversations c ON c.id = m1.conversation AND c.kind = 'dm'"
                    " JOIN members m2 ON m2.conversation = m1.conversation AND m2.username != ?"
                    " WHERE m1.username = ?",
                    (username, username),
                )
            ]

        return await self._run(fn)

    # -- messages ------------------------------------------------------------------

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        return (await self.write(Writes(appends=batch))).appended

    @staticmethod
    def _with_receipts(
        db: sqlite3.Connection, messages: list[StoredMessage]
    ) -> list[StoredMessage]:
        if not messages:
            return messages
        marks = ",".join("?" * len(messages))
        delivered: dict[str, list[str]] = {}
        seen: dict[str, list[str]] = {}
        for mid, user, d_ts, s_ts in db.execute(
            f"SELECT message_id, username, delivered_ts, seen_ts FROM receipts"
            f" WHERE message_id IN ({marks}) ORDER BY username",
            [m.id for m in messages],
        ):
            if d_ts is not None:
                delivered.setdefault(mid, []).append(user)
            if s_ts is not None:
                seen.setdefault(mid, []).append(user)
        reactions: dict[str, dict[str, list[str]]] = {}
        for mid, user, emoji in db.execute(
            f"SELECT message_id, username, emoji FROM reactions WHERE message_id IN ({marks})"
            " ORDER BY emoji, username",
            [m.id for m in messages],
        ):
            reactions.setdefault(mid, {}).setdefault(emoji, []).append(user)
        return [
            replace(
                m,
                delivered_to=tuple(delivered.get(m.id, ())),
                seen_by=tuple(seen.get(m.id, ())),
                reactions=tuple((e, tuple(u)) for e, u in reactions.get(m.id, {}).items()),
            )
            for m in messages
        ]

    async def history(
        self, conversation: str, before: int | None, limit: int, viewer: str | None = None
    ) -> list[StoredMessage]:
        def fn(db: sqlite3.Connection) -> list[StoredMessage]:
            start = 1
            if viewer is not None:
                row = db.execute(
                    "SELECT joined_seq FROM members WHERE conversation = ? AND username = ?",
                    (conversation, viewer),
                ).fetchone()
                if row is None:
                    return []
                start = row[0]
            rows = db.execute(
                f"SELECT {_FULL_COLS} FROM messages m WHERE m.conversation = ? AND m.seq < ?"
                " AND m.seq >= ? ORDER BY m.seq DESC LIMIT ?",
                (conversation, before if before is not None else 2**62, start, limit),
            ).fetchall()
            msgs = [_message(r) for r in reversed(rows)]
            return self._with_receipts(db, msgs)

        return await self._run(fn)

    async def get_messages(self, ids: Sequence[str]) -> list[StoredMessage]:
        def fn(db: sqlite3.Connection) -> list[StoredMessage]:
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = db.execute(
                f"SELECT {_FULL_COLS} FROM messages m WHERE m.id IN ({marks})"
                " ORDER BY m.conversation, m.seq",
                list(ids),
            ).fetchall()
            return self._with_receipts(db, [_message(r) for r in rows])

        return await self._run(fn)

    # -- receipts ------------------------------------------------------------------

    async def mark(self, batch: Sequence[Mark]) -> list[MarkResult]:
        return (await self.write(Writes(marks=batch))).marked

    async def ack_receipts(self, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
        await self.write(Writes(receipt_acks=acks))
        return [None] * len(acks)

    async def write(self, writes: Writes) -> Written:
        """Appends, events, marks, receipt acks, event acks: one transaction,
        one commit (on the trio thread; see the module docstring)."""

        def fn(db: sqlite3.Connection) -> Written:
            appended = _append_rows(db, writes.appends) if writes.appends else []
            events = _event_rows(db, writes.events) if writes.events else []
            marked = _mark_rows(db, writes.marks) if writes.marks else []
            if writes.receipt_acks:
                _ack_rows(db, writes.receipt_acks)
            if writes.event_acks:
                _event_ack_rows(db, writes.event_acks)
            return Written(appended, marked, events)

        return await self._hot_write(fn)

    async def owed_messages(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredMessage]:
        conv, seq = after if after is not None else ("", 0)

        def fn(db: sqlite3.Connection) -> list[StoredMessage]:
            rows = db.execute(
                f"SELECT {_FULL_COLS} FROM receipts r JOIN messages m ON m.id = r.message_id"
                " WHERE r.username = ? AND r.delivered_ts IS NULL"
                " AND (r.conversation, r.seq) > (?, ?)"
                " ORDER BY r.conversation, r.seq LIMIT ?",
                (username, conv, seq, limit),
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._run(fn)

    async def owed_events(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredEvent]:
        conv, eseq = after if after is not None else ("", 0)

        def fn(db: sqlite3.Connection) -> list[StoredEvent]:
            rows = db.execute(
                f"SELECT {_EVENT_COLS}, m.key_id, m.nonce, m.ciphertext FROM event_owed o"
                " JOIN events e ON e.id = o.event_id"
                " LEFT JOIN messages m ON m.id = e.message_id"
                " WHERE o.username = ? AND (o.conversation, o.eseq) > (?, ?)"
                " ORDER BY o.conversation, o.eseq LIMIT ?",
                (username, conv, eseq, limit),
            ).fetchall()
            return [_event(r) for r in rows]

        return await self._run(fn)

    async def owed_receipts(
        self, username: str, limit: int, after: tuple[str, str] | None = None
    ) -> list[Receipt]:
        mid_after, member_after = after if after is not None else ("", "")

        def fn(db: sqlite3.Connection) -> list[Receipt]:
            out: list[Receipt] = []
            for mid, member, conv, d_ts, s_ts, d_acked, s_acked in db.execute(
                "SELECT message_id, username, conversation, delivered_ts, seen_ts, d_acked,"
                f" s_acked FROM receipts WHERE sender = ? AND ({_OWED_RECEIPT})"
                " AND (message_id, username) > (?, ?)"
                " ORDER BY message_id, username LIMIT ?",
                (username, mid_after, member_after, limit),
            ):
                if d_ts is not None and not d_acked:
                    out.append(Receipt(mid, conv, username, member, Status.DELIVERED, d_ts))
                if s_ts is not None and not s_acked:
                    out.append(Receipt(mid, conv, username, member, Status.SEEN, s_ts))
            return out

        return await self._run(fn)

    # -- administration ------------------------------------------------------------

    async def list_users(self, after: str | None, limit: int) -> list[User]:
        def fn(db: sqlite3.Connection) -> list[User]:
            rows = db.execute(
                f"SELECT {_USER_COLS} FROM users WHERE username > ? ORDER BY username LIMIT ?",
                (after or "", max(0, limit)),
            ).fetchall()
            return [_user(r) for r in rows]

        return await self._run(fn)

    async def set_disabled(self, username: str, disabled: bool) -> None:
        def fn(db: sqlite3.Connection) -> None:
            with _Tx(db):
                row = db.execute(
                    "SELECT disabled FROM users WHERE username = ?", (username,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no user '{username}'")
                if row[0] == _DELETED:
                    raise Conflict(f"user '{username}' is deleted")
                db.execute(
                    "UPDATE users SET disabled = ? WHERE username = ?",
                    (_DISABLED if disabled else 0, username),
                )

        await self._write(fn)

    async def delete_user(self, username: str) -> UserDeleted:
        def fn(db: sqlite3.Connection) -> UserDeleted:
            with _Tx(db):
                cur = db.execute(
                    "UPDATE users SET disabled = ?, pw_hash = '' WHERE username = ?",
                    (_DELETED, username),
                )
                if cur.rowcount == 0:
                    raise NotFound(f"no user '{username}'")
                dropped = db.execute(
                    "DELETE FROM receipts WHERE username = ? AND delivered_ts IS NULL",
                    (username,),
                ).rowcount
                db.execute("DELETE FROM event_owed WHERE username = ?", (username,))
                owed = db.execute(
                    "SELECT coalesce(sum((delivered_ts IS NOT NULL AND d_acked = 0)"
                    " + (seen_ts IS NOT NULL AND s_acked = 0)), 0) FROM receipts"
                    f" WHERE sender = ? AND ({_OWED_RECEIPT})",
                    (username,),
                ).fetchone()[0]
                db.execute(
                    f"UPDATE receipts SET {_ACK_SET[Status.SEEN]}"
                    f" WHERE sender = ? AND ({_OWED_RECEIPT})",
                    (username,),
                )
            return UserDeleted(messages_dropped=dropped, receipts_settled=owed)

        return await self._write(fn)

    async def stats(self, since: int) -> StoreStats:
        def fn(db: sqlite3.Connection) -> StoreStats:
            by_state = dict(
                db.execute("SELECT disabled, count(*) FROM users GROUP BY disabled").fetchall()
            )
            conversations = db.execute("SELECT count(*) FROM conversations").fetchone()[0]
            messages, messages_since = db.execute(
                "SELECT count(*), coalesce(sum(ts >= ?), 0) FROM messages", (since,)
            ).fetchone()
            owed_messages = db.execute(
                "SELECT count(*) FROM receipts WHERE delivered_ts IS NULL"
            ).fetchone()[0]
            owed_receipts = db.execute(
                "SELECT coalesce(sum((delivered_ts IS NOT NULL AND d_acked = 0)"
                f" + (seen_ts IS NOT NULL AND s_acked = 0)), 0) FROM receipts WHERE {_OWED_RECEIPT}"
            ).fetchone()[0]
            delivered, seen = db.execute(
                "SELECT coalesce(sum(delivered_ts >= ?), 0), coalesce(sum(seen_ts >= ?), 0)"
                " FROM receipts",
                (since, since),
            ).fetchone()
            return StoreStats(
                users=sum(by_state.values()),
                disabled=by_state.get(_DISABLED, 0) + by_state.get(_DELETED, 0),
                deleted=by_state.get(_DELETED, 0),
                conversations=conversations,
                messages=messages,
                owed_messages=owed_messages,
                owed_receipts=owed_receipts,
                since=since,
                messages_since=messages_since,
                delivered_since=delivered,
                seen_since=seen,
            )

        return await self._run(fn)

    async def count_by_key(self) -> dict[str, int]:
        def fn(db: sqlite3.Connection) -> dict[str, int]:
            return dict(
                db.execute(
                    "SELECT key_id, count(*) FROM messages WHERE deleted = 0 GROUP BY key_id"
                ).fetchall()
            )

        return await self._run(fn)

    async def messages_by_key(
        self, key_id: str, after: str | None, limit: int
    ) -> list[StoredMessage]:
        def fn(db: sqlite3.Connection) -> list[StoredMessage]:
            # Walks the primary key from ``after``: all pages together read
            # the table once, with no index on key_id to slow down appends.
            rows = db.execute(
                f"SELECT {_MSG_COLS} FROM messages m WHERE m.id > ? AND m.key_id = ?"
                " AND m.deleted = 0 ORDER BY m.id LIMIT ?",
                (after or "", key_id, max(0, limit)),
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._run(fn)

    async def reseal(self, batch: Sequence[Reseal]) -> list[bool]:
        def fn(db: sqlite3.Connection) -> list[bool]:
            out = []
            with _Tx(db):
                for item in batch:
                    cur = db.execute(
                        "UPDATE messages SET key_id = ?, nonce = ?, ciphertext = ?"
                        " WHERE id = ? AND key_id = ? AND nonce = ? AND ciphertext = ?",
                        (
                            item.body.key_id,
                            item.body.nonce,
                            item.body.ciphertext,
                            item.message_id,
                            item.expected.key_id,
                            item.expected.nonce,
                            item.expected.ciphertext,
                        ),
                    )
                    out.append(cur.rowcount == 1)
            return out

        if not batch:
            return []
        return await self._write(fn)


def _guard(fn: Callable[..., T], *args: object) -> T:
    """Run a store call; a SQLite failure becomes Unavailable (nothing else leaks)."""
    try:
        return fn(*args)
    except sqlite3.IntegrityError as exc:
        raise Unavailable(f"store refused a write: {exc}") from None
    except sqlite3.Error as exc:
        raise Unavailable(f"store error: {exc}") from None


#: Checked by the type checker (``make lint``): the class satisfies the port.
_IS_A_STORE: type[Store] = SqliteStore
