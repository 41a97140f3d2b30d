"""Messages on MongoDB: appending a batch, and reading messages back.

Owns the append loop (``append``) and the message reads (``history``,
``get_messages``, ``owed_messages``, ``sent_id``). Each function runs in the
store's worker thread (``MongoStore`` hops to it) and takes the store's
:class:`~chatd.store.mongo_schema.Collections`.

**seq and idempotency** are claimed by one and the same insert: a message
document carries ``(conversation, seq)`` and ``(sender, cid)``, both under
unique indexes. A seq exists only as part of a stored message, so no crash
and no losing duplicate can burn one (no gaps), and the unique index makes a
second writer of the same seq fail and retry with the next one (no
repeats). The ``last_seq`` counter of a conversation is advanced with
``$max`` after the insert; it is the allocator's first guess, never its
authority. In a group, the members are read with ``last_seq``, a
non-member's message is refused (nothing stored) and the others are owed to
those members; :func:`chatd.store.mongo_groups.count_in_group` then advances
the counter and places again any message a membership change raced. A
retry (a stored (sender, cid)) answers the first message as stored and who
still owes it (:func:`chatd.store.mongo_plan.still_owed`), read by the
duplicate lookup itself: the service routes it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.errors import BulkWriteError

from chatd.core.errors import NotFound, Unavailable
from chatd.core.model import Appended, NewMessage, StoredMessage
from chatd.store.mongo_docs import joined_of, message_doc, to_duplicate, to_message
from chatd.store.mongo_groups import announce, count_in_group
from chatd.store.mongo_plan import (
    APPEND_CONFLICTS,
    advances,
    first_calls,
    first_failed,
    need,
    owed_query,
    plan_seqs,
    repeated,
    screen,
    still_owed,
    switched,
)
from chatd.store.mongo_schema import HISTORY_FIELDS, MSG_FIELDS, Collections

#: What the duplicate lookup reads of a stored (sender, cid): the message to
#: route again (a retry's first call may have stopped before routing it),
#: who still owes it, and what placing it in its group needs. A new message
#: matches nothing, so this costs the hot path no extra read.
DUP_FIELDS = {
    **MSG_FIELDS,
    "refused": 1,
    "mver": 1,
    "recipients": 1,
    "undelivered": 1,
}


def append(c: Collections, batch: list[NewMessage]) -> list[Appended]:
    results: list[Appended | None] = [None] * len(batch)
    first_of, unique = first_calls(batch)

    # Stored already (a client's retry): answer the first message, and who
    # still owes it (``dups``: the documents as read).
    stored = stored_by_key(c, {(batch[i].sender, batch[i].cid) for i in unique})
    dups: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    # Group messages to check against the changes made since: the
    # membership version each was planned with (a retry's included: its
    # first call may have stopped before checking).
    since: dict[int, int] = {}
    for i in unique:
        doc = stored.get((batch[i].sender, batch[i].cid))
        if doc is not None:
            results[i] = to_duplicate(doc)
            dups[i] = doc
            if "mver" in doc:
                since[i] = doc["mver"]
        else:
            pending.append(i)

    # The allocator's first guess: each conversation's last_seq (also
    # tells an unknown conversation apart before anything is written);
    # and a group's members as they are now, whatever the caller saw:
    # who may send, who is owed the message.
    top: dict[str, int] = {}
    groups: dict[str, dict[str, Any]] = {}
    to: dict[int, Sequence[str]] = {}
    names = sorted({batch[i].conversation for i in unique})
    fields = {"last_seq": 1, "kind": 1, "members": 1, "mver": 1, "pending": 1, "e2e": 1}
    e2e_on: set[str] = set()
    for doc in c.conversations.find({"_id": {"$in": names}}, fields):
        top[doc["_id"]] = doc.get("last_seq", 0)
        if doc.get("kind") == "group":
            groups[doc["_id"]] = doc
        if doc.get("e2e"):
            e2e_on.add(doc["_id"])
    if pending:
        missing = [v for v in sorted({batch[i].conversation for i in pending}) if v not in top]
        if missing:
            raise NotFound(f"conversation {missing[0]} does not exist")
        for doc in groups.values():
            if doc.get("pending") is not None:
                announce(c, doc["pending"])  # a change's event not yet stored
        screened = screen(batch, pending, groups, e2e_on)
        for i, refused in screened.refused.items():
            results[i] = refused
        to = screened.to
        since.update(screened.since)
        pending = screened.allowed

    conflicts = 0
    while pending:
        planned = plan_seqs([batch[i].conversation for i in pending], top)
        docs = [
            message_doc(batch[i], seq, to[i], since.get(i))
            for i, seq in zip(pending, planned, strict=True)
        ]
        error: BulkWriteError | None = None
        try:
            # Ordered: within one conversation the batch's order is the seq
            # order, and a failure stops at the first item that failed.
            c.messages.insert_many(docs, ordered=True)
        except BulkWriteError as exc:
            error = exc
        failed = len(pending) if error is None else first_failed(error.details, error)
        for k in range(failed):
            msg = batch[pending[k]]
            results[pending[k]] = Appended(
                msg.id,
                msg.conversation,
                planned[k],
                msg.ts,
                False,
                tuple(dict.fromkeys(to[pending[k]])),
            )
        if failed == len(pending):
            break
        # The item at ``failed`` lost either its (sender, cid) — a
        # concurrent duplicate: answer the winner — or its seq — another
        # writer took it: plan again from the true highest seq.
        i = pending[failed]
        msg = batch[i]
        dup = c.messages.find_one({"sender": msg.sender, "cid": msg.cid}, DUP_FIELDS)
        rest = pending[failed + 1 :]
        if dup is not None:
            results[i] = to_duplicate(dup)
            dups[i] = dup
            since.pop(i, None)
            if "mver" in dup:
                since[i] = dup["mver"]
        else:
            if c.messages.find_one({"_id": msg.id}, {"_id": 1}) is not None:
                raise Unavailable(f"message id {msg.id} is already taken")
            rest = [i, *rest]
            conflicts += 1
            if conflicts > APPEND_CONFLICTS:
                raise Unavailable("too much contention appending messages")
        pending = rest
        for conv in {batch[j].conversation for j in pending}:
            highest = c.messages.find_one(
                {"conversation": conv}, {"seq": 1}, sort=[("seq", DESCENDING)]
            )
            # Read from the primary: includes what this call just stored.
            top[conv] = max(top[conv], highest["seq"] if highest else 0)

    # Advance each conversation's counter and activity time. $max keeps
    # this monotonic under any interleaving; duplicates are included so
    # that a retry repairs a counter a crash left behind.
    advance = advances(results)
    # The first end-to-end message switches its conversation (one way).
    turned = switched(batch, results, e2e_on)
    if turned:
        c.conversations.update_many({"_id": {"$in": turned}}, {"$set": {"e2e": True}})
    plain = [
        UpdateOne({"_id": conv}, {"$max": {"last_seq": seq, "last_ts": ts}})
        for conv, (seq, ts) in sorted(advance.items())
        if conv not in groups
    ]
    if plain:
        c.conversations.bulk_write(plain, ordered=True)
    for conv, (seq, ts) in sorted(advance.items()):
        if conv in groups:
            mine = {i: v for i, v in since.items() if batch[i].conversation == conv}
            count_in_group(c, conv, seq, ts, groups[conv], mine, batch, results)

    for i, doc in dups.items():
        results[i] = still_owed(need(results[i]), doc)
    out: list[Appended] = []
    for i, msg in enumerate(batch):
        res = results[i]
        if res is None:
            first = first_of[(msg.sender, msg.cid)]
            res = repeated(need(results[first]), batch[first])
        out.append(res)
    return out


def stored_by_key(
    c: Collections, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """The messages stored already under (sender, cid) ``keys``."""
    if not keys:
        return {}
    by_sender: dict[str, list[str]] = {}
    for sender, cid in sorted(keys):
        by_sender.setdefault(sender, []).append(cid)
    query = {"$or": [{"sender": s, "cid": {"$in": cids}} for s, cids in sorted(by_sender.items())]}
    return {(d["sender"], d["cid"]): d for d in c.messages.find(query, DUP_FIELDS)}


# -- reads -------------------------------------------------------------------------


def history(
    c: Collections, conversation: str, before: int | None, limit: int, viewer: str | None
) -> list[StoredMessage]:
    query: dict[str, Any] = {"conversation": conversation}
    seq: dict[str, int] = {}
    if viewer is not None:
        conv = c.conversations.find_one({"_id": conversation}, {"members": 1, "joined": 1})
        if conv is None or viewer not in conv["members"]:
            return []
        start = joined_of(conv).get(viewer, 1)
        if start > 1:
            seq["$gte"] = start
    if before is not None:
        seq["$lt"] = before
    if seq:
        query["seq"] = seq
    docs = c.messages.find(query, HISTORY_FIELDS, sort=[("seq", DESCENDING)], limit=limit)
    return [to_message(d) for d in reversed(list(docs))]


def get_messages(c: Collections, ids: Sequence[str]) -> list[StoredMessage]:
    docs = c.messages.find(
        {"_id": {"$in": list(dict.fromkeys(ids))}},
        HISTORY_FIELDS,
        sort=[("conversation", ASCENDING), ("seq", ASCENDING)],
    )
    return [to_message(d) for d in docs]


def owed_messages(
    c: Collections, username: str, limit: int, after: tuple[str, int] | None
) -> list[StoredMessage]:
    docs = c.messages.find(
        owed_query("undelivered", username, "seq", after),
        MSG_FIELDS,
        sort=[("conversation", ASCENDING), ("seq", ASCENDING)],
        limit=limit,
    )
    return [to_message(d) for d in docs]


def sent_id(c: Collections, sender: str, cid: str) -> str | None:
    doc = c.messages.find_one({"sender": sender, "cid": cid}, {"_id": 1})
    return None if doc is None else str(doc["_id"])
