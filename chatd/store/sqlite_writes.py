"""The SQLite writes off the hot path: accounts, conversations, group
changes, end-to-end devices and epochs, and the administration's writes.

Each function takes a pooled connection first, runs in a worker thread
(:meth:`SqliteStore._write <chatd.store.sqlite.SqliteStore._write>`) and
opens its own transaction (:class:`~chatd.store.sqlite_tx.Tx`); SQLite's
lock serialises it with the hot path's writes. The hot path's batch
(sends, events, marks, acks) is in :mod:`chatd.store.sqlite_tx`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from chatd.core.errors import Conflict, NotFound, Unavailable
from chatd.core.model import Conversation, Device, EventResult, NewMembership, Status, User
from chatd.core.names import dm_id
from chatd.ports import Reseal, UserDeleted
from chatd.store.sqlite_reads import conversation
from chatd.store.sqlite_rows import DELETED, DISABLED, epoch_upload, known_device, user_state
from chatd.store.sqlite_schema import ACK_SET, OWED_COUNT, OWED_RECEIPT
from chatd.store.sqlite_tx import Tx, membership_rows

# -- users ---------------------------------------------------------------------------


def create_user(db: sqlite3.Connection, user: User) -> None:
    try:
        with Tx(db):
            db.execute(
                "INSERT INTO users (username, pw_hash, created_ts, disabled) VALUES (?, ?, ?, ?)",
                (user.username, user.password_hash, user.created_ts, user_state(user)),
            )
    except sqlite3.IntegrityError:
        raise Conflict(f"username '{user.username}' is taken") from None


def set_last_seen(db: sqlite3.Connection, username: str, ts: int) -> None:
    with Tx(db):
        db.execute(
            "UPDATE users SET last_seen = max(coalesce(last_seen, 0), ?) WHERE username = ?",
            (ts, username),
        )


def set_disabled(db: sqlite3.Connection, username: str, disabled: bool) -> None:
    with Tx(db):
        row = db.execute("SELECT disabled FROM users WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise NotFound(f"no user '{username}'")
        if row[0] == DELETED:
            raise Conflict(f"user '{username}' is deleted")
        db.execute(
            "UPDATE users SET disabled = ? WHERE username = ?",
            (DISABLED if disabled else 0, username),
        )


def delete_user(db: sqlite3.Connection, username: str) -> UserDeleted:
    with Tx(db):
        cur = db.execute(
            "UPDATE users SET disabled = ?, pw_hash = '' WHERE username = ?",
            (DELETED, username),
        )
        if cur.rowcount == 0:
            raise NotFound(f"no user '{username}'")
        dropped = db.execute(
            "DELETE FROM receipts WHERE username = ? AND delivered_ts IS NULL",
            (username,),
        ).rowcount
        db.execute("DELETE FROM event_owed WHERE username = ?", (username,))
        owed = db.execute(
            f"SELECT {OWED_COUNT} FROM receipts WHERE sender = ? AND ({OWED_RECEIPT})",
            (username,),
        ).fetchone()[0]
        db.execute(
            f"UPDATE receipts SET {ACK_SET[Status.SEEN]} WHERE sender = ? AND ({OWED_RECEIPT})",
            (username,),
        )
    return UserDeleted(messages_dropped=dropped, receipts_settled=owed)


# -- conversations -------------------------------------------------------------------


def _made(db: sqlite3.Connection, id: str) -> Conversation:
    """The conversation just made (or found)."""
    conv = conversation(db, id)
    if conv is None:
        raise Unavailable(f"conversation {id} vanished")
    return conv


def ensure_dm(db: sqlite3.Connection, a: str, b: str, ts: int) -> Conversation:
    id = dm_id(a, b)
    conv = conversation(db, id)
    if conv is not None:
        return conv
    first, second = sorted((a, b))
    with Tx(db):
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
    return _made(db, id)


def create_group(
    db: sqlite3.Connection,
    id: str,
    title: str | None,
    members: Sequence[str],
    ts: int,
    creator: str | None,
    e2e: bool,
) -> Conversation:
    with Tx(db):
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
    return _made(db, id)


def change_group(db: sqlite3.Connection, change: NewMembership) -> EventResult:
    with Tx(db):
        return membership_rows(db, change)


# -- end-to-end devices and epochs ---------------------------------------------------


def put_device(db: sqlite3.Connection, device: Device, limit: int) -> str:
    with Tx(db):
        row = db.execute(
            "SELECT sig_key, dh_key, self_sig, removed_ts FROM devices"
            " WHERE username = ? AND device = ?",
            (device.user, device.device),
        ).fetchone()
        if row is not None:
            verdict = known_device(row, device)
            if verdict == "same":
                db.execute(
                    "UPDATE devices SET name = ? WHERE username = ? AND device = ?",
                    (device.name, device.user, device.device),
                )
            return verdict
        if db.execute("SELECT 1 FROM devices WHERE device = ?", (device.device,)).fetchone():
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


def remove_device(db: sqlite3.Connection, user: str, device: str, ts: int) -> bool:
    with Tx(db):
        cur = db.execute(
            "UPDATE devices SET removed_ts = ? WHERE username = ? AND device = ?"
            " AND removed_ts IS NULL",
            (ts, user, device),
        )
    return cur.rowcount == 1


def put_epoch(
    db: sqlite3.Connection,
    conversation: str,
    epoch: str,
    user: str,
    device: str,
    shares: Mapping[str, str],
    ts: int,
) -> str:
    with Tx(db):
        row = db.execute(
            "SELECT username, device FROM e2e_epochs WHERE conversation = ? AND epoch = ?",
            (conversation, epoch),
        ).fetchone()
        have = dict(
            db.execute(
                "SELECT recipient, share FROM e2e_shares WHERE conversation = ? AND epoch = ?",
                (conversation, epoch),
            ).fetchall()
        )
        verdict = epoch_upload(row, have, user, device, shares)
        if verdict == "conflict":
            return verdict
        if row is None:
            db.execute(
                "INSERT INTO e2e_epochs (conversation, epoch, username, device, created_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                (conversation, epoch, user, device, ts),
            )
        db.executemany(
            "INSERT OR IGNORE INTO e2e_shares (conversation, epoch, recipient, share)"
            " VALUES (?, ?, ?, ?)",
            [(conversation, epoch, d, s) for d, s in sorted(shares.items())],
        )
        return verdict


# -- administration ------------------------------------------------------------------


def reseal(db: sqlite3.Connection, batch: Sequence[Reseal]) -> list[bool]:
    out = []
    with Tx(db):
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
