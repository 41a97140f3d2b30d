"""Receipts on MongoDB: marking messages delivered and seen, and settling what
their senders are owed.

Owns ``mark``, ``ack_receipts`` and ``owed_receipts``. Each function runs in
the store's worker thread and takes the store's
:class:`~chatd.store.mongo_schema.Collections`; the plans are
:mod:`chatd.store.mongo_plan_receipts`' (``plan_marks``, ``winners``,
``plan_acks``, ``receipts_page``), so the loop here only reads, writes and
goes round again.

**Receipts** live in the message document (``receipts``: one element per
recipient, at the recipient's index in ``recipients``). A mark is a
compare-and-set on that element's ``(delivered_ts, seen_ts)``, computed by
:func:`chatd.core.delivery.apply_mark`; only the write that wins the compare
reports the transition, and it stamps its own token on the element so that
the winner is known even when a ``bulk_write`` only says how many of its
updates matched. **Owed receipts** are counted in ``rpending`` by the same
atomic updates (``+n`` on a transition, ``-1`` on an ack that settles one),
so "which messages owe their sender a receipt" is an indexed query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, UpdateOne

from chatd.core.errors import Unavailable
from chatd.core.model import Mark, MarkResult, Receipt, ReceiptKey
from chatd.store.mongo_plan import need
from chatd.store.mongo_plan_receipts import (
    mark_rounds,
    marked,
    plan_acks,
    plan_marks,
    receipts_page,
    winners,
)
from chatd.store.mongo_schema import Collections


def _token() -> str:
    return str(ObjectId())


def mark(c: Collections, batch: list[Mark]) -> list[MarkResult]:
    results: list[MarkResult | None] = [None] * len(batch)
    pending = list(range(len(batch)))
    fields = {"sender": 1, "conversation": 1, "recipients": 1, "receipts": 1, "deleted": 1}
    for _ in range(mark_rounds(batch)):
        if not pending:
            break
        ids = sorted({batch[i].message_id for i in pending})
        docs = {d["_id"]: d for d in c.messages.find({"_id": {"$in": ids}}, fields)}
        answered, planned = plan_marks(batch, pending, docs, _token)
        for i, res in answered.items():
            results[i] = res
        if not planned:
            pending = []
            break
        # Ordered: a later mark of the same receipt expects the earlier
        # one's result, so it must run after it.
        done = c.messages.bulk_write([UpdateOne(*p.op) for p in planned], ordered=True)
        won = {p.i for p in planned}
        if done.modified_count != len(planned):
            # Some compares lost to a concurrent writer: the tokens say
            # which updates are ours. The others plan again from fresh state.
            again = sorted({p.message_id for p in planned})
            fresh = {d["_id"]: d for d in c.messages.find({"_id": {"$in": again}}, {"receipts": 1})}
            won = winners(planned, fresh)
        for p in planned:
            if p.i in won:
                results[p.i] = marked(batch[p.i], docs[p.message_id], p.made)
        pending = [p.i for p in planned if p.i not in won]
    if pending:
        raise Unavailable("too much contention applying receipts")
    return [need(r) for r in results]


def ack_receipts(c: Collections, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
    ids = sorted({key.message_id for _, key in acks})
    docs = {
        d["_id"]: d for d in c.messages.find({"_id": {"$in": ids}}, {"sender": 1, "recipients": 1})
    }
    ops = plan_acks(acks, docs)
    if ops:
        c.messages.bulk_write([UpdateOne(*op) for op in ops], ordered=True)
    return [None] * len(acks)


def owed_receipts(
    c: Collections, username: str, limit: int, after: tuple[str, str] | None
) -> list[Receipt]:
    query: dict[str, Any] = {"sender": username, "rpending": {"$gt": 0}}
    if after is not None:
        query["_id"] = {"$gte": after[0]}
    # limit + 1 messages: see receipts_page.
    docs = c.messages.find(
        query, {"conversation": 1, "receipts": 1}, sort=[("_id", ASCENDING)], limit=limit + 1
    )
    return receipts_page(docs, username, after, limit)
