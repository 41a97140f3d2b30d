"""Users and administration on MongoDB: accounts, the operator's commands,
statistics and re-encryption.

Owns the user reads and writes (``create_user``, ``get_user``,
``set_last_seen``, ``list_users``, ``set_disabled``, ``delete_user``) and
what ``chatctl`` asks of the store (``stats``, ``count_by_key``,
``messages_by_key``, ``reseal``). Each function runs in the store's worker
thread and takes the store's :class:`~chatd.store.mongo_schema.Collections`.

Guarantees: a username is claimed by one insert under its ``_id`` (a taken
one is :class:`Conflict`); ``last_seen`` only moves forward (``$max``); a
deleted user is owed nothing any more and each receipt owed to them is
settled once (a compare-and-set on ``rpending``, so a delete repeated or
racing a mark settles the rest); a reseal replaces a body only if it is
still the one the caller read (a compare-and-set on the whole body).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from chatd.core.errors import Conflict, NotFound
from chatd.core.model import StoredMessage, User
from chatd.ports import Reseal, StoreStats, UserDeleted
from chatd.store.mongo_docs import body_doc, to_message, to_user, user_doc
from chatd.store.mongo_plan_receipts import settling
from chatd.store.mongo_schema import BASE_FIELDS, Collections

# -- users -------------------------------------------------------------------------


def create_user(c: Collections, user: User) -> None:
    try:
        c.users.insert_one(user_doc(user))
    except DuplicateKeyError:
        raise Conflict(f"username '{user.username}' is taken") from None


def get_user(c: Collections, username: str) -> User | None:
    doc = c.users.find_one({"_id": username})
    return None if doc is None else to_user(doc)


def set_last_seen(c: Collections, username: str, ts: int) -> None:
    # $max: only ever forward, atomically. The field is absent until first
    # set (a stored null would compare below every number anyway).
    c.users.update_one({"_id": username}, {"$max": {"last_seen": ts}})


def list_users(c: Collections, after: str | None, limit: int) -> list[User]:
    docs = c.users.find({"_id": {"$gt": after or ""}}, sort=[("_id", ASCENDING)], limit=limit)
    return [to_user(d) for d in docs]


def set_disabled(c: Collections, username: str, disabled: bool) -> None:
    done = c.users.update_one(
        {"_id": username, "deleted": {"$ne": True}}, {"$set": {"disabled": disabled}}
    )
    if done.matched_count == 0:
        if c.users.find_one({"_id": username}, {"_id": 1}) is None:
            raise NotFound(f"no user '{username}'")
        raise Conflict(f"user '{username}' is deleted")


def delete_user(c: Collections, username: str) -> UserDeleted:
    done = c.users.update_one(
        {"_id": username},
        {"$set": {"disabled": True, "deleted": True, "password_hash": ""}},
    )
    if done.matched_count == 0:
        raise NotFound(f"no user '{username}'")
    # Not owed to them any more: out of the owed and unread index keys.
    dropped = c.messages.update_many(
        {"undelivered": username},
        {"$pull": {"undelivered": username, "unseen": username}},
    ).modified_count
    c.events.update_many({"owed": username}, {"$pull": {"owed": username}})
    # Receipts owed to them as a sender: settle each one that happened.
    settled = 0
    for doc in c.messages.find({"sender": username, "rpending": {"$gt": 0}}, {"receipts": 1}):
        sets = settling(doc["receipts"])
        if sets:
            # Compare-and-set on rpending: a receipt made meanwhile is
            # left owed for the next delete (idempotent).
            res = c.messages.update_one(
                {"_id": doc["_id"], "rpending": len(sets)},
                {"$set": sets, "$inc": {"rpending": -len(sets)}},
            )
            settled += len(sets) if res.modified_count else 0
    return UserDeleted(messages_dropped=dropped, receipts_settled=settled)


# -- what chatctl asks ---------------------------------------------------------------


def stats(c: Collections, since: int) -> StoreStats:
    users = c.users.count_documents({})
    disabled = c.users.count_documents({"disabled": True})
    deleted = c.users.count_documents({"deleted": True})
    owed_messages = 0
    owed_receipts = 0
    delivered = seen = 0
    for doc in c.messages.find(
        {"$or": [{"undelivered.0": {"$exists": True}}, {"rpending": {"$gt": 0}}]},
        {"undelivered": 1, "rpending": 1},
    ):
        owed_messages += len(doc.get("undelivered") or ())
        owed_receipts += int(doc.get("rpending") or 0)
    for doc in c.messages.find(
        {
            "$or": [
                {"receipts.delivered_ts": {"$gte": since}},
                {"receipts.seen_ts": {"$gte": since}},
            ]
        },
        {"receipts": 1},
    ):
        for r in doc["receipts"]:
            delivered += (r.get("delivered_ts") or -1) >= since
            seen += (r.get("seen_ts") or -1) >= since
    return StoreStats(
        users=users,
        disabled=disabled,
        deleted=deleted,
        conversations=c.conversations.count_documents({}),
        messages=c.messages.count_documents({}),
        owed_messages=owed_messages,
        owed_receipts=owed_receipts,
        since=since,
        messages_since=c.messages.count_documents({"ts": {"$gte": since}}),
        delivered_since=delivered,
        seen_since=seen,
    )


def count_by_key(c: Collections) -> dict[str, int]:
    return {
        row["_id"]: row["n"]
        for row in c.messages.aggregate(
            [
                # A deleted message's erased body is under no key.
                {"$match": {"deleted": {"$ne": True}}},
                {"$group": {"_id": "$body.key_id", "n": {"$sum": 1}}},
            ]
        )
    }


def messages_by_key(
    c: Collections, key_id: str, after: str | None, limit: int
) -> list[StoredMessage]:
    # Walks the _id index from ``after``: all pages together read the
    # collection once, with no index on the key id to slow down appends.
    docs = c.messages.find(
        {"_id": {"$gt": after or ""}, "body.key_id": key_id, "deleted": {"$ne": True}},
        BASE_FIELDS,
        sort=[("_id", ASCENDING)],
        limit=limit,
    )
    return [replace(to_message(d), delivered_to=(), seen_by=()) for d in docs]


def reseal(c: Collections, batch: Sequence[Reseal]) -> list[bool]:
    out = []
    for item in batch:
        done = c.messages.update_one(
            {
                "_id": item.message_id,
                "body.key_id": item.expected.key_id,
                "body.nonce": item.expected.nonce,
                "body.ciphertext": item.expected.ciphertext,
            },
            {"$set": {"body": body_doc(item.body)}},
        )
        out.append(done.modified_count == 1)
    return out
