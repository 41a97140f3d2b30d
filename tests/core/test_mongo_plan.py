"""The MongoDB store's planning (chatd.store.mongo_plan), table-driven: seq
assignment and the screening of an append batch, resolving an insert_many
error, counters, a duplicate's answer, group placement, membership commits,
judging an event, owed-queue paging and the end-to-end decisions. No database: the I/O loops
that run these are covered by tests/contract/test_store_mongo.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from chatd.core.errors import Internal, Unavailable
from chatd.core.events import MAX_REACTIONS_PER_USER, MembershipPlan
from chatd.core.model import (
    Appended,
    EventKind,
    GroupAction,
    NewEvent,
    NewMembership,
    NewMessage,
    Sealed,
    StoredMessage,
)
from chatd.store.mongo_plan import (
    CHANGES_KEPT,
    advances,
    first_calls,
    first_failed,
    free_slot,
    judge_event,
    members_at,
    membership_commit,
    need,
    new_shares,
    owed_query,
    placement,
    plan_seqs,
    reassignment,
    repeated,
    same_device,
    screen,
    still_owed,
    switched,
)
from tests.core.test_mongo_plan_receipts import receipt

BODY = Sealed("k1", b"n", b"c")


def msg(n: int, conv: str = "d:a:b", sender: str = "a", cid: str | None = None, **kw: Any):
    return NewMessage(f"m{n}", conv, sender, cid or f"c{n}", n, BODY, ("b",), **kw)


def ok(n: int, conv: str = "d:a:b", seq: int = 1, ts: int = 1) -> Appended:
    return Appended(f"m{n}", conv, seq, ts, False, ("b",))


# -- appends -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "first_of", "unique"),
    [
        ([], {}, []),
        ([("a", "1"), ("a", "2")], {("a", "1"): 0, ("a", "2"): 1}, [0, 1]),
        ([("a", "1"), ("a", "1"), ("b", "1")], {("a", "1"): 0, ("b", "1"): 2}, [0, 2]),
        ([("a", "1"), ("b", "1"), ("a", "1"), ("a", "1")], {("a", "1"): 0, ("b", "1"): 1}, [0, 1]),
    ],
)
def test_first_calls(keys, first_of, unique):
    batch = [msg(i, sender=s, cid=c) for i, (s, c) in enumerate(keys)]
    assert first_calls(batch) == (first_of, unique)


GROUP = {"_id": "g:1", "kind": "group", "members": ["a", "b", "c"], "mver": 3}


@pytest.mark.parametrize(
    ("batch", "e2e_on", "allowed", "to", "since", "refused"),
    [
        # A direct message: owed to its own recipients.
        ([msg(0)], set(), [0], {0: ("b",)}, {}, {}),
        # A member of a group: owed to the other members as they are now.
        ([msg(0, "g:1")], set(), [0], {0: ["b", "c"]}, {0: 3}, {}),
        # Not a member (any more): refused, nothing stored.
        ([msg(0, "g:1", sender="x")], set(), [], {}, {}, {0: "forbidden"}),
        # A plain body in an end-to-end conversation.
        ([msg(0)], {"d:a:b"}, [], {}, {}, {0: "e2e_required"}),
        ([msg(0, e2e=True)], {"d:a:b"}, [0], {0: ("b",)}, {}, {}),
        # ... or after an end-to-end message of the same batch.
        ([msg(0, e2e=True), msg(1)], set(), [0], {0: ("b",)}, {}, {1: "e2e_required"}),
        ([msg(0), msg(1, e2e=True)], set(), [0, 1], {0: ("b",), 1: ("b",)}, {}, {}),
        # A non-member's end-to-end message still switches the batch.
        (
            [msg(0, "g:1", sender="x", e2e=True), msg(1, "g:1")],
            set(),
            [],
            {},
            {},
            {0: "forbidden", 1: "e2e_required"},
        ),
    ],
)
def test_screen(batch, e2e_on, allowed, to, since, refused):
    out = screen(batch, range(len(batch)), {"g:1": GROUP}, e2e_on)
    assert (out.allowed, out.to, out.since) == (allowed, to, since)
    assert {i: r.refused for i, r in out.refused.items()} == refused
    for i, r in out.refused.items():
        assert (r.id, r.seq, r.duplicate, r.recipients) == (batch[i].id, 0, False, None)


@pytest.mark.parametrize(
    ("conversations", "top", "seqs"),
    [
        ([], {"x": 4}, []),
        (["x", "x", "x"], {"x": 0}, [1, 2, 3]),
        (["x", "y", "x", "y"], {"x": 4, "y": 9}, [5, 10, 6, 11]),
    ],
)
def test_plan_seqs(conversations, top, seqs):
    before = dict(top)
    assert plan_seqs(conversations, top) == seqs
    assert top == before  # the guess is not consumed


def dup(index: int, code: int = 11000) -> dict[str, Any]:
    return {"index": index, "code": code, "errmsg": f"E{code} at {index}"}


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ({"writeErrors": [dup(0)]}, 0),
        ({"writeErrors": [dup(2)]}, 2),
        ({"writeErrors": [dup(1, 11001)]}, 1),
        ({"writeErrors": [dup(3, 12582)], "writeConcernErrors": []}, 3),
        # A write concern not met: stored, not yet durable as asked.
        (
            {"writeErrors": [], "writeConcernErrors": [{"errmsg": "waiting"}]},
            "write not confirmed: waiting",
        ),
        ({"writeErrors": [dup(0)], "writeConcernErrors": [{"errmsg": "w"}]}, "not confirmed"),
        # Anything but a duplicate key is not a race to plan again from.
        ({"writeErrors": [dup(0, 121)]}, "store refused a write: E121 at 0"),
        ({"writeErrors": [dup(0), dup(1, 2)]}, "store refused a write: E11000 at 0"),
        ({}, "store refused a write: the error"),
    ],
)
def test_first_failed(details, expected):
    if isinstance(expected, int):
        assert first_failed(details, "the error") == expected
    else:
        with pytest.raises(Unavailable, match=expected):
            first_failed(details, "the error")


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([], {}),
        ([None, ok(1, seq=3, ts=7)], {"d:a:b": (3, 7)}),
        ([ok(1, seq=3, ts=9), ok(2, seq=5, ts=7)], {"d:a:b": (5, 9)}),
        ([ok(1, "x", 2, 2), ok(2, "y", 1, 4)], {"x": (2, 2), "y": (1, 4)}),
        # Duplicates count (a retry repairs the counter); refusals do not.
        ([Appended("m", "x", 4, 4, True)], {"x": (4, 4)}),
        ([Appended("m", "x", 0, 9, False, refused="forbidden")], {}),
    ],
)
def test_advances(results, expected):
    assert advances(results) == expected


@pytest.mark.parametrize(
    ("batch", "results", "e2e_on", "expected"),
    [
        ([msg(0)], [ok(0)], set(), []),
        ([msg(0, e2e=True)], [ok(0)], set(), ["d:a:b"]),
        ([msg(0, e2e=True)], [ok(0)], {"d:a:b"}, []),
        (
            [msg(0, "y", e2e=True), msg(1, "x", e2e=True)],
            [ok(0, "y"), ok(1, "x")],
            set(),
            ["x", "y"],
        ),
        ([msg(0, e2e=True)], [Appended("m0", "d:a:b", 0, 1, False, refused="x")], set(), []),
        ([msg(0, e2e=True)], [None], set(), []),
    ],
)
def test_switched(batch, results, e2e_on, expected):
    assert switched(batch, results, e2e_on) == expected


FIRST = StoredMessage("m1", "g:1", 4, "alice", 3, BODY, cid="c1")
DUP = Appended("m1", "g:1", 4, 3, True, message=FIRST)
#: bob has had the message delivered (and seen it), carol has not.
OWED = {"recipients": ["bob", "carol"], "undelivered": ["carol"]}


@pytest.mark.parametrize(
    ("res", "doc", "owed"),
    [
        (DUP, OWED, ("carol",)),  # as stored: the undelivered
        (DUP, {**OWED, "undelivered": ["bob", "carol"]}, ("bob", "carol")),
        (DUP, {**OWED, "undelivered": []}, ()),
        # Placed again by this call (bob removed, dave added): dave afresh.
        (replace(DUP, recipients=("carol", "dave")), OWED, ("carol", "dave")),
        (replace(DUP, recipients=("bob",)), OWED, ()),
        # A deleted user: pulled from undelivered, still among recipients.
        (DUP, {"recipients": ["bob", "carol"], "undelivered": []}, ()),
        # Deleted for everyone, or refused (a tombstone): nobody.
        (replace(DUP, recipients=("carol", "dave")), {**OWED, "deleted": True}, ()),
        (replace(DUP, refused="forbidden"), {"recipients": [], "undelivered": []}, ()),
        (DUP, {}, ()),  # an old document without the owed keys
    ],
)
def test_still_owed(res, doc, owed):
    assert still_owed(res, doc) == replace(res, recipients=owed)


NEW = msg(1, "g:1", "alice", cid="c1", reply_to="m0")


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        # Stored by this call: as stored now, owed to all its recipients.
        (
            Appended("m1", "g:1", 4, 1, False, ("bob",)),
            Appended(
                "m1",
                "g:1",
                4,
                1,
                True,
                ("bob",),
                message=StoredMessage("m1", "g:1", 4, "alice", 1, BODY, cid="c1", reply_to="m0"),
            ),
        ),
        # Stored before: the first copy's answer, as it is.
        (replace(DUP, recipients=("carol",)), replace(DUP, recipients=("carol",))),
        (
            Appended("m1", "g:1", 0, 1, False, refused="forbidden"),
            Appended("m1", "g:1", 0, 1, True, refused="forbidden"),
        ),
    ],
)
def test_repeated(first, expected):
    assert repeated(first, NEW) == expected


def test_need():
    assert need(0) == 0
    with pytest.raises(Internal):
        need(None)


# -- groups ------------------------------------------------------------------------


def change(mver: int, from_seq: int, added=(), removed=()) -> dict[str, Any]:
    return {"mver": mver, "from_seq": from_seq, "added": list(added), "removed": list(removed)}


#: mver 1 at seq 3 removed bob; mver 2 at seq 5 added dave.
CHANGED = {
    "members": ["alice", "carol", "dave"],
    "mver": 2,
    "changes": [change(1, 3, removed=["bob"]), change(2, 5, added=["dave"])],
}


@pytest.mark.parametrize(
    ("doc", "since", "seq", "expected"),
    [
        (CHANGED, 2, 9, {"alice", "carol", "dave"}),  # planned with the latest
        (CHANGED, 1, 5, {"alice", "carol", "dave"}),
        (CHANGED, 1, 4, {"alice", "carol"}),
        (CHANGED, 0, 4, {"alice", "carol"}),
        (CHANGED, 0, 2, {"alice", "bob", "carol"}),
        # Older than the changes the document keeps: unknown.
        ({**CHANGED, "mver": 3}, 0, 2, None),
        ({**CHANGED, "changes": CHANGED["changes"][1:]}, 0, 2, None),
        ({**CHANGED, "changes": CHANGED["changes"][1:]}, 1, 2, {"alice", "carol"}),
        ({"members": ["a"]}, 0, 1, {"a"}),
    ],
)
def test_members_at(doc, since, seq, expected):
    assert members_at(doc, since, seq) == expected


STORED = Appended("m1", "g:1", 4, 1, False, ("bob", "carol"))


@pytest.mark.parametrize(
    ("sender", "members", "recipients", "refused"),
    [
        ("alice", {"alice", "bob", "carol"}, ("bob", "carol"), None),
        ("alice", {"alice", "carol", "dave"}, ("carol", "dave"), None),
        ("alice", {"alice"}, (), None),
        ("alice", {"bob", "carol"}, (), "forbidden"),
    ],
)
def test_placement(sender, members, recipients, refused):
    assert placement(STORED, sender, members) == Appended(
        "m1", "g:1", 4, 1, False, recipients, refused=refused
    )


PLACED = {
    "recipients": ["bob", "carol"],
    "receipts": [receipt("bob", 5, 6, d_acked=True), receipt("carol", 7)],
    "status": {"delivered_to": ["bob", "carol"], "seen_by": ["bob"]},
    "undelivered": [],
    "unseen": ["carol"],
}


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        (("carol", "bob"), None),  # the same members: nothing to write
        (
            ("carol", "dave"),
            {
                "recipients": ["carol", "dave"],
                "receipts": [receipt("carol", 7), receipt("dave")],
                "status": {"delivered_to": ["carol"], "seen_by": []},
                "undelivered": ["dave"],
                "unseen": ["carol", "dave"],
                "rpending": 1,
            },
        ),
        (
            ("bob",),
            {
                "recipients": ["bob"],
                "receipts": [receipt("bob", 5, 6, d_acked=True)],
                "status": {"delivered_to": ["bob"], "seen_by": ["bob"]},
                "undelivered": [],
                "unseen": [],
                "rpending": 1,
            },
        ),
        (
            (),
            {
                "recipients": [],
                "receipts": [],
                "status": {"delivered_to": [], "seen_by": []},
                "undelivered": [],
                "unseen": [],
                "rpending": 0,
            },
        ),
    ],
)
def test_reassignment(to, expected):
    assert reassignment(PLACED, to) == expected


GROUP_DOC = {
    "_id": "g:1",
    "kind": "group",
    "members": ["alice", "bob", "carol"],
    "admins": ["alice"],
    "joined": [{"member": "carol", "seq": 4}, {"member": "gone", "seq": 2}],
    "title": "t",
    "mver": 2,
    "last_seq": 6,
}


@pytest.mark.parametrize(
    ("action", "users", "plan", "doc", "highest", "from_seq", "joined"),
    [
        # Adds dave from one past the highest seq (the stored one wins over
        # a counter that lags, and the other way round).
        (
            GroupAction.ADD,
            ("dave",),
            MembershipPlan(("dave",), (), ("alice", "bob", "carol", "dave"), ("alice",), "t", ()),
            GROUP_DOC,
            9,
            10,
            [{"member": "carol", "seq": 4}, {"member": "dave", "seq": 10}],
        ),
        (
            GroupAction.REMOVE,
            ("carol",),
            MembershipPlan((), ("carol",), ("alice", "bob"), ("alice",), "t", ("bob", "carol")),
            GROUP_DOC,
            0,
            7,
            [],
        ),
        # A group made before admins and mver existed.
        (
            GroupAction.RENAME,
            (),
            MembershipPlan((), (), ("alice", "bob"), (), "new", ("bob",)),
            {"_id": "g:1", "kind": "group", "members": ["alice", "bob"]},
            0,
            1,
            [],
        ),
    ],
)
def test_membership_commit(action, users, plan, doc, highest, from_seq, joined):
    ch = NewMembership("e1", "g:1", "alice", 50, action, users, plan.title)
    event, (cas, update) = membership_commit(ch, plan, doc, highest)
    version = int(doc.get("mver", 0)) + 1
    assert event == {
        "_id": "e1",
        "conversation": "g:1",
        "kind": EventKind.MEMBERS.value,
        "message_id": "",
        "by": "alice",
        "cid": "e1",
        "ts": 50,
        "action": action.value,
        "users": list(plan.added or plan.removed or users),
        "members": list(plan.members),
        "admins": list(plan.admins),
        "title": plan.title,
        "mver": version,
        "from_seq": from_seq,
        "owed": list(plan.notify),
    }
    # Compare-and-set on the version read, last_seq below from_seq, nothing pending.
    assert cas == {
        "_id": "g:1",
        "mver": {"$not": {"$gt": version - 1}},
        "last_seq": {"$not": {"$gte": from_seq}},
        "pending": {"$exists": False},
    }
    assert update["$set"] == {
        "members": list(plan.members),
        "admins": list(plan.admins),
        "joined": joined,
        "title": plan.title,
        "mver": version,
        "pending": event,
    }
    assert update["$push"] == {
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
    }


# -- events and paging -------------------------------------------------------------


def event(kind: EventKind, by: str = "bob", conv: str = "g:1", **kw: Any) -> NewEvent:
    return NewEvent("e1", conv, kind, "m1", by, "c1", 100, ("x",), **kw)


def target(sender: str = "alice", seq: int = 5, reactions=(), **kw: Any) -> dict[str, Any]:
    return {
        "conversation": "g:1",
        "sender": sender,
        "ts": 90,
        "seq": seq,
        "reactions": [{"user": u, "emoji": e} for u, e in reactions],
        **kw,
    }


MEMBERS = {"members": ["alice", "bob", "carol"], "admins": ["alice"], "joined": []}
LATE_BOB = {**MEMBERS, "joined": [{"member": "bob", "seq": 6}]}
FULL = [("bob", chr(0x1F600 + i)) for i in range(MAX_REACTIONS_PER_USER)]


@pytest.mark.parametrize(
    ("ev", "group", "doc", "refused", "to"),
    [
        (event(EventKind.REACTION, emoji="👍"), MEMBERS, target(), None, ["alice", "carol"]),
        # No such message, or a deleted one.
        (event(EventKind.REACTION, emoji="👍"), MEMBERS, None, "not_found", ["alice", "carol"]),
        (
            event(EventKind.REACTION, emoji="👍"),
            MEMBERS,
            target(deleted=True),
            "not_found",
            ["alice", "carol"],
        ),
        # Not a member: not found (and owed to the members all the same).
        (event(EventKind.REACTION, "dave", emoji="👍"), MEMBERS, target(), "not_found", None),
        # ... unless an operator.
        (event(EventKind.DELETED, "dave", moderator=True), MEMBERS, target(), None, None),
        # A message from before the member joined.
        (event(EventKind.REACTION, emoji="👍"), LATE_BOB, target(seq=5), "not_found", None),
        (event(EventKind.REACTION, emoji="👍"), LATE_BOB, target(seq=6), None, None),
        # Deleting another's message: admins moderate, members do not.
        (event(EventKind.DELETED), MEMBERS, target(), "forbidden", None),
        (event(EventKind.DELETED, "alice"), MEMBERS, target("bob"), None, ["bob", "carol"]),
        # Every member moderates a group without admins.
        (event(EventKind.DELETED), {**MEMBERS, "admins": []}, target(), None, None),
        # Reactions: a full hand refuses a new one, not one already there or a removal.
        (
            event(EventKind.REACTION, emoji="👍"),
            MEMBERS,
            target(reactions=FULL),
            "bad_request",
            None,
        ),
        (event(EventKind.REACTION, emoji=FULL[0][1]), MEMBERS, target(reactions=FULL), None, None),
        (
            event(EventKind.REACTION, emoji="👍", on=False),
            MEMBERS,
            target(reactions=FULL),
            None,
            None,
        ),
        # Edits: the sender's, within the window.
        (event(EventKind.EDITED, "alice", body=BODY, window_ms=10), MEMBERS, target(), None, None),
        (
            event(EventKind.EDITED, "alice", body=BODY, window_ms=5),
            MEMBERS,
            target(),
            "forbidden",
            None,
        ),
        # A direct conversation: owed to the recipients the event names.
        (
            event(EventKind.REACTION, conv="d:a:b", emoji="👍"),
            None,
            {**target(), "conversation": "d:a:b"},
            None,
            ("x",),
        ),
    ],
)
def test_judge_event(ev, group, doc, refused, to):
    refusal, owed = judge_event(ev, group, doc)
    assert (refusal.code if refusal else None) == refused
    if to is not None:
        assert owed == to
    elif ev.conversation.startswith("g:"):
        assert owed == sorted(m for m in (group or {}).get("members", ()) if m != ev.by)


SEALED_GROUP = {**MEMBERS, "e2e": True}
DM_TARGET = {**target(), "conversation": "d:a:b"}


@pytest.mark.parametrize(
    ("ev", "group", "doc", "e2e", "refused"),
    [
        # A group's mode is its document's own.
        (
            event(EventKind.EDITED, "alice", body=BODY),
            SEALED_GROUP,
            target(),
            False,
            "e2e_required",
        ),
        (
            event(EventKind.EDITED, "alice", body=BODY, e2e=True),
            SEALED_GROUP,
            target(),
            False,
            None,
        ),
        (event(EventKind.EDITED, "alice", body=BODY, e2e=True), MEMBERS, target(), True, "e2e_off"),
        # A direct conversation's is the caller's read (``e2e``).
        (
            event(EventKind.EDITED, "alice", "d:a:b", body=BODY),
            None,
            DM_TARGET,
            True,
            "e2e_required",
        ),
        (
            event(EventKind.EDITED, "alice", "d:a:b", body=BODY, e2e=True),
            None,
            DM_TARGET,
            True,
            None,
        ),
        (
            event(EventKind.EDITED, "alice", "d:a:b", body=BODY, e2e=True),
            None,
            DM_TARGET,
            False,
            "e2e_off",
        ),
        (event(EventKind.EDITED, "alice", "d:a:b", body=BODY), None, DM_TARGET, False, None),
        # Only edits are judged against the mode.
        (event(EventKind.REACTION, emoji="👍"), SEALED_GROUP, target(), False, None),
        (event(EventKind.DELETED, "alice"), SEALED_GROUP, target(), False, None),
        # An unknown message is not found, whatever the mode.
        (event(EventKind.EDITED, "alice", body=BODY), SEALED_GROUP, None, False, "not_found"),
    ],
)
def test_judge_event_holds_an_edit_to_the_mode(ev, group, doc, e2e, refused):
    refusal, _ = judge_event(ev, group, doc, e2e)
    assert (refusal.code if refusal else None) == refused


@pytest.mark.parametrize(
    ("field", "order", "after", "expected"),
    [
        ("undelivered", "seq", None, {"undelivered": "bob"}),
        (
            "undelivered",
            "seq",
            ("d:a:b", 7),
            {
                "undelivered": "bob",
                "conversation": {"$gte": "d:a:b"},
                "$nor": [{"conversation": "d:a:b", "seq": {"$lte": 7}}],
            },
        ),
        (
            "owed",
            "eseq",
            ("g:1", 2),
            {
                "owed": "bob",
                "conversation": {"$gte": "g:1"},
                "$nor": [{"conversation": "g:1", "eseq": {"$lte": 2}}],
            },
        ),
    ],
)
def test_owed_query(field, order, after, expected):
    assert owed_query(field, "bob", order, after) == expected


# -- end-to-end --------------------------------------------------------------------


EPOCH = {"user": "alice", "device": "d1", "shares": {"d2": "s2", "d3": "s3"}}


@pytest.mark.parametrize(
    ("doc", "user", "device", "shares", "expected"),
    [
        (EPOCH, "alice", "d1", {"d2": "s2"}, {}),  # all there: added already
        (EPOCH, "alice", "d1", {"d2": "s2", "d4": "s4"}, {"d4": "s4"}),
        (EPOCH, "alice", "d1", {"d2": "other"}, None),  # another share for d2
        (EPOCH, "alice", "d9", {"d4": "s4"}, None),  # another device's epoch
        (EPOCH, "bob", "d1", {"d4": "s4"}, None),
        ({"user": "alice", "device": "d1"}, "alice", "d1", {"d2": "s2"}, {"d2": "s2"}),
    ],
)
def test_new_shares(doc, user, device, shares, expected):
    assert new_shares(doc, user, device, shares) == expected


KEYS = {"sig_key": "S", "dh_key": "D", "self_sig": "X"}


@pytest.mark.parametrize(
    ("found", "same"),
    [
        ({**KEYS, "removed_ts": None}, True),
        (dict(KEYS), True),
        ({**KEYS, "removed_ts": 5}, False),
        ({**KEYS, "dh_key": "other", "removed_ts": None}, False),
        ({"sig_key": "S", "dh_key": "D", "removed_ts": None}, False),
    ],
)
def test_same_device(found, same):
    assert same_device(found, KEYS) is same


@pytest.mark.parametrize(
    ("taken", "limit", "slot"),
    [
        (set(), 3, 0),
        ({0, 1}, 3, 2),
        ({1, None}, 3, 0),
        ({0, 1, 2}, 3, None),
        (set(), 0, None),
        ({5}, 3, 0),
    ],
)
def test_free_slot(taken, limit, slot):
    assert free_slot(taken, limit) == slot
