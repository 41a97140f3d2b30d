"""SQLite rows <-> chatd's records, and the small decisions made on rows.

Owns the column lists the queries select, how each selected row becomes a
record (user, message, event, conversation, summary, receipt), how a
``members`` event's detail is stored, and what a store call decides from
rows it has read (what erasing a message leaves stale, whether a device or
an epoch upload conflicts). Pure: no I/O, no connection; the queries that
feed these functions are in :mod:`chatd.store.sqlite_tx` and
:mod:`chatd.store.sqlite_reads`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from chatd.core.e2e import judge_epoch_upload
from chatd.core.events import MembershipPlan
from chatd.core.model import (
    Conversation,
    ConversationSummary,
    Device,
    EventKind,
    NewMembership,
    Receipt,
    ReceiptKey,
    Sealed,
    Status,
    StoredEvent,
    StoredMessage,
    User,
)
from chatd.core.names import rid

#: A row as the sqlite3 module returns it (a tuple).
Row = Sequence[Any]

MSG_COLS = "m.id, m.conversation, m.seq, m.sender, m.ts, m.key_id, m.nonce, m.ciphertext"
#: The columns history shows besides :data:`MSG_COLS`.
FULL_COLS = MSG_COLS + ", m.cid, m.reply_to, m.edited_ts, m.edits, m.deleted"
EVENT_COLS = (
    "e.id, e.conversation, e.eseq, e.kind, e.message_id, e.by_user, e.ts, e.emoji, e.on_, e.detail"
)
USER_COLS = "username, pw_hash, created_ts, last_seen, disabled"
#: What an erased (deleted) body is stored as.
ERASED = ("", b"", b"")
#: ``users.disabled``: 0 active, 1 disabled, 2 deleted (a tombstone).
DISABLED, DELETED = 1, 2


def marks(n: int) -> str:
    """``n`` parameter marks for an ``IN (...)`` list."""
    return ",".join("?" * n)


# -- users ---------------------------------------------------------------------------


def to_user(row: Row) -> User:
    name, pw_hash, created_ts, last_seen, disabled = row
    return User(name, pw_hash, created_ts, last_seen, bool(disabled), disabled == DELETED)


def user_state(u: User) -> int:
    """The ``users.disabled`` value of a user."""
    return DELETED if u.deleted else int(u.disabled)


def user_counts(by_state: Mapping[int, int]) -> tuple[int, int, int]:
    """(users, disabled, deleted) from the user count of each state; a
    deleted user counts as disabled too."""
    deleted = by_state.get(DELETED, 0)
    return sum(by_state.values()), by_state.get(DISABLED, 0) + deleted, deleted


# -- messages ------------------------------------------------------------------------


def to_message(row: Row) -> StoredMessage:
    """A message from :data:`MSG_COLS` (or :data:`FULL_COLS`)."""
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


def with_receipts(
    messages: list[StoredMessage], receipt_rows: Iterable[Row], reaction_rows: Iterable[Row]
) -> list[StoredMessage]:
    """The messages with who they were delivered to and seen by, from
    (message_id, username, delivered_ts, seen_ts) rows by username, and
    their reactions, from (message_id, username, emoji) rows by emoji."""
    delivered: dict[str, list[str]] = {}
    seen: dict[str, list[str]] = {}
    for mid, member, d_ts, s_ts in receipt_rows:
        if d_ts is not None:
            delivered.setdefault(mid, []).append(member)
        if s_ts is not None:
            seen.setdefault(mid, []).append(member)
    reactions: dict[str, dict[str, list[str]]] = {}
    for mid, member, emoji in reaction_rows:
        reactions.setdefault(mid, {}).setdefault(emoji, []).append(member)
    return [
        replace(
            m,
            delivered_to=tuple(delivered.get(m.id, ())),
            seen_by=tuple(seen.get(m.id, ())),
            reactions=tuple((e, tuple(u)) for e, u in reactions.get(m.id, {}).items()),
        )
        for m in messages
    ]


def erased(message_id: str, receipt_rows: Iterable[Row]) -> list[tuple[str, str]]:
    """The (user, queue key) entries deleting a message leaves stale, from
    its (username, sender, delivered_ts, seen_ts, d_acked, s_acked) rows:
    the message owed to members it has not reached, and the receipts owed
    to its sender."""
    dropped: list[tuple[str, str]] = []
    for member, sender, d_ts, s_ts, d_acked, s_acked in receipt_rows:
        if d_ts is None:
            dropped.append((member, message_id))
        if d_ts is not None and not d_acked:
            dropped.append((sender, rid(message_id, member, Status.DELIVERED)))
        if s_ts is not None and not s_acked:
            dropped.append((sender, rid(message_id, member, Status.SEEN)))
    return dropped


# -- receipts ------------------------------------------------------------------------


def acks_by_status(
    acks: Sequence[tuple[str, ReceiptKey]],
) -> dict[Status, list[tuple[str, str, str]]]:
    """Receipt acks as (message_id, member, sender) update rows, by status."""
    by_status: dict[Status, list[tuple[str, str, str]]] = {}
    for sender, key in acks:
        by_status.setdefault(key.status, []).append((key.message_id, key.member, sender))
    return by_status


def to_receipts(sender: str, rows: Iterable[Row]) -> list[Receipt]:
    """The receipts owed to ``sender``, from (message_id, username,
    conversation, delivered_ts, seen_ts, d_acked, s_acked) rows."""
    out: list[Receipt] = []
    for mid, member, conv, d_ts, s_ts, d_acked, s_acked in rows:
        if d_ts is not None and not d_acked:
            out.append(Receipt(mid, conv, sender, member, Status.DELIVERED, d_ts))
        if s_ts is not None and not s_acked:
            out.append(Receipt(mid, conv, sender, member, Status.SEEN, s_ts))
    return out


# -- events --------------------------------------------------------------------------


def to_event(row: Row) -> StoredEvent:
    """An event from :data:`EVENT_COLS`, optionally followed by the edited
    message's key_id, nonce and ciphertext (its body, for an edit)."""
    id_, conversation, eseq, kind, message_id, by, ts, emoji, on, detail = row[:10]
    body = None
    if len(row) > 10 and kind == EventKind.EDITED and row[10]:
        body = Sealed(key_id=row[10], nonce=bytes(row[11]), ciphertext=bytes(row[12]))
    stored = StoredEvent(
        id_, conversation, eseq, EventKind(kind), message_id, by, ts, emoji, bool(on), body
    )
    if detail:
        d = json.loads(detail)
        stored = replace(
            stored,
            action=d["action"],
            users=tuple(d["users"]),
            members=tuple(d["members"]),
            admins=tuple(d["admins"]),
            title=d["title"],
        )
    return stored


