"""The MongoDB store's receipt decisions, as plain functions (the receipts
half of :mod:`chatd.store.mongo_plan`).

Owns the compare-and-set plans of receipt marks
(:func:`chatd.core.delivery.apply_mark` against the receipt elements read),
picking the marks that won a bulk of them, the acks that settle owed
receipts, and paging the receipts owed to a sender. Pure: no I/O and no
pymongo; tested table-driven in ``tests/core/test_mongo_plan_receipts.py``.

Guarantees the I/O loop (:mod:`chatd.store.mongo_receipts`) relies on: a
mark's update compares the receipt state its plan started from and stamps a
token of its own, so only the write that wins reports the transition and
the winner is known even when a bulk only says how many updates matched;
an ack's filter makes a repeated or concurrent ack a no-op, so
``rpending`` stays the count of owed receipts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatd.core.delivery import SETTLED_BY_ACK, apply_mark
from chatd.core.model import Mark, MarkResult, Receipt, ReceiptKey, Status
from chatd.store.mongo_docs import field_of, unacked
from chatd.store.mongo_plan import Op


@dataclass(frozen=True)
class PlannedMark:
    """One receipt transition to write: mark ``i`` of the batch moves element
    ``idx`` of its message's receipts through ``made``; the update stamps
    ``token`` on it, so that the winner is known when a bulk only says how
    many of its updates matched."""

    i: int
    message_id: str
    idx: int
    token: str
    made: tuple[Status, ...]
    op: Op


def mark_rounds(batch: Sequence[Mark]) -> int:
    """How many rounds a batch of marks may take. A round repeats only for
    updates whose receipt another writer moved meanwhile, and a receipt
    moves at most twice: this many always suffice (more would be a bug,
    reported as Unavailable, never a hang)."""
    return 2 * len({(m.message_id, m.user) for m in batch}) + 2


def plan_marks(
    batch: Sequence[Mark],
    pending: Sequence[int],
    docs: Mapping[str, dict[str, Any]],
    token: Callable[[], str],
) -> tuple[dict[int, MarkResult], list[PlannedMark]]:
    """Marks ``pending`` of ``batch`` against their messages as read
    (``docs``): the ones answered without a write, and the compare-and-set
    updates of the others, in batch order (a later mark of the same receipt
    expects the earlier one's result, so they must run ordered)."""
    answered: dict[int, MarkResult] = {}
    planned: list[PlannedMark] = []
    # The receipt state each planned update leaves behind, so that two
    # marks of one (message, member) in one batch chain correctly.
    state: dict[tuple[str, str], tuple[int | None, int | None]] = {}
    for i in pending:
        mark = batch[i]
        doc = docs.get(mark.message_id)
        if doc is None:
            answered[i] = MarkResult((), known=False)
            continue
        try:
            idx = doc["recipients"].index(mark.user)
        except ValueError:
            # The sender's own, or deleted for everyone (an ack that
            # crossed the deletion): nothing to do, not an error.
            answered[i] = MarkResult(
                (), known=doc["sender"] == mark.user or bool(doc.get("deleted"))
            )
            continue
        key = (mark.message_id, mark.user)
        if key not in state:
            receipt = doc["receipts"][idx]
            state[key] = (receipt["delivered_ts"], receipt["seen_ts"])
        old_d, old_s = state[key]
        new_d, new_s, made = apply_mark(old_d, old_s, mark.status, mark.ts)
        if not made:
            answered[i] = MarkResult((), known=True)
            continue
        state[key] = (new_d, new_s)
        stamp = token()
        at = f"receipts.{idx}"
        sets: dict[str, Any] = {}
        add: dict[str, Any] = {}
        pull: dict[str, Any] = {}
        for status in made:
            f = field_of(status)
            sets[f"{at}.{f}_ts"] = mark.ts
            sets[f"{at}.{f}_op"] = stamp
            if status is Status.DELIVERED:
                add["status.delivered_to"] = mark.user
                pull["undelivered"] = mark.user
            else:
                add["status.seen_by"] = mark.user
                pull["unseen"] = mark.user
        # Compare-and-set on the state this plan started from.
        cas = {
            "_id": mark.message_id,
            f"{at}.member": mark.user,
            f"{at}.delivered_ts": old_d,
            f"{at}.seen_ts": old_s,
        }
        update = {"$set": sets, "$addToSet": add, "$pull": pull, "$inc": {"rpending": len(made)}}
        planned.append(PlannedMark(i, mark.message_id, idx, stamp, made, (cas, update)))
    return answered, planned


def stamp(doc: dict[str, Any] | None, idx: int, status: Status) -> str | None:
    """The token of the update that made ``status`` for receipt ``idx``."""
    receipts = (doc or {}).get("receipts") or []
    if idx >= len(receipts):
        return None
    return receipts[idx].get(f"{field_of(status)}_op")


def winners(planned: Iterable[PlannedMark], fresh: Mapping[str, dict[str, Any]]) -> set[int]:
    """Which planned marks won their compare-and-set, from the messages read
    again after a bulk in which some lost (``fresh``): those whose token
    the receipt carries."""
    return {p.i for p in planned if stamp(fresh.get(p.message_id), p.idx, p.made[0]) == p.token}


def marked(mark: Mark, doc: dict[str, Any], made: Sequence[Status]) -> MarkResult:
    """What a mark that won reports: its transitions."""
    return MarkResult(
        tuple(
            Receipt(mark.message_id, doc["conversation"], doc["sender"], mark.user, s, mark.ts)
            for s in made
        ),
        known=True,
    )


def plan_acks(
    acks: Sequence[tuple[str, ReceiptKey]], docs: Mapping[str, dict[str, Any]]
) -> list[Op]:
    """The updates that settle the receipts ``acks`` name (sender, receipt),
    against their messages as read (``docs``: sender, recipients). Each
    settles a receipt that exists and is unacked, exactly once: the filter
    makes a repeated or concurrent ack a no-op, so ``rpending`` stays the
    count of owed receipts. An ack of a message that is not the sender's,
    or of no recipient, plans nothing."""
    ops: list[Op] = []
    for sender, key in acks:
        doc = docs.get(key.message_id)
        if doc is None or doc["sender"] != sender or key.member not in doc["recipients"]:
            continue
        at = f"receipts.{doc['recipients'].index(key.member)}"
        for status in SETTLED_BY_ACK[key.status]:
            f = field_of(status)
            ops.append(
                (
                    {
                        "_id": key.message_id,
                        "sender": sender,
                        f"{at}.member": key.member,
                        f"{at}.{f}_ts": {"$ne": None},
                        f"{at}.{f}_acked": False,
                    },
                    {"$set": {f"{at}.{f}_acked": True}, "$inc": {"rpending": -1}},
                )
            )
    return ops


def settling(receipts: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """The ``$set`` that settles every receipt a message still owes its
    sender (``receipts``: its receipt elements)."""
    return {
        f"receipts.{i}.{field_of(status)}_acked": True
        for i, r in enumerate(receipts)
        for status in unacked(r)
    }


def receipts_page(
    docs: Iterable[dict[str, Any]], sender: str, after: tuple[str, str] | None, limit: int
) -> list[Receipt]:
    """The receipts owed to ``sender`` in messages ``docs`` (in ``_id``
    order), paged by (message id, member) pairs: the first ``limit`` pairs
    after ``after``, each with every receipt it owes. Every message read
    owes at least one pair, except perhaps the one ``after`` points into:
    ``limit + 1`` messages always hold ``limit`` pairs when there are as
    many."""
    out: list[Receipt] = []
    pairs = 0
    for doc in docs:
        for r in sorted(doc["receipts"], key=lambda r: r["member"]):
            if after is not None and (doc["_id"], r["member"]) <= after:
                continue
            owed = [
                Receipt(
                    doc["_id"],
                    doc["conversation"],
                    sender,
                    r["member"],
                    status,
                    r[f"{field_of(status)}_ts"],
                )
                for status in unacked(r)
            ]
            if not owed:
                continue
            if pairs == limit:
                return out
            out.extend(owed)
            pairs += 1
    return out
