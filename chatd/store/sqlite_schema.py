"""The SQLite schema: the tables and indexes (:data:`SCHEMA`), the columns
added since the first release (:data:`COLUMNS`, added by :func:`migrate`),
how a pooled connection is opened (:func:`connect`), and the SQL fragments
that follow from the schema (what counts as an owed receipt, what an ack
sets). No queries of its own beyond the migration.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatd.core.delivery import SETTLED_BY_ACK
from chatd.core.model import Status

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
#: database made before gets them at open (see :func:`migrate`).
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


def migrate(db: sqlite3.Connection) -> None:
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


def connect(path: Path) -> sqlite3.Connection:
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
OWED_RECEIPT = "(delivered_ts IS NOT NULL AND d_acked = 0) OR (seen_ts IS NOT NULL AND s_acked = 0)"
#: How many receipts the receipt rows owe (a row may owe two).
OWED_COUNT = (
    "coalesce(sum((delivered_ts IS NOT NULL AND d_acked = 0)"
    " + (seen_ts IS NOT NULL AND s_acked = 0)), 0)"
)


#: What acking a receipt of each status sets, derived from SETTLED_BY_ACK.
#: Only a receipt that happened is marked acked: an ack ahead of it must not
#: swallow the real one later.
_ACK_COLUMN = {
    Status.DELIVERED: "d_acked = (delivered_ts IS NOT NULL) OR d_acked",
    Status.SEEN: "s_acked = (seen_ts IS NOT NULL) OR s_acked",
}
ACK_SET = {status: ", ".join(_ACK_COLUMN[s] for s in SETTLED_BY_ACK[status]) for status in Status}
