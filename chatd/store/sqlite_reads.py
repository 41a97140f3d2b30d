"""The SQLite reads: every query a port method answers without writing.

Each function takes a pooled connection first and runs in a worker thread
(:meth:`SqliteStore._run <chatd.store.sqlite.SqliteStore._run>`): users,
conversations and their members, history and messages, what is owed to a
user (messages, events, receipts), end-to-end devices and epochs, and the
administration's counts and key walks. The rows become records in
:mod:`chatd.store.sqlite_rows`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from chatd.core.model import (
    Conversation,
    ConversationSummary,
    Device,
    Epoch,
    EpochCheck,
    EpochShare,
    Receipt,
    StoredEvent,
    StoredMessage,
    User,
)
from chatd.ports import StoreStats
from chatd.store.sqlite_rows import (
    EVENT_COLS,
    FULL_COLS,
    MSG_COLS,
    USER_COLS,
    marks,
    to_conversation,
    to_event,
    to_message,
    to_receipts,
    to_summaries,
    to_user,
    user_counts,
    with_receipts,
)
from chatd.store.sqlite_schema import OWED_COUNT, OWED_RECEIPT

# -- users ---------------------------------------------------------------------------


def get_user(db: sqlite3.Connection, username: str) -> User | None:
    row = db.execute(f"SELECT {USER_COLS} FROM users WHERE username = ?", (username,)).fetchone()
    return None if row is None else to_user(row)


def list_users(db: sqlite3.Connection, after: str | None, limit: int) -> list[User]:
    rows = db.execute(
        f"SELECT {USER_COLS} FROM users WHERE username > ? ORDER BY username LIMIT ?",
        (after or "", max(0, limit)),
    ).fetchall()
    return [to_user(r) for r in rows]


# -- conversations -------------------------------------------------------------------


def conversation(db: sqlite3.Connection, id: str) -> Conversation | None:
    row = db.execute(
        "SELECT id, kind, title, created_ts, created_by, e2e FROM conversations WHERE id = ?",
        (id,),
    ).fetchone()
    if row is None:
        return None
    rows = db.execute(
        "SELECT username, admin, joined_seq FROM members WHERE conversation = ? ORDER BY username",
        (id,),
    ).fetchall()
    return to_conversation(row, rows)


def conversations_of(db: sqlite3.Connection, username: str) -> list[ConversationSummary]:
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
    member_rows = db.execute(
        "SELECT m2.conversation, m2.username, m2.admin, m2.joined_seq FROM members m1"
        " JOIN members m2 ON m2.conversation = m1.conversation"
        " WHERE m1.username = ? ORDER BY m2.username",
        (username,),
    ).fetchall()
    last: dict[str, StoredMessage] = {}
    for row in db.execute(
        f"SELECT {FULL_COLS} FROM members mb"
        " JOIN conversations c ON c.id = mb.conversation"
        " JOIN messages m ON m.conversation = c.id AND m.seq = c.last_seq"
        " WHERE mb.username = ? AND m.seq >= mb.joined_seq",
        (username,),
    ):
        msg = to_message(row)
        last[msg.conversation] = msg
    last = {m.conversation: m for m in receipts_of(db, list(last.values()))}
    return to_summaries(rows, unread, member_rows, last)


def shares_conversation(db: sqlite3.Connection, a: str, b: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM members m1 JOIN members m2 ON m1.conversation = m2.conversation"
        " WHERE m1.username = ? AND m2.username = ? LIMIT 1",
        (a, b),
    ).fetchone()
    return row is not None


def dm_peers(db: sqlite3.Connection, username: str) -> list[str]:
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


def contacts(db: sqlite3.Connection, username: str) -> list[str]:
    return [
        r[0]
        for r in db.execute(
            "SELECT DISTINCT m2.username FROM members m1"
            " JOIN members m2 ON m2.conversation = m1.conversation"
            " WHERE m1.username = ? AND m2.username != ? ORDER BY m2.username",
            (username, username),
        )
    ]


# -- messages ------------------------------------------------------------------------


def receipts_of(db: sqlite3.Connection, messages: list[StoredMessage]) -> list[StoredMessage]:
    """The messages with their receipts and reactions."""
    if not messages:
        return messages
    ids = [m.id for m in messages]
    receipt_rows = db.execute(
        "SELECT message_id, username, delivered_ts, seen_ts FROM receipts"
        f" WHERE message_id IN ({marks(len(ids))}) ORDER BY username",
        ids,
    ).fetchall()
    reaction_rows = db.execute(
        f"SELECT message_id, username, emoji FROM reactions WHERE message_id IN ({marks(len(ids))})"
        " ORDER BY emoji, username",
        ids,
    ).fetchall()
    return with_receipts(messages, receipt_rows, reaction_rows)


def history(
    db: sqlite3.Connection,
    conversation: str,
    before: int | None,
    limit: int,
    viewer: str | None,
) -> list[StoredMessage]:
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
        f"SELECT {FULL_COLS} FROM messages m WHERE m.conversation = ? AND m.seq < ?"
        " AND m.seq >= ? ORDER BY m.seq DESC LIMIT ?",
        (conversation, before if before is not None else 2**62, start, limit),
    ).fetchall()
    return receipts_of(db, [to_message(r) for r in reversed(rows)])


def get_messages(db: sqlite3.Connection, ids: Sequence[str]) -> list[StoredMessage]:
    if not ids:
        return []
    rows = db.execute(
        f"SELECT {FULL_COLS} FROM messages m WHERE m.id IN ({marks(len(ids))})"
        " ORDER BY m.conversation, m.seq",
        list(ids),
    ).fetchall()
    return receipts_of(db, [to_message(r) for r in rows])


def sent_id(db: sqlite3.Connection, sender: str, cid: str) -> str | None:
    row = db.execute(
        "SELECT id FROM messages WHERE sender = ? AND cid = ?", (sender, cid)
    ).fetchone()
    return None if row is None else str(row[0])


# -- what is owed to a user ----------------------------------------------------------


def owed_messages(
    db: sqlite3.Connection, username: str, limit: int, after: tuple[str, int] | None
) -> list[StoredMessage]:
    conv, seq = after if after is not None else ("", 0)
    rows = db.execute(
        f"SELECT {FULL_COLS} FROM receipts r JOIN messages m ON m.id = r.message_id"
        " WHERE r.username = ? AND r.delivered_ts IS NULL"
        " AND (r.conversation, r.seq) > (?, ?)"
        " ORDER BY r.conversation, r.seq LIMIT ?",
        (username, conv, seq, limit),
    ).fetchall()
    return [to_message(r) for r in rows]


def owed_events(
    db: sqlite3.Connection, username: str, limit: int, after: tuple[str, int] | None
) -> list[StoredEvent]:
    conv, eseq = after if after is not None else ("", 0)
    rows = db.execute(
        f"SELECT {EVENT_COLS}, m.key_id, m.nonce, m.ciphertext FROM event_owed o"
        " JOIN events e ON e.id = o.event_id"
        " LEFT JOIN messages m ON m.id = e.message_id"
        " WHERE o.username = ? AND (o.conversation, o.eseq) > (?, ?)"
        " ORDER BY o.conversation, o.eseq LIMIT ?",
        (username, conv, eseq, limit),
    ).fetchall()
    return [to_event(r) for r in rows]


def owed_receipts(
    db: sqlite3.Connection, username: str, limit: int, after: tuple[str, str] | None
) -> list[Receipt]:
    mid_after, member_after = after if after is not None else ("", "")
    rows = db.execute(
        "SELECT message_id, username, conversation, delivered_ts, seen_ts, d_acked,"
        f" s_acked FROM receipts WHERE sender = ? AND ({OWED_RECEIPT})"
        " AND (message_id, username) > (?, ?)"
        " ORDER BY message_id, username LIMIT ?",
        (username, mid_after, member_after, limit),
    )
    return to_receipts(username, rows)


# -- end-to-end devices and epochs ---------------------------------------------------


def devices(db: sqlite3.Connection, user: str) -> list[Device]:
    return [
        Device(user, *row)
        for row in db.execute(
            "SELECT device, sig_key, dh_key, name, self_sig, created_ts, removed_ts"
            " FROM devices WHERE username = ? ORDER BY created_ts, device",
            (user,),
        )
    ]


def active_devices(db: sqlite3.Connection, users: Sequence[str]) -> list[str]:
    return [
        r[0]
        for r in db.execute(
            f"SELECT device FROM devices WHERE username IN ({marks(len(users))})"
            " AND removed_ts IS NULL ORDER BY device",
            tuple(users),
        )
    ]


def get_epoch(db: sqlite3.Connection, conversation: str, epoch: str) -> Epoch | None:
    row = db.execute(
        "SELECT username, device, created_ts FROM e2e_epochs WHERE conversation = ? AND epoch = ?",
        (conversation, epoch),
    ).fetchone()
    if row is None:
        return None
    to = db.execute(
        "SELECT recipient FROM e2e_shares WHERE conversation = ? AND epoch = ? ORDER BY recipient",
        (conversation, epoch),
    ).fetchall()
    return Epoch(conversation, epoch, row[0], row[1], tuple(r[0] for r in to), row[2])


def epoch_check(
    db: sqlite3.Connection, conversation: str, epoch: str, users: Sequence[str]
) -> EpochCheck:
    """:func:`get_epoch` and :func:`active_devices` in one thread hop."""
    active = tuple(active_devices(db, users)) if users else ()
    return EpochCheck(get_epoch(db, conversation, epoch), active)


def epoch_shares(
    db: sqlite3.Connection, conversation: str, epochs: Sequence[str], devices: Sequence[str]
) -> list[EpochShare]:
    return [
        EpochShare(*row)
        for row in db.execute(
            "SELECT s.epoch, e.username, e.device, s.recipient, s.share"
            " FROM e2e_shares s JOIN e2e_epochs e"
            " ON e.conversation = s.conversation AND e.epoch = s.epoch"
            f" WHERE s.conversation = ? AND s.epoch IN ({marks(len(epochs))})"
            f" AND s.recipient IN ({marks(len(devices))}) ORDER BY s.epoch, s.recipient",
            (conversation, *epochs, *devices),
        )
    ]


# -- administration ------------------------------------------------------------------


def stats(db: sqlite3.Connection, since: int) -> StoreStats:
    by_state = dict(db.execute("SELECT disabled, count(*) FROM users GROUP BY disabled").fetchall())
    conversations = db.execute("SELECT count(*) FROM conversations").fetchone()[0]
    messages, messages_since = db.execute(
        "SELECT count(*), coalesce(sum(ts >= ?), 0) FROM messages", (since,)
    ).fetchone()
    owed_messages = db.execute(
        "SELECT count(*) FROM receipts WHERE delivered_ts IS NULL"
    ).fetchone()[0]
    owed_receipts = db.execute(
        f"SELECT {OWED_COUNT} FROM receipts WHERE {OWED_RECEIPT}"
    ).fetchone()[0]
    delivered, seen = db.execute(
        "SELECT coalesce(sum(delivered_ts >= ?), 0), coalesce(sum(seen_ts >= ?), 0) FROM receipts",
        (since, since),
    ).fetchone()
    users, disabled, deleted = user_counts(by_state)
    return StoreStats(
        users=users,
        disabled=disabled,
        deleted=deleted,
        conversations=conversations,
        messages=messages,
        owed_messages=owed_messages,
        owed_receipts=owed_receipts,
        since=since,
        messages_since=messages_since,
        delivered_since=delivered,
        seen_since=seen,
    )


def count_by_key(db: sqlite3.Connection) -> dict[str, int]:
    return dict(
        db.execute(
            "SELECT key_id, count(*) FROM messages WHERE deleted = 0 GROUP BY key_id"
        ).fetchall()
    )


def messages_by_key(
    db: sqlite3.Connection, key_id: str, after: str | None, limit: int
) -> list[StoredMessage]:
    # Walks the primary key from ``after``: all pages together read the
    # table once, with no index on key_id to slow down appends.
    rows = db.execute(
        f"SELECT {MSG_COLS} FROM messages m WHERE m.id > ? AND m.key_id = ?"
        " AND m.deleted = 0 ORDER BY m.id LIMIT ?",
        (after or "", key_id, max(0, limit)),
    ).fetchall()
    return [to_message(r) for r in rows]