def membership_event(change: NewMembership, plan: MembershipPlan, eseq: int) -> StoredEvent:
    """The ``members`` event a planned group change stores as ``eseq``."""
    return StoredEvent(
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


def membership_detail(stored: StoredEvent) -> str:
    """A ``members`` event's ``detail`` column (read back by :func:`to_event`)."""
    detail = {
        "action": stored.action,
        "users": list(stored.users),
        "members": list(stored.members),
        "admins": list(stored.admins),
        "title": stored.title,
    }
    return json.dumps(detail)


# -- conversations -------------------------------------------------------------------


def to_conversation(row: Row, member_rows: Sequence[Row]) -> Conversation:
    """A conversation from its (id, kind, title, created_ts, created_by, e2e)
    row and its (username, admin, joined_seq) member rows by username."""
    return Conversation(
        id=row[0],
        kind=row[1],
        members=tuple(r[0] for r in member_rows),
        title=row[2],
        created_ts=row[3],
        created_by=row[4],
        admins=tuple(r[0] for r in member_rows if r[1]),
        joined=tuple((r[0], r[2]) for r in member_rows if r[2] > 1),
        e2e=bool(row[5]),
    )


def to_summaries(
    rows: Sequence[Row],
    unread: Mapping[str, int],
    member_rows: Iterable[Row],
    last: Mapping[str, StoredMessage],
) -> list[ConversationSummary]:
    """A user's conversations, the latest first, from their (id, kind,
    title, last_seq, last_ts, created_ts, e2e) rows, the unread count of
    each, the (conversation, username, admin, joined_seq) rows of their
    members by username, and the last message of each."""
    members: dict[str, list[str]] = {}
    admins: dict[str, list[str]] = {}
    joined: dict[str, list[tuple[str, int]]] = {}
    for conv, member, admin, joined_seq in member_rows:
        members.setdefault(conv, []).append(member)
        if admin:
            admins.setdefault(conv, []).append(member)
        if joined_seq > 1:
            joined.setdefault(conv, []).append((member, joined_seq))
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


# -- end-to-end devices and epochs ---------------------------------------------------


def known_device(row: Row, device: Device) -> str:
    """Uploading ``device`` again over its (sig_key, dh_key, self_sig,
    removed_ts) row: ``same`` (only its name may change) or ``conflict``
    (other keys, or a removed device)."""
    same = tuple(row[:3]) == (device.sig_key, device.dh_key, device.self_sig)
    return "same" if same and row[3] is None else "conflict"


def epoch_upload(
    row: Row | None, have: Mapping[str, str], user: str, device: str, shares: Mapping[str, str]
) -> str:
    """Uploading an epoch's shares over its (username, device) row (None: a
    new epoch) and the shares it has (recipient -> share): ``conflict``
    (another maker, or another share for a device), ``created`` or
    ``added``, as :func:`chatd.core.e2e.judge_epoch_upload` rules."""
    maker = None if row is None else (row[0], row[1])
    return judge_epoch_upload(maker, have, user, device, shares).outcome
