"""Group membership on MongoDB: changing a group, announcing the change, and
placing the messages a change raced.

Owns ``change_group`` and the repairs every writer of a group runs
(``announce``), and ``count_in_group``, the end of an append to a group.
Each function runs in the store's worker thread and takes the store's
:class:`~chatd.store.mongo_schema.Collections`; the decisions are
:mod:`chatd.store.mongo_plan`'s (``membership_commit``, ``members_at``,
``placement``, ``reassignment``).

**Group membership** lives in the conversation document (``members``,
``admins``, ``joined``: the first seq of each member who joined later,
``mver``: how many changes it has had). A change is judged by
:func:`chatd.core.events.plan_membership` against that document and
committed by one compare-and-set on it (``mver`` as read, ``last_seq`` still
below the change's ``from_seq`` = one past the highest stored seq, no change
pending), which also sets ``pending`` to its ``members`` event and keeps the
change in ``changes`` (the latest few). The event is then inserted with the
next eseq like any event, and ``pending`` unset; any writer that finds
``pending`` (the next change, append or event of the group) stores it
first, so a crash in between is repaired and members events follow the
changes in order. An append reads the members with ``last_seq``, stores its
messages owed to those members with the ``mver`` it read, then advances
``last_seq`` with a compare-and-set on that ``mver``. If a change committed
in between, each message it stored is placed again: owed to the members for
its seq (``changes`` says which changes start after it), or, if its sender
was removed before it, turned into a tombstone and answered refused. A
retry (a duplicate) does the same for a first call that stopped before it
could. What remains (``docs/mongo.md``): such a message is readable with
the members of before for the moment until it is placed, and stays so if
its writer stopped and the client never retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError

from chatd.core.errors import Unavailable
from chatd.core.events import Refusal, plan_membership
from chatd.core.model import Appended, EventResult, NewMembership, NewMessage
from chatd.store.mongo_docs import admins_of, joined_of, to_event, tombstone
from chatd.store.mongo_plan import (
    APPEND_CONFLICTS,
    EVENT_CONFLICTS,
    members_at,
    membership_commit,
    need,
    placement,
    reassignment,
)
from chatd.store.mongo_schema import Collections


def change_group(c: Collections, change: NewMembership) -> EventResult:
    found = c.events.find_one({"_id": change.id})
    if found is not None:
        return EventResult(to_event(found), duplicate=True, recipients=())
    conv = change.conversation
    for _ in range(EVENT_CONFLICTS):
        doc = c.conversations.find_one({"_id": conv}, {"changes": 0})
        if doc is None:
            return EventResult(None, refused="not_found", reason="no such conversation")
        waiting = doc.get("pending")
        if waiting is not None:
            # A change committed and its event not stored yet (its
            # writer is a moment ahead, or stopped): store it first, so
            # that members events follow the changes in order.
            stored = announce(c, waiting)
            if waiting["_id"] == change.id:
                return EventResult(to_event(stored), duplicate=True, recipients=())
            continue
        joined = joined_of(doc)
        plan = plan_membership(
            change.action,
            change.by,
            change.users,
            change.title,
            kind=doc["kind"],
            # Join order, the longest-standing first (ties by name).
            members=sorted(doc["members"], key=lambda m: (joined.get(m, 1), m)),
            admins=admins_of(doc),
            current_title=doc.get("title"),
        )
        if isinstance(plan, Refusal):
            return EventResult(None, refused=plan.code, reason=plan.reason)
        # The highest stored seq, read after the document (so from_seq only
        # grows from one change to the next); the compare-and-set fails if
        # an append has stored and counted a message at from_seq or later.
        highest = c.messages.find_one(
            {"conversation": conv}, {"seq": 1}, sort=[("seq", DESCENDING)]
        )
        event, (cas, update) = membership_commit(
            change, plan, doc, highest["seq"] if highest else 0
        )
        done = c.conversations.update_one(cas, update)
        if done.matched_count == 0:
            continue  # another change, or a message at from_seq: plan again
        return EventResult(to_event(announce(c, event)), recipients=plan.notify)
    raise Unavailable("too much contention changing the group")


def announce(c: Collections, event: dict[str, Any]) -> dict[str, Any]:
    """Store the members event of a committed change with the next eseq
    (once, whoever calls: the changer, or any writer that finds it
    pending), then clear it from the conversation; the stored event."""
    for _ in range(EVENT_CONFLICTS):
        found = c.events.find_one({"_id": event["_id"]})
        if found is not None:
            break
        top = c.events.find_one(
            {"conversation": event["conversation"]}, {"eseq": 1}, sort=[("eseq", DESCENDING)]
        )
        stored = {**event, "eseq": (top["eseq"] if top else 0) + 1}
        try:
            c.events.insert_one(stored)
        except DuplicateKeyError:
            # Another writer stored it (the next round finds it) or took
            # the eseq (the next round plans again).
            taken = c.events.find_one({"by": event["by"], "cid": event["cid"]}, {"_id": 1})
            if taken is not None and taken["_id"] != event["_id"]:
                raise Unavailable(f"event cid {event['cid']} is already taken") from None
            continue
        found = stored
        break
    else:
        raise Unavailable("too much contention storing a group change")
    c.conversations.update_one(
        {"_id": event["conversation"], "pending._id": event["_id"]},
        {"$unset": {"pending": ""}},
    )
    return found


def count_in_group(
    c: Collections,
    conv: str,
    seq: int,
    ts: int,
    group: dict[str, Any],
    since: dict[int, int],
    batch: list[NewMessage],
    results: list[Appended | None],
) -> None:
    """Advance a group's counter, guarded by the membership version read.
    Each message ``since`` names (stored by this call, or a retry's) that
    was planned with an older version than the group has now is placed
    again: owed to the members for its seq, refused if its sender was
    not one. The guard repeats this for a change that commits meanwhile."""
    version = int(group.get("mver", 0))
    fields = {"members": 1, "mver": 1, "changes": 1}
    doc = None
    if any(v < version for v in since.values()):
        doc = c.conversations.find_one({"_id": conv}, fields)
    for _ in range(APPEND_CONFLICTS):
        if doc is not None:
            version = int(doc.get("mver", 0))
            for i, v in since.items():
                res = results[i]
                if v < version and res is not None and res.refused is None:
                    members = members_at(doc, v, res.seq)
                    if members is not None:
                        results[i] = place(c, res, batch[i].sender, members)
        done = c.conversations.update_one(
            {"_id": conv, "mver": {"$not": {"$gt": version}}},
            {"$max": {"last_seq": seq, "last_ts": ts}},
        )
        if done.matched_count:
            # From here on, a change plans from a seq past these messages
            # (its compare-and-set on last_seq fails otherwise).
            return
        doc = c.conversations.find_one({"_id": conv}, fields)
        if doc is None:
            raise Unavailable(f"conversation {conv} vanished")
    raise Unavailable("too much contention appending to a group")


def place(c: Collections, res: Appended, sender: str, members: set[str]) -> Appended:
    """Message ``res``, stored a moment ago, as it must be for the group's
    members ``members`` at its seq (:func:`placement`)."""
    placed = placement(res, sender, members)
    if placed.refused is not None:
        # Removed before this seq: refused after all. The seq stays taken
        # (no gaps) by a tombstone; a retry of it answers refused too.
        c.messages.update_one({"_id": res.id}, {"$set": {**tombstone(), "refused": "forbidden"}})
    elif res.recipients is None or set(need(placed.recipients)) != set(res.recipients):
        reassign(c, res.id, need(placed.recipients))
    return placed


def reassign(c: Collections, message_id: str, to: Sequence[str]) -> None:
    """Make ``to`` the recipients of a message (:func:`reassignment`). A
    compare-and-set on the receipts read, so that a mark made meanwhile is
    not lost (the reassignment is planned again from it)."""
    fields = {"recipients": 1, "receipts": 1, "status": 1, "undelivered": 1, "unseen": 1}
    # A receipt moves at most twice: this many rounds always suffice.
    for _ in range(2 * len(set(to)) + 4):
        doc = c.messages.find_one({"_id": message_id, "deleted": {"$ne": True}}, fields)
        if doc is None:
            return  # deleted meanwhile: nobody is owed it any more
        sets = reassignment(doc, to)
        if sets is None:
            return
        done = c.messages.update_one(
            {"_id": message_id, "recipients": doc["recipients"], "receipts": doc["receipts"]},
            {"$set": sets},
        )
        if done.matched_count:
            return
    raise Unavailable("too much contention placing a message")
