"""Conversations on MongoDB: making them and reading who is in them.

Owns ``ensure_dm``, ``create_group``, ``get_conversation``,
``conversations_of`` and the membership reads (``shares_conversation``,
``dm_peers``, ``contacts``). Each function runs in the store's worker thread
and takes the store's :class:`~chatd.store.mongo_schema.Collections`;
changing a group is :mod:`chatd.store.mongo_groups`'.

Guarantees: a conversation is made by one insert under its ``_id``, so two
callers making the same direct conversation get the same one (the loser of
the insert reads the winner's), and a taken group id is :class:`Conflict`.
Reads leave out the bookkeeping of membership changes (``changes``,
``pending``), and a member who joined a group later sees nothing of it from
before (``joined``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from chatd.core.errors import Conflict, Unavailable
from chatd.core.model import Conversation, ConversationSummary, StoredMessage
from chatd.core.names import dm_id
from chatd.store.mongo_docs import (
    admins_of,
    conversation_doc,
    group_doc,
    joined_of,
    to_conversation,
    to_message,
)
from chatd.store.mongo_schema import CONV_FIELDS, MSG_FIELDS, Collections


def ensure_dm(c: Collections, a: str, b: str, ts: int) -> Conversation:
    id = dm_id(a, b)
    found = c.conversations.find_one({"_id": id})
    if found is None:
        try:
            c.conversations.insert_one(conversation_doc(id, "dm", None, sorted((a, b)), ts))
        except DuplicateKeyError:
            pass  # a concurrent caller made it first: same conversation
        found = c.conversations.find_one({"_id": id})
    if found is None:
        raise Unavailable(f"conversation {id} vanished")
    return to_conversation(found)


def create_group(
    c: Collections,
    id: str,
    title: str | None,
    members: Sequence[str],
    ts: int,
    creator: str | None,
    e2e: bool,
) -> Conversation:
    doc = group_doc(id, title, members, ts, creator, e2e)
    try:
        c.conversations.insert_one(doc)
    except DuplicateKeyError:
        raise Conflict(f"conversation id '{id}' is taken") from None
    return to_conversation(doc)


def get_conversation(c: Collections, id: str) -> Conversation | None:
    doc = c.conversations.find_one({"_id": id}, CONV_FIELDS)
    return None if doc is None else to_conversation(doc)


def conversations_of(c: Collections, username: str) -> list[ConversationSummary]:
    convs = list(c.conversations.find({"members": username}, CONV_FIELDS))
    if not convs:
        return []
    unread = {
        row["_id"]: row["n"]
        for row in c.messages.aggregate(
            [
                {"$match": {"unseen": username}},
                {"$group": {"_id": "$conversation", "n": {"$sum": 1}}},
            ]
        )
    }
    # Not what came before the caller joined.
    wanted = [
        {"conversation": conv["_id"], "seq": conv["last_seq"]}
        for conv in convs
        if conv.get("last_seq", 0) >= joined_of(conv).get(username, 1)
    ]
    last: dict[str, StoredMessage] = {}
    if wanted:
        for doc in c.messages.find({"$or": wanted}, MSG_FIELDS):
            last[doc["conversation"]] = to_message(doc)
    out = [
        ConversationSummary(
            id=conv["_id"],
            kind=conv["kind"],
            members=tuple(sorted(conv["members"])),
            title=conv.get("title"),
            last_seq=conv.get("last_seq", 0),
            unread=unread.get(conv["_id"], 0),
            last_ts=conv.get("last_ts"),
            last_message=last.get(conv["_id"]),
            admins=tuple(admins_of(conv)),
            joined=tuple(sorted((m, q) for m, q in joined_of(conv).items() if q > 1)),
            e2e=bool(conv.get("e2e")),
        )
        for conv in convs
    ]
    created = {conv["_id"]: conv["created_ts"] for conv in convs}
    out.sort(key=lambda s: (s.last_ts or created[s.id], s.id), reverse=True)
    return out


def shares_conversation(c: Collections, a: str, b: str) -> bool:
    return c.conversations.find_one({"members": {"$all": [a, b]}}, {"_id": 1}) is not None


def dm_peers(c: Collections, username: str) -> list[str]:
    docs = c.conversations.find(
        {"members": username, "kind": "dm"}, {"members": 1}, sort=[("_id", ASCENDING)]
    )
    return [m for doc in docs for m in doc["members"] if m != username]


def contacts(c: Collections, username: str) -> list[str]:
    # The members of the user's conversations (the members_kind
    # index), each once: distinct unwinds the member arrays.
    names = c.conversations.distinct("members", {"members": username})
    return sorted(n for n in names if n != username)
