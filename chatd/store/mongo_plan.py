"""The MongoDB store's decisions, as plain functions: what to write, and what
a write's outcome means.

Owns the planning the store's I/O loops run on: screening an append batch
and assigning its seqs, resolving an ``insert_many`` error, advancing the
counters, a duplicate's answer (who still owes the first message), which
members a message raced by a group change is owed to (and the ``$set``
that places it again), the compare-and-set that commits a membership
change, judging an event against what was read, and the paging of owed
queues. Receipts have theirs in :mod:`chatd.store.mongo_plan_receipts`.
Pure: no I/O and no pymongo (filters and updates are plain dicts the caller
wraps), so each rule is tested table-driven (``tests/core/test_mongo_plan*.py``)
and the loops in the ``mongo_*`` modules keep only the reads, the writes
and the retries.

Guarantees the loops rely on: a plan is computed only from the documents it
is given (a retry plans again from fresh ones); every compare-and-set filter
names the state the plan started from, so a lost race changes nothing; and
the bounds below make every loop end (``Unavailable`` rather than a hang).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from chatd.core import events as event_rules
from chatd.core.e2e import judge_epoch_upload
from chatd.core.errors import Internal, Unavailable
from chatd.core.events import MembershipPlan, Refusal, Target, manages
from chatd.core.model import (
    Appended,
    EventKind,
    NewEvent,
    NewMembership,
    NewMessage,
    StoredMessage,
)
from chatd.core.names import GROUP_PREFIX
from chatd.store.mongo_docs import admins_of, joined_of, receipt_doc, unacked

T = TypeVar("T")

#: Duplicate-key error codes (11000 is current; the others are legacy).
DUP_CODES = frozenset({11000, 11001, 12582})

#: How often one append may find its planned seq taken by another writer
#: before it gives up (Unavailable). Each time it plans again from the true
#: highest seq, so some writer always progresses.
APPEND_CONFLICTS = 100
#: The same bound for one event finding its planned eseq taken.
EVENT_CONFLICTS = 100
#: How many of a group's latest membership changes its document keeps
#: (``changes``): what lets an append that raced them place its message.
CHANGES_KEPT = 16

#: A MongoDB filter and update, as a plan hands them to ``UpdateOne``.
Op = tuple[dict[str, Any], dict[str, Any]]


def need(value: T | None) -> T:
    if value is None:
        raise Internal("a result the store planned is missing")
    return value


# -- appends -----------------------------------------------------------------------


def first_calls(batch: Sequence[NewMessage]) -> tuple[dict[tuple[str, str], int], list[int]]:
    """Each (sender, cid) of ``batch`` -> the index of its first message, and
    those indexes in order (a later message with the same key is answered as
    the first one's duplicate)."""
    first_of: dict[tuple[str, str], int] = {}
    unique: list[int] = []
    for i, msg in enumerate(batch):
        if (msg.sender, msg.cid) not in first_of:
            first_of[(msg.sender, msg.cid)] = i
            unique.append(i)
    return first_of, unique


@dataclass
class Screened:
    """What :func:`screen` made of an append batch's new messages."""

    #: The messages to store, in batch order.
    allowed: list[int]
    #: message -> who it is owed to.
    to: dict[int, Sequence[str]]
    #: group message -> the membership version it is planned with.
    since: dict[int, int]
    #: message -> its refusal (nothing is stored for it).
    refused: dict[int, Appended]


def screen(
    batch: Sequence[NewMessage],
    pending: Sequence[int],
    groups: Mapping[str, dict[str, Any]],
    e2e_on: set[str],
) -> Screened:
    """Who may send what, against the conversations as read: a plain body in
    an end-to-end conversation (or after an end-to-end message of the same
    batch) is refused ``e2e_required``; in a group (``groups``: its
    document) a non-member is refused ``forbidden`` and a member's message
    is owed to the other members as they are now; anything else is owed to
    its own recipients."""
    out = Screened([], {}, {}, {})
    turned: set[str] = set()
    for i in pending:
        msg = batch[i]
        group = groups.get(msg.conversation)
        if msg.e2e:
            turned.add(msg.conversation)
        elif msg.conversation in e2e_on or msg.conversation in turned:
            out.refused[i] = Appended(
                msg.id, msg.conversation, 0, msg.ts, False, refused="e2e_required"
            )
            continue
        if group is None:
            out.to[i] = msg.recipients
        elif msg.sender in group["members"]:
            out.to[i] = sorted(set(group["members"]) - {msg.sender})
            out.since[i] = int(group.get("mver", 0))
        else:
            # Not a member (any more): refused, nothing stored.
            out.refused[i] = Appended(
                msg.id, msg.conversation, 0, msg.ts, False, refused="forbidden"
            )
            continue
        out.allowed.append(i)
    return out


def plan_seqs(conversations: Sequence[str], top: Mapping[str, int]) -> list[int]:
    """The seqs for messages in ``conversations`` (one entry a message, in
    batch order): each conversation's next ones after its highest ``top``."""
    next_seq = dict(top)
    planned = []
    for conv in conversations:
        next_seq[conv] += 1
        planned.append(next_seq[conv])
    return planned


def first_failed(details: Mapping[str, Any], error: object) -> int:
    """The index of the first document an ordered ``insert_many`` did not
    store, from its ``BulkWriteError.details``, when every failure is a
    duplicate key (a seq or a (sender, cid) taken by another writer); those
    before it are stored. Anything else raises :class:`Unavailable`: a write
    concern not met (written on the primary, not yet durable as asked: the
    sender retries, and the retry finds the messages), or another refusal."""
    errors = details.get("writeErrors") or []
    if details.get("writeConcernErrors"):
        concern = details["writeConcernErrors"][0]
        raise Unavailable(f"write not confirmed: {concern.get('errmsg')}")
    if not errors or any(e.get("code") not in DUP_CODES for e in errors):
        first = errors[0].get("errmsg") if errors else error
        raise Unavailable(f"store refused a write: {first}")
    return int(errors[0]["index"])


def advances(results: Iterable[Appended | None]) -> dict[str, tuple[int, int]]:
    """conversation -> (highest seq, latest ts) of the stored messages (the
    duplicates included, so that a retry repairs a counter a crash left
    behind); the refused ones count for nothing."""
    out: dict[str, tuple[int, int]] = {}
    for res in results:
        if res is not None and res.refused is None:
            seq, ts = out.get(res.conversation, (0, 0))
            out[res.conversation] = (max(seq, res.seq), max(ts, res.ts))
    return out


def switched(
    batch: Sequence[NewMessage], results: Sequence[Appended | None], e2e_on: set[str]
) -> list[str]:
    """The conversations the batch's first stored end-to-end message
    switches (one way)."""
    return sorted(
        {
            res.conversation
            for msg, res in zip(batch, results, strict=True)
            if msg.e2e and res is not None and res.refused is None
        }
        - e2e_on
    )


def still_owed(res: Appended, doc: Mapping[str, Any]) -> Appended:
    """Duplicate ``res`` with who still owes its first message (``doc``, as
    the duplicate lookup read it): of its recipients — as this call placed
    them again (``res.recipients``), else as stored — those it has not been
    delivered to yet; a member the placing added is owed it afresh
    (:func:`reassignment`). Nobody once it was refused or deleted."""
    if res.refused is not None or doc.get("deleted"):
        return replace(res, recipients=())
    stored = list(doc.get("recipients") or ())
    undelivered = set(doc.get("undelivered") or ())
    to = stored if res.recipients is None else res.recipients
    return replace(res, recipients=tuple(m for m in to if m in undelivered or m not in stored))


def repeated(first: Appended, msg: NewMessage) -> Appended:
    """The answer to a repeat of (sender, cid) within one batch, whose first
    copy ``msg`` was answered ``first``: that answer as a duplicate — with
    the message as stored now and owed to all its recipients, when this call
    stored it."""
    if first.duplicate or first.refused is not None:
        return replace(first, duplicate=True)
    stored = StoredMessage(
        first.id,
        first.conversation,
        first.seq,
        msg.sender,
        first.ts,
        msg.body,
        cid=msg.cid,
        reply_to=msg.reply_to,
    )
    return replace(first, duplicate=True, message=stored)


# -- groups ------------------------------------------------------------------------


def members_at(doc: dict[str, Any], since: int, seq: int) -> set[str] | None:
    """The members of group ``doc`` for the message at ``seq``, planned
    against membership version ``since``: the members now, with every
    change made after ``since`` that starts after ``seq`` undone (changes
    start at increasing seqs, so those are the latest ones). None if that
    needs changes older than ``doc`` keeps."""
    members = set(doc["members"])
    later = [c for c in doc.get("changes") or () if c["mver"] > since]
    for change in sorted(later, key=lambda c: c["mver"], reverse=True):
        if change["from_seq"] <= seq:
            return members
        members -= set(change["added"])
        members |= set(change["removed"])
    return members if len(later) == int(doc.get("mver", 0)) - since else None


def placement(res: Appended, sender: str, members: set[str]) -> Appended:
    """Message ``res`` as it must be for the group's ``members`` at its seq:
    refused ``forbidden`` (its seq kept by a tombstone) if its sender was
    removed before it, else owed to the other members."""
    if sender not in members:
        return replace(res, recipients=(), refused="forbidden")
    return replace(res, recipients=tuple(sorted(members - {sender})))


def reassignment(doc: dict[str, Any], to: Sequence[str]) -> dict[str, Any] | None:
    """The ``$set`` that makes ``to`` the recipients of message ``doc``:
    receipts kept for those who stay, fresh ones for those added, none for
    those dropped, and ``rpending`` recounted; None if ``to`` already are."""
    old = doc["recipients"]
    wanted = set(to)
    if set(old) == wanted:
        return None
    added = [m for m in to if m not in old]
    receipts = [r for r in doc["receipts"] if r["member"] in wanted]
    receipts += [receipt_doc(m) for m in added]
    status = doc.get("status") or {}
    return {
        "recipients": [r["member"] for r in receipts],
        "receipts": receipts,
        "status": {
            "delivered_to": [m for m in status.get("delivered_to") or () if m in wanted],
            "seen_by": [m for m in status.get("seen_by") or () if m in wanted],
        },
        "undelivered": [m for m in doc.get("undelivered") or () if m in wanted] + added,
        "unseen": [m for m in doc.get("unseen") or () if m in wanted] + added,
        "rpending": sum(len(unacked(r)) for r in receipts),
    }


def membership_commit(
    change: NewMembership, plan: MembershipPlan, doc: dict[str, Any], highest: int
) -> tuple[dict[str, Any], Op]:
    """The members event of ``change`` (planned as ``plan`` against group
    ``doc``; ``highest``: the highest stored seq, read after ``doc``) and the
    compare-and-set that commits it: on the version read, on ``last_seq``
    still below the change's ``from_seq`` (so an append that has stored and
    counted a message at ``from_seq`` or later makes the change plan again)
    and on no change pending. It sets ``pending`` to the event, which stays
    there until the event is stored with its eseq."""
    conv = change.conversation
    joined = joined_of(doc)
    # The first seq the group after the change applies to: one past the
    # highest stored (so it only grows from one change to the next).
    from_seq = max(doc.get("last_seq", 0), highest) + 1
    version = int(doc.get("mver", 0)) + 1
    event = {
        "_id": change.id,
        "conversation": conv,
        "kind": EventKind.MEMBERS.value,
        "message_id": "",
        "by": change.by,
        "cid": change.id,
        "ts": change.ts,
        "action": change.action.value,
        "users": list(plan.added or plan.removed or change.users),
        "members": list(plan.members),
        "admins": list(plan.admins),
        "title": plan.title,
        "mver": version,
        "from_seq": from_seq,
        "owed": list(plan.notify),
    }
    cas = {
        "_id": conv,
        "mver": {"$not": {"$gt": version - 1}},
        "last_seq": {"$not": {"$gte": from_seq}},
        "pending": {"$exists": False},
    }
    update = {
        "$set": {
            "members": list(plan.members),
            "admins": list(plan.admins),
            "joined": [{"member": m, "seq": s} for m, s in joined.items() if m in plan.members]
            + [{"member": u, "seq": from_seq} for u in plan.added],
            "title": plan.title,
            "mver": version,
            # The event, until it is stored with its eseq.
            "pending": event,
        },
        "$push": {
            "changes": {
                "$each": [
                    {
                        "mver": version,
                        "from_seq": from_seq,
                        "added": list(plan.added),
                        "removed": list(plan.removed),
                    }
                ],
                "$slice": -CHANGES_KEPT,
            }
        },
    }
    return event, (cas, update)


# -- events and paging -------------------------------------------------------------


def judge_event(
    ev: NewEvent, group: dict[str, Any] | None, doc: dict[str, Any] | None, e2e: bool = False
) -> tuple[Refusal | None, Sequence[str]]:
    """Event ``ev`` judged (:func:`chatd.core.events.judge`) against its
    message as read with every event applied (``doc``, None if there is
    none) and, in a group, the group as it is now (``group``), and who it is
    owed to. In a group it is owed to the members, acted on by members only
    (an operator, ``ev.moderator``, from outside), on what they may read;
    its admins moderate (every member, in a group without admins). An edit
    must fit the conversation's mode as read: ``e2e`` (a group's is its
    document's own ``e2e``)."""
    target = None
    mine, already = 0, False
    if doc is not None:
        target = Target(
            doc["conversation"],
            doc["sender"],
            doc["ts"],
            bool(doc.get("deleted")),
            doc.get("seq", 1),
            bool(group.get("e2e")) if group is not None else e2e,
        )
        own = [r["emoji"] for r in doc.get("reactions") or () if r["user"] == ev.by]
        mine, already = len(own), ev.emoji in own
    to: Sequence[str] = ev.recipients
    visible_from = 1
    moderator = ev.moderator
    if ev.conversation.startswith(GROUP_PREFIX):
        members = list((group or {}).get("members") or ())
        if ev.by in members:
            visible_from = joined_of(need(group)).get(ev.by, 1)
            moderator = moderator or manages(ev.by, admins_of(need(group)))
        elif not ev.moderator:
            target = None
        to = sorted(m for m in members if m != ev.by)
    refusal = event_rules.judge_event(
        ev,
        target,
        moderator=moderator,
        visible_from=visible_from,
        reactions_by_user=mine,
        reacted_already=already,
    )
    return refusal, to


def owed_query(field: str, user: str, order: str, after: tuple[str, int] | None) -> dict[str, Any]:
    """What is owed to ``user`` (``field``: the owed index's key) after
    ``after`` (conversation, ``order`` seq): a range on the index's second
    key, so the scan starts at ``after``'s conversation; the few entries of
    that conversation up to ``after`` are dropped by the ``$nor``."""
    query: dict[str, Any] = {field: user}
    if after is not None:
        conv, n = after
        query["conversation"] = {"$gte": conv}
        query["$nor"] = [{"conversation": conv, order: {"$lte": n}}]
    return query


# -- end-to-end --------------------------------------------------------------------


def new_shares(
    doc: dict[str, Any], user: str, device: str, shares: Mapping[str, str]
) -> dict[str, str] | None:
    """The ``shares`` (recipient device -> sealed key) epoch ``doc`` lacks, to
    add by a compare-and-set on their absence; None if adding them is a
    conflict (:func:`chatd.core.e2e.judge_epoch_upload`: the epoch is
    another device's, or it holds another share for one of those
    recipients)."""
    upload = judge_epoch_upload(
        (doc["user"], doc["device"]), doc.get("shares") or {}, user, device, shares
    )
    return None if upload.outcome == "conflict" else upload.new


def same_device(found: dict[str, Any], keys: Mapping[str, Any]) -> bool:
    """Whether registered device ``found`` is the one being registered again
    (its ``keys`` the same, and not removed)."""
    return found.get("removed_ts") is None and all(found.get(k) == v for k, v in keys.items())


def free_slot(taken: set[Any], limit: int) -> int | None:
    """The lowest device slot below ``limit`` not in ``taken`` (None: full)."""
    return next((s for s in range(limit) if s not in taken), None)
