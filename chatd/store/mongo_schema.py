"""The MongoDB store's layout: its collections, the indexes chatd needs, and
what each read projects.

Owns the names (collections, indexes) and :data:`INDEXES`, the list that
``docs/mongo.md`` (*Indexes*) and ``tests/contract/test_store_mongo.py``
hold the store to. Index names are fixed, so creating them again (a second
open, several processes starting at once) is a no-op; the unique ones are
what the seq, eseq, idempotency and device guarantees rest on. No I/O here:
``MongoStore`` creates the indexes before its first write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING

USERS = "users"
CONVERSATIONS = "conversations"
MESSAGES = "messages"
EVENTS = "events"
DEVICES = "devices"
E2E_EPOCHS = "e2e_epochs"


@dataclass(frozen=True)
class Collections:
    """The store's collections (pymongo's, or mongomock's in tests), as the
    I/O functions of the ``mongo_*`` modules take them."""

    users: Any
    conversations: Any
    messages: Any
    events: Any
    devices: Any
    epochs: Any

    @classmethod
    def of(cls, db: Any) -> Collections:
        return cls(
            users=db.get_collection(USERS),
            conversations=db.get_collection(CONVERSATIONS),
            messages=db.get_collection(MESSAGES),
            events=db.get_collection(EVENTS),
            devices=db.get_collection(DEVICES),
            epochs=db.get_collection(E2E_EPOCHS),
        )


@dataclass(frozen=True)
class Index:
    """One index chatd needs, and the query it serves (docs/mongo.md lists the same)."""

    collection: str
    name: str
    keys: tuple[tuple[str, int], ...]
    serves: str
    unique: bool = False
    partial: dict[str, Any] | None = None


#: Names are fixed, so creating them again (a second open, several processes
#: starting at once) is a no-op.
INDEXES: tuple[Index, ...] = (
    Index(
        CONVERSATIONS,
        "members_kind",
        (("members", ASCENDING), ("kind", ASCENDING)),
        "membership: conversations_of, shares_conversation ($all), dm_peers (with kind)",
    ),
    Index(
        MESSAGES,
        "sender_cid",
        (("sender", ASCENDING), ("cid", ASCENDING)),
        "idempotency: one message per (sender, cid); the duplicate lookup",
        unique=True,
    ),
    Index(
        MESSAGES,
        "conversation_seq",
        (("conversation", ASCENDING), ("seq", ASCENDING)),
        "seq: one message per (conversation, seq); history paging, last message,"
        " the allocator's highest seq",
        unique=True,
    ),
    Index(
        MESSAGES,
        "owed_messages",
        (("undelivered", ASCENDING), ("conversation", ASCENDING), ("seq", ASCENDING)),
        "owed_messages: {undelivered: user, conversation >= after} sorted by conversation, seq",
    ),
    Index(
        MESSAGES,
        "unread",
        (("unseen", ASCENDING), ("conversation", ASCENDING)),
        "unread per conversation: {unseen: user} grouped by conversation",
    ),
    Index(
        MESSAGES,
        "owed_receipts",
        (("sender", ASCENDING), ("_id", ASCENDING)),
        "owed_receipts: {sender, rpending > 0, _id >= after} sorted by _id (partial:"
        " only messages that owe their sender a receipt)",
        partial={"rpending": {"$gt": 0}},
    ),
    Index(
        EVENTS,
        "by_cid",
        (("by", ASCENDING), ("cid", ASCENDING)),
        "idempotency: one event per (by, cid); the duplicate lookup",
        unique=True,
    ),
    Index(
        EVENTS,
        "conversation_eseq",
        (("conversation", ASCENDING), ("eseq", ASCENDING)),
        "eseq: one event per (conversation, eseq); the allocator's highest eseq",
        unique=True,
    ),
    Index(
        EVENTS,
        "owed_events",
        (("owed", ASCENDING), ("conversation", ASCENDING), ("eseq", ASCENDING)),
        "owed_events: {owed: user, conversation >= after} sorted by conversation, eseq",
    ),
    Index(
        EVENTS,
        "message_eseq",
        (("message_id", ASCENDING), ("eseq", ASCENDING)),
        "a message's events: those not yet applied to it, a deletion's earlier ones",
    ),
    Index(
        DEVICES,
        "user_device",
        (("user", ASCENDING), ("device", ASCENDING)),
        "a device id is registered once per user; put_device's read-back, remove_device",
        unique=True,
    ),
    Index(
        DEVICES,
        "user_slot",
        (("user", ASCENDING), ("slot", ASCENDING)),
        "the per-user bound: one device per (user, slot), slot < limit; a user's"
        " devices and taken slots ({user})",
        unique=True,
    ),
    Index(
        DEVICES,
        "device_id",
        (("device", ASCENDING),),
        "a device id is one device's, whoever's (end-to-end shares are addressed by it)",
        unique=True,
    ),
    Index(
        DEVICES,
        "active_devices",
        (("user", ASCENDING), ("removed_ts", ASCENDING)),
        "active_devices: {user: {$in}, removed_ts: null}",
    ),
)


# -- projections: what each read takes of a document ---------------------------

#: What messages_by_key reads.
BASE_FIELDS = {
    "conversation": 1,
    "seq": 1,
    "sender": 1,
    "ts": 1,
    "body": 1,
    "status": 1,
}
#: What owed_messages and a summary's last message read.
MSG_FIELDS = {
    **BASE_FIELDS,
    "cid": 1,
    "reply_to": 1,
    "edited_ts": 1,
    "edits": 1,
    "deleted": 1,
}
#: What history and get_messages read.
HISTORY_FIELDS = {**MSG_FIELDS, "reactions": 1}
#: What judging an event reads of its message (a deletion: also what it drops).
TARGET_FIELDS = {
    "conversation": 1,
    "seq": 1,
    "sender": 1,
    "ts": 1,
    "deleted": 1,
    "reactions": 1,
    "applied_eseq": 1,
}
DELETE_FIELDS = {**TARGET_FIELDS, "receipts": 1, "undelivered": 1}
#: What reads of a conversation leave out: the bookkeeping of membership
#: changes (``changes``, ``pending``), which only writers use.
CONV_FIELDS = {"changes": 0, "pending": 0}
