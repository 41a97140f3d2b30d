"""The SQLite writes that run inside a transaction.

Owns :class:`Tx` (a ``BEGIN IMMEDIATE`` block on a pooled connection) and
the row functions a transaction runs: the hot path's batch (appends,
events and the erasing of a deleted message, marks, receipt acks, event
acks: :meth:`SqliteStore.write <chatd.store.sqlite.SqliteStore.write>`
runs them all in one) and a group's membership change. Each takes the
connection with the transaction open and leaves committing to the caller;
an exception rolls back the whole transaction. What is decided from rows
alone is in :mod:`chatd.store.sqlite_rows`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from chatd.core.delivery import apply_mark
from chatd.core.errors import NotFound
from chatd.core.events import Refusal, Target, judge_event, manages, plan_membership
from chatd.core.model import (
    Appended,
    EventKind,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMembership,
    NewMessage,
    Receipt,
    ReceiptKey,
    StoredEvent,
    StoredMessage,
)
from chatd.core.names import GROUP_PREFIX
from chatd.store.sqlite_rows import (
    ERASED,
    EVENT_COLS,
    FULL_COLS,
    acks_by_status,
    erased,
    membership_detail,
    membership_event,
    to_event,
    to_message,
)
from chatd.store.sqlite_schema import ACK_SET


class Tx:
    """``with Tx(conn):`` runs a BEGIN IMMEDIATE … COMMIT/ROLLBACK block."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        leave_stale_transaction(self.conn)
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            rollback_quietly(self.conn)


def leave_stale_transaction(conn: sqlite3.Connection) -> None:
    """A transaction an earlier failure could not roll back (its ROLLBACK
    failed too) is rolled back before the next one begins: otherwise the
    connection would refuse every BEGIN and hold the write lock for good."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back after a failure; a ROLLBACK that fails as well (the disk
    went away) must not hide the first error: the transaction left open is
    rolled back before the connection's next one begins."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def append_rows(db: sqlite3.Connection, batch: Sequence[NewMessage]) -> list[Appended]:
    """Store messages inside the caller's transaction (see Store.append)."""
    out: list[Appended] = []
    for msg in batch:
        # The idempotency lookup reads the whole message: a new one matches
        # no row (no extra read), a retry gets what it must route again.
        row = db.execute(
            f"SELECT {FULL_COLS} FROM messages m WHERE m.sender = ? AND m.cid = ?",
            (msg.sender, msg.cid),
        ).fetchone()
        if row is not None:
            out.append(duplicate(db, to_message(row)))
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


def duplicate(db: sqlite3.Connection, first: StoredMessage) -> Appended:
    """A retry's answer: the first message as stored, and who still owes it
    (its receipt rows not yet delivered; none once it is deleted)."""
    owed = db.execute(
        "SELECT username FROM receipts WHERE message_id = ? AND delivered_ts IS NULL"
        " ORDER BY username",
        (first.id,),
    ).fetchall()
    return Appended(
        first.id,
        first.conversation,
        first.seq,
        first.ts,
        True,
        tuple(r[0] for r in owed),
        message=first,
    )


def mark_rows(db: sqlite3.Connection, batch: Sequence[Mark]) -> list[MarkResult]:
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
                    Receipt(mark.message_id, conversation, sender, mark.user, s, ts) for s in made
                ),
                known=True,
            )
        )
    return out


def ack_rows(db: sqlite3.Connection, acks: Sequence[tuple[str, ReceiptKey]]) -> None:
    """Apply receipt acks inside the caller's transaction (see Store.ack_receipts)."""
    for status, updates in acks_by_status(acks).items():
        db.executemany(
            f"UPDATE receipts SET {ACK_SET[status]}"
            " WHERE message_id = ? AND username = ? AND sender = ?",
            updates,
        )


def group_of(db: sqlite3.Connection, conversation: str) -> tuple[list[str], list[str], int] | None:
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


