"""The MongoDB store's receipt planning (chatd.store.mongo_plan_receipts),
table-driven: the compare-and-set plans of marks, picking the winners of a
bulk, acks, settling and the owed-receipt pages. No database: the loop
that runs these is covered by tests/contract/test_store_mongo.py."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from chatd.core.model import Mark, MarkResult, Receipt, ReceiptKey, Status
from chatd.core.names import rid
from chatd.store.mongo_docs import erased, unacked
from chatd.store.mongo_plan_receipts import (
    PlannedMark,
    mark_rounds,
    marked,
    plan_acks,
    plan_marks,
    receipts_page,
    settling,
    stamp,
    winners,
)

D, S = Status.DELIVERED, Status.SEEN


def receipt(member: str, d=None, s=None, d_acked=False, s_acked=False, **ops: str) -> dict:
    return {
        "member": member,
        "delivered_ts": d,
        "seen_ts": s,
        "delivered_acked": d_acked,
        "seen_acked": s_acked,
        **{f"{k}_op": v for k, v in ops.items()},
    }


def message(*receipts: dict[str, Any], deleted: bool = False) -> dict[str, Any]:
    return {
        "_id": "m1",
        "conversation": "d:alice:bob",
        "sender": "alice",
        "recipients": [r["member"] for r in receipts],
        "receipts": list(receipts),
        "deleted": deleted,
    }


def tokens():
    counter = itertools.count(1)
    return lambda: f"t{next(counter)}"


@pytest.mark.parametrize(
    ("marks", "doc", "answered", "planned"),
    [
        # An unknown message; the sender's own; a deleted one; another user's.
        ([Mark("bob", "m9", D, 5)], message(receipt("bob")), {0: False}, []),
        ([Mark("alice", "m1", S, 5)], message(receipt("bob")), {0: True}, []),
        ([Mark("bob", "m1", S, 5)], {**message(), "deleted": True}, {0: True}, []),
        ([Mark("eve", "m1", S, 5)], message(receipt("bob")), {0: False}, []),
        # Nothing new: answered, no write.
        ([Mark("bob", "m1", D, 5)], message(receipt("bob", 3)), {0: True}, []),
        ([Mark("bob", "m1", S, 5)], message(receipt("bob", 3, 4)), {0: True}, []),
        # Transitions: (index, receipt element, compared state, made).
        ([Mark("bob", "m1", D, 5)], message(receipt("bob")), {}, [(0, 0, (None, None), (D,))]),
        (
            [Mark("bob", "m1", S, 5)],
            message(receipt("carol"), receipt("bob", 3)),
            {},
            [(0, 1, (3, None), (S,))],
        ),
        ([Mark("bob", "m1", S, 5)], message(receipt("bob")), {}, [(0, 0, (None, None), (D, S))]),
        # Two marks of one receipt chain: the second compares the first's result.
        (
            [Mark("bob", "m1", D, 5), Mark("bob", "m1", S, 6)],
            message(receipt("bob")),
            {},
            [(0, 0, (None, None), (D,)), (1, 0, (5, None), (S,))],
        ),
        (
            [Mark("bob", "m1", S, 5), Mark("bob", "m1", D, 6)],
            message(receipt("bob")),
            {1: True},
            [(0, 0, (None, None), (D, S))],
        ),
    ],
)
def test_plan_marks(marks, doc, answered, planned):
    got_answered, got = plan_marks(marks, range(len(marks)), {"m1": doc}, tokens())
    assert {i: r.known for i, r in got_answered.items()} == answered
    assert all(r.transitions == () for r in got_answered.values())
    assert [(p.i, p.idx, p.op[0][f"receipts.{p.idx}.delivered_ts"], p.made) for p in got] == [
        (i, idx, state[0], made) for i, idx, state, made in planned
    ]
    for p, (i, idx, (d, s), made) in zip(got, planned, strict=True):
        mark, at = marks[i], f"receipts.{idx}"
        assert (p.message_id, p.token) == ("m1", f"t{got.index(p) + 1}")
        cas, update = p.op
        assert cas == {
            "_id": "m1",
            f"{at}.member": mark.user,
            f"{at}.delivered_ts": d,
            f"{at}.seen_ts": s,
        }
        fields = {"delivered" if st is D else "seen" for st in made}
        assert update["$set"] == {
            **{f"{at}.{f}_ts": mark.ts for f in fields},
            **{f"{at}.{f}_op": p.token for f in fields},
        }
        assert update["$inc"] == {"rpending": len(made)}
        assert set(update["$pull"]) == {"undelivered" if st is D else "unseen" for st in made}
        assert set(update["$addToSet"]) == {
            "status.delivered_to" if st is D else "status.seen_by" for st in made
        }


@pytest.mark.parametrize(
    ("marks", "rounds"),
    [
        ([], 2),
        ([Mark("bob", "m1", D, 1)], 4),
        ([Mark("bob", "m1", D, 1), Mark("bob", "m1", S, 2)], 4),
        ([Mark("bob", "m1", D, 1), Mark("carol", "m1", S, 2), Mark("bob", "m2", S, 2)], 8),
    ],
)
def test_mark_rounds(marks, rounds):
    assert mark_rounds(marks) == rounds


@pytest.mark.parametrize(
    ("doc", "idx", "status", "token"),
    [
        (None, 0, D, None),
        (message(receipt("bob", 3, delivered="t1")), 0, D, "t1"),
        (message(receipt("bob", 3, delivered="t1")), 0, S, None),
        (message(receipt("bob", 3, delivered="t1")), 1, D, None),
        (message(receipt("bob", 3, 4, delivered="t1", seen="t2")), 0, S, "t2"),
        ({"_id": "m1"}, 0, D, None),
    ],
)
def test_stamp(doc, idx, status, token):
    assert stamp(doc, idx, status) == token


def planned(i: int, message_id: str, idx: int, token: str, *made: Status) -> PlannedMark:
    return PlannedMark(i, message_id, idx, token, made, ({}, {}))


@pytest.mark.parametrize(
    ("plans", "fresh", "won"),
    [
        ([], {}, set()),
        # The receipt carries this plan's token: it won.
        ([planned(0, "m1", 0, "t1", D)], {"m1": message(receipt("b", 1, delivered="t1"))}, {0}),
        # Another writer's token: lost (plans again).
        ([planned(0, "m1", 0, "t1", D)], {"m1": message(receipt("b", 1, delivered="x"))}, set()),
        # A seen planned with its delivered: the first status made decides.
        (
            [planned(0, "m1", 0, "t1", D, S)],
            {"m1": message(receipt("b", 1, 1, delivered="x", seen="t1"))},
            set(),
        ),
        # The message is gone.
        ([planned(0, "m1", 0, "t1", D)], {}, set()),
        (
            [planned(0, "m1", 1, "t1", S), planned(1, "m2", 0, "t2", D)],
            {
                "m1": message(receipt("a"), receipt("b", 1, 2, seen="t1")),
                "m2": message(receipt("c", 3, delivered="t9")),
            },
            {0},
        ),
    ],
)
def test_winners(plans, fresh, won):
    assert winners(plans, fresh) == won


def test_marked_reports_the_transitions_made():
    doc = message(receipt("bob"))
    assert marked(Mark("bob", "m1", S, 7), doc, (D, S)) == MarkResult(
        (
            Receipt("m1", "d:alice:bob", "alice", "bob", D, 7),
            Receipt("m1", "d:alice:bob", "alice", "bob", S, 7),
        ),
        known=True,
    )


def ack_op(member: str, idx: int, field: str) -> tuple[dict, dict]:
    at = f"receipts.{idx}"
    return (
        {
            "_id": "m1",
            "sender": "alice",
            f"{at}.member": member,
            f"{at}.{field}_ts": {"$ne": None},
            f"{at}.{field}_acked": False,
        },
        {"$set": {f"{at}.{field}_acked": True}, "$inc": {"rpending": -1}},
    )


@pytest.mark.parametrize(
    ("acks", "ops"),
    [
        ([("alice", ReceiptKey("m1", "bob", D))], [ack_op("bob", 1, "delivered")]),
        # A seen ack settles the delivered one too.
        (
            [("alice", ReceiptKey("m1", "carol", S))],
            [ack_op("carol", 0, "seen"), ack_op("carol", 0, "delivered")],
        ),
        # Not the sender's, no such recipient, no such message: nothing.
        ([("bob", ReceiptKey("m1", "bob", D))], []),
        ([("alice", ReceiptKey("m1", "eve", D))], []),
        ([("alice", ReceiptKey("m9", "bob", D))], []),
    ],
)
def test_plan_acks(acks, ops):
    docs = {"m1": {"sender": "alice", "recipients": ["carol", "bob"]}}
    assert plan_acks(acks, docs) == ops


@pytest.mark.parametrize(
    ("receipts", "sets"),
    [
        ([], {}),
        ([receipt("bob")], {}),
        ([receipt("bob", 1)], {"receipts.0.delivered_acked": True}),
        ([receipt("bob", 1, d_acked=True)], {}),
        (
            [receipt("bob", 1, 2, d_acked=True), receipt("carol", 1, 2)],
            {
                "receipts.0.seen_acked": True,
                "receipts.1.delivered_acked": True,
                "receipts.1.seen_acked": True,
            },
        ),
    ],
)
def test_settling(receipts, sets):
    assert settling(receipts) == sets


def owing(mid: str, *receipts: dict[str, Any]) -> dict[str, Any]:
    return {"_id": mid, "conversation": "c", "receipts": list(receipts)}


PAGES = [
    owing("m1", receipt("bob", 1, 2), receipt("amy", 3, d_acked=True)),
    owing("m2", receipt("dan", 4, s_acked=True), receipt("cat", 5)),
    owing("m3", receipt("eve", 6, 7, d_acked=True)),
]


def got(mid: str, member: str, status: Status, ts: int) -> Receipt:
    return Receipt(mid, "c", "alice", member, status, ts)


@pytest.mark.parametrize(
    ("after", "limit", "expected"),
    [
        (
            None,
            10,
            [
                got("m1", "bob", D, 1),
                got("m1", "bob", S, 2),
                got("m2", "cat", D, 5),
                got("m2", "dan", D, 4),
                got("m3", "eve", S, 7),
            ],
        ),
        # Paged by (message, member) pairs, each with every receipt it owes.
        (None, 1, [got("m1", "bob", D, 1), got("m1", "bob", S, 2)]),
        (None, 2, [got("m1", "bob", D, 1), got("m1", "bob", S, 2), got("m2", "cat", D, 5)]),
        (("m1", "bob"), 1, [got("m2", "cat", D, 5)]),
        (("m2", "cat"), 5, [got("m2", "dan", D, 4), got("m3", "eve", S, 7)]),
        (("m3", "eve"), 5, []),
        (None, 0, []),
    ],
)
def test_receipts_page(after, limit, expected):
    assert receipts_page(PAGES, "alice", after, limit) == expected


# -- what a receipt element still owes (chatd.store.mongo_docs) --------------------


@pytest.mark.parametrize(
    ("element", "owed"),
    [
        (receipt("bob"), []),
        (receipt("bob", 1), [D]),
        (receipt("bob", 1, 2), [D, S]),
        (receipt("bob", 1, 2, d_acked=True), [S]),
        (receipt("bob", 1, 2, d_acked=True, s_acked=True), []),
        ({"member": "bob", "delivered_ts": 1}, [D]),  # fields a document lacks
    ],
)
def test_unacked(element, owed):
    assert unacked(element) == owed


def test_erasing_a_message_leaves_what_it_still_owes_stale():
    doc = {
        **message(receipt("bob", 1, 2, d_acked=True), receipt("carol")),
        "undelivered": ["carol"],
    }
    assert erased(doc) == [("carol", "m1"), ("alice", rid("m1", "bob", S))]