def event_rows(db: sqlite3.Connection, batch: Sequence[NewEvent]) -> list[EventResult]:
    """Judge and apply events inside the caller's transaction (see Store)."""
    out: list[EventResult] = []
    for ev in batch:
        row = db.execute(
            f"SELECT {EVENT_COLS} FROM events e WHERE e.by_user = ? AND e.cid = ?",
            (ev.by, ev.cid),
        ).fetchone()
        if row is not None:
            out.append(EventResult(to_event(row), duplicate=True))
            continue
        # The message, and its conversation's mode as this transaction sees
        # it (an edit must fit it; an append earlier in it may have switched).
        msg = db.execute(
            "SELECT m.conversation, m.sender, m.ts, m.deleted, m.seq, coalesce(c.e2e, 0)"
            " FROM messages m LEFT JOIN conversations c ON c.id = m.conversation"
            " WHERE m.id = ?",
            (ev.message_id,),
        ).fetchone()
        target = (
            None
            if msg is None
            else Target(msg[0], msg[1], msg[2], bool(msg[3]), msg[4], bool(msg[5]))
        )
        recipients = ev.recipients
        visible_from = 1
        moderator = ev.moderator
        if ev.conversation.startswith(GROUP_PREFIX):
            group = group_of(db, ev.conversation)
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
        refusal = judge_event(
            ev,
            target,
            moderator=moderator,
            visible_from=visible_from,
            reactions_by_user=mine,
            reacted_already=bool(already),
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
            dropped = erase(db, ev.message_id)
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
        _owe_event(db, ev.id, ev.conversation, eseq, recipients)
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


def erase(db: sqlite3.Connection, message_id: str) -> list[tuple[str, str]]:
    """Delete a message for everyone: erase its body, its reactions, its
    receipt rows and what is owed of it and of its earlier events; the
    (user, queue key) entries that leaves stale."""
    dropped = erased(
        message_id,
        db.execute(
            "SELECT username, sender, delivered_ts, seen_ts, d_acked, s_acked FROM receipts"
            " WHERE message_id = ?",
            (message_id,),
        ).fetchall(),
    )
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
        (*ERASED, message_id),
    )
    return [(d[0], d[1]) for d in dropped]


def event_ack_rows(db: sqlite3.Connection, acks: Sequence[tuple[str, str]]) -> None:
    """Settle (user, event id) acks inside the caller's transaction."""
    db.executemany("DELETE FROM event_owed WHERE username = ? AND event_id = ?", acks)


def membership_rows(db: sqlite3.Connection, change: NewMembership) -> EventResult:
    """Judge and apply a group change inside the caller's transaction (see
    Store.change_group): the members, their admin flags, the title, and the
    ``members`` event owed to everyone before and after."""
    row = db.execute(
        "SELECT kind, title FROM conversations WHERE id = ?", (change.conversation,)
    ).fetchone()
    if row is None:
        return EventResult(None, refused="not_found", reason="no such conversation")
    found = group_of(db, change.conversation)
    members, admins, last_seq = found if found is not None else ([], [], 0)
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
        "INSERT INTO members (conversation, username, joined_seq, admin) VALUES (?, ?, ?, 0)",
        [(change.conversation, u, last_seq + 1) for u in plan.added],
    )
    db.executemany(
        "UPDATE members SET admin = ? WHERE conversation = ? AND username = ?",
        [(int(m in plan.admins), change.conversation, m) for m in plan.members],
    )
    event = membership_event(change, plan, eseq)
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
            membership_detail(event),
        ),
    )
    _owe_event(db, change.id, change.conversation, eseq, plan.notify)
    return EventResult(event, recipients=plan.notify)


def _owe_event(
    db: sqlite3.Connection, event_id: str, conversation: str, eseq: int, to: Sequence[str]
) -> None:
    """Owe an event to each of ``to`` until one of their devices acks it."""
    db.executemany(
        "INSERT INTO event_owed (username, event_id, conversation, eseq) VALUES (?, ?, ?, ?)",
        [(u, event_id, conversation, eseq) for u in to],
    )
