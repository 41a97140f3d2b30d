"""SQLite rows <-> records and the decisions made on rows
(chatd.store.sqlite_rows): the rules as tables, no database."""

import pytest

from chatd.core.events import MembershipPlan
from chatd.core.model import (
    Conversation,
    Device,
    EventKind,
    GroupAction,
    NewMembership,
    Receipt,
    ReceiptKey,
    Sealed,
    Status,
    StoredEvent,
    StoredMessage,
    User,
)
from chatd.core.names import rid
from chatd.store.sqlite_rows import (
    DELETED,
    DISABLED,
    acks_by_status,
    epoch_upload,
    erased,
    known_device,
    marks,
    membership_detail,
    membership_event,
    to_conversation,
    to_event,
    to_message,
    to_receipts,
    to_summaries,
    to_user,
    user_counts,
    user_state,
    with_receipts,
)

D, S = Status.DELIVERED, Status.SEEN
BODY = Sealed("k1", b"n", b"ct")


@pytest.mark.parametrize(("n", "expected"), [(0, ""), (1, "?"), (3, "?,?,?")])
def test_marks(n, expected):
    assert marks(n) == expected


# -- users ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "disabled", "deleted"),
    [(0, False, False), (DISABLED, True, False), (DELETED, True, True)],
)
def test_a_user_row_and_its_state(state, disabled, deleted):
    u = to_user(("ann", "h", 1, 5, state))
    assert u == User("ann", "h", 1, 5, disabled, deleted)
    assert user_state(u) == state


@pytest.mark.parametrize(
    ("by_state", "expected"),
    [
        ({}, (0, 0, 0)),
        ({0: 3}, (3, 0, 0)),
        ({0: 3, DISABLED: 2}, (5, 2, 0)),
        ({0: 3, DISABLED: 2, DELETED: 1}, (6, 3, 1)),  # deleted counts as disabled
        ({DELETED: 4}, (4, 4, 4)),
    ],
)
def test_user_counts(by_state, expected):
    assert user_counts(by_state) == expected


# -- messages ------------------------------------------------------------------------

_SHORT = ("m1", "dm:a:b", 3, "a", 10, "k1", b"n", b"ct")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (_SHORT, StoredMessage("m1", "dm:a:b", 3, "a", 10, BODY)),
        # memoryview, as a BLOB may come back: bytes in the record
        (
            ("m1", "dm:a:b", 3, "a", 10, "k1", memoryview(b"n"), memoryview(b"ct")),
            StoredMessage("m1", "dm:a:b", 3, "a", 10, BODY),
        ),
        (
            (*_SHORT, "c1", "m0", 20, 2, 0),
            StoredMessage(
                "m1", "dm:a:b", 3, "a", 10, BODY, cid="c1", reply_to="m0", edited_ts=20, edits=2
            ),
        ),
        (
            (*_SHORT, "c1", None, None, 0, 1),
            StoredMessage("m1", "dm:a:b", 3, "a", 10, BODY, cid="c1", deleted=True),
        ),
    ],
)
def test_a_message_row(row, expected):
    assert to_message(row) == expected


def _msg(id_: str) -> StoredMessage:
    return StoredMessage(id_, "g:x", 1, "a", 1, BODY)


@pytest.mark.parametrize(
    ("receipt_rows", "reaction_rows", "expected"),
    [
        ([], [], {"m1": ((), (), ()), "m2": ((), (), ())}),
        (
            [("m1", "b", 5, None), ("m1", "c", 5, 6), ("m2", "d", None, None)],
            [],
            {"m1": (("b", "c"), ("c",), ()), "m2": ((), (), ())},
        ),
        (
            [],
            [("m2", "b", "👍"), ("m2", "c", "👍"), ("m2", "b", "🎉")],
            {"m1": ((), (), ()), "m2": ((), (), (("👍", ("b", "c")), ("🎉", ("b",))))},
        ),
    ],
)
def test_receipts_and_reactions_onto_messages(receipt_rows, reaction_rows, expected):
    out = with_receipts([_msg("m1"), _msg("m2")], receipt_rows, reaction_rows)
    assert [m.id for m in out] == ["m1", "m2"]  # the order given
    assert {m.id: (m.delivered_to, m.seen_by, m.reactions) for m in out} == expected


@pytest.mark.parametrize(
    ("receipt_row", "expected"),
    [
        # (member, sender, delivered_ts, seen_ts, d_acked, s_acked)
        (("b", "a", None, None, 0, 0), [("b", "m1")]),  # the message owed to b
        (("b", "a", 5, None, 0, 0), [("a", rid("m1", "b", D))]),
        (("b", "a", 5, None, 1, 0), []),
        (("b", "a", 5, 6, 0, 0), [("a", rid("m1", "b", D)), ("a", rid("m1", "b", S))]),
        (("b", "a", 5, 6, 1, 0), [("a", rid("m1", "b", S))]),
        (("b", "a", 5, 6, 1, 1), []),
    ],
)
def test_what_erasing_a_message_leaves_stale(receipt_row, expected):
    assert erased("m1", [receipt_row]) == expected


# -- receipts ------------------------------------------------------------------------


def test_acks_by_status():
    acks = [
        ("a", ReceiptKey("m1", "b", D)),
        ("a", ReceiptKey("m1", "b", S)),
        ("c", ReceiptKey("m2", "d", D)),
    ]
    assert acks_by_status(acks) == {D: [("m1", "b", "a"), ("m2", "d", "c")], S: [("m1", "b", "a")]}
    assert acks_by_status([]) == {}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        # (message_id, member, conversation, delivered_ts, seen_ts, d_acked, s_acked)
        (("m1", "b", "dm", 5, None, 0, 0), [Receipt("m1", "dm", "a", "b", D, 5)]),
        (("m1", "b", "dm", 5, 6, 1, 0), [Receipt("m1", "dm", "a", "b", S, 6)]),
        (
            ("m1", "b", "dm", 5, 6, 0, 0),
            [Receipt("m1", "dm", "a", "b", D, 5), Receipt("m1", "dm", "a", "b", S, 6)],
        ),
        (("m1", "b", "dm", 5, 6, 1, 1), []),
        (("m1", "b", "dm", None, None, 0, 0), []),
    ],
)
def test_receipts_owed_to_a_sender(row, expected):
    assert to_receipts("a", [row]) == expected


# -- events --------------------------------------------------------------------------

_EV = ("e1", "g:x", 4, "reaction", "m1", "b", 10, "👍", 1, None)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (_EV, StoredEvent("e1", "g:x", 4, EventKind.REACTION, "m1", "b", 10, "👍", True)),
        (
            (*_EV[:8], 0, None),
            StoredEvent("e1", "g:x", 4, EventKind.REACTION, "m1", "b", 10, "👍", False),
        ),
        # an edit with the message's body joined on: the body is the edit's
        (
            ("e1", "g:x", 4, "edited", "m1", "b", 10, None, 1, None, "k1", b"n", b"ct"),
            StoredEvent("e1", "g:x", 4, EventKind.EDITED, "m1", "b", 10, None, True, BODY),
        ),
        # an erased message (deleted since): no body
        (
            ("e1", "g:x", 4, "edited", "m1", "b", 10, None, 1, None, "", b"", b""),
            StoredEvent("e1", "g:x", 4, EventKind.EDITED, "m1", "b", 10, None, True),
        ),
        # only an edit carries a body
        (
            (*_EV, "k1", b"n", b"ct"),
            StoredEvent("e1", "g:x", 4, EventKind.REACTION, "m1", "b", 10, "👍", True),
        ),
    ],
)
def test_an_event_row(row, expected):
    assert to_event(row) == expected


@pytest.mark.parametrize(
    ("change", "plan", "users"),
    [
        (
            NewMembership("e1", "g:x", "a", 7, GroupAction.ADD, ("c",)),
            MembershipPlan(("c",), (), ("a", "b", "c"), ("a",), "t", ("a", "b", "c")),
            ("c",),
        ),
        (
            NewMembership("e1", "g:x", "b", 7, GroupAction.LEAVE),
            MembershipPlan((), ("b",), ("a",), ("a",), "t", ("a", "b")),
            ("b",),
        ),
        (  # neither added nor removed: the users named
            NewMembership("e1", "g:x", "a", 7, GroupAction.PROMOTE, ("b",)),
            MembershipPlan((), (), ("a", "b"), ("a", "b"), None, ("a", "b")),
            ("b",),
        ),
        (
            NewMembership("e1", "g:x", "a", 7, GroupAction.RENAME, (), "new"),
            MembershipPlan((), (), ("a", "b"), ("a",), "new", ("a", "b")),
            (),
        ),
    ],
)
def test_a_membership_event_and_its_detail_round_trip(change, plan, users):
    event = membership_event(change, plan, 9)
    assert event == StoredEvent(
        "e1",
        "g:x",
        9,
        EventKind.MEMBERS,
        "",
        change.by,
        7,
        action=change.action.value,
        users=users,
        members=plan.members,
        admins=plan.admins,
        title=plan.title,
    )
    row = ("e1", "g:x", 9, "members", "", change.by, 7, None, 1, membership_detail(event))
    assert to_event(row) == event


# -- conversations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member_rows", "members", "admins", "joined"),
    [
        ([], (), (), ()),
        ([("a", 0, 1), ("b", 0, 1)], ("a", "b"), (), ()),
        (
            [("a", 1, 1), ("b", 0, 4), ("c", 1, 2)],
            ("a", "b", "c"),
            ("a", "c"),
            (("b", 4), ("c", 2)),
        ),
    ],
)
def test_a_conversation_row(member_rows, members, admins, joined):
    row = ("g:x", "group", "t", 1, "a", 1)
    assert to_conversation(row, member_rows) == Conversation(
        "g:x", "group", members, "t", 1, "a", admins, joined, e2e=True
    )


def test_summaries_latest_first_with_their_members_unread_and_last_message():
    # (id, kind, title, last_seq, last_ts, created_ts, e2e)
    rows = [
        ("dm:a:b", "dm", None, 2, 50, 1, 0),
        ("g:old", "group", "old", 0, None, 40, 0),  # no message: its creation time
        ("g:new", "group", "new", 0, None, 60, 1),
        ("g:tie", "group", "tie", 1, 50, 2, 0),  # same time as the dm: by id
    ]
    member_rows = [
        ("dm:a:b", "a", 0, 1),
        ("g:new", "a", 1, 1),
        ("dm:a:b", "b", 0, 1),
        ("g:new", "b", 0, 3),
    ]
    last = {"dm:a:b": _msg("m9")}
    out = to_summaries(rows, {"dm:a:b": 2}, member_rows, last)
    assert [s.id for s in out] == ["g:new", "g:tie", "dm:a:b", "g:old"]
    by_id = {s.id: s for s in out}
    assert by_id["dm:a:b"].members == ("a", "b")
    assert by_id["dm:a:b"].unread == 2
    assert by_id["dm:a:b"].last_message == last["dm:a:b"]
    assert by_id["g:new"].admins == ("a",)
    assert by_id["g:new"].joined == (("b", 3),)
    assert by_id["g:new"].e2e
    assert by_id["g:old"].members == () and by_id["g:old"].unread == 0
    assert by_id["g:old"].last_message is None


# -- end-to-end devices and epochs ---------------------------------------------------

DEV = Device("a", "d1", "sig", "dh", "phone", "self", 1)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (("sig", "dh", "self", None), "same"),
        (("sig", "dh", "self", 5), "conflict"),  # removed: its id stays taken
        (("sig2", "dh", "self", None), "conflict"),
        (("sig", "dh2", "self", None), "conflict"),
        (("sig", "dh", "self2", None), "conflict"),
    ],
)
def test_uploading_a_known_device(row, expected):
    assert known_device(row, DEV) == expected


@pytest.mark.parametrize(
    ("row", "have", "shares", "expected"),
    [
        (None, {}, {"d1": "s1"}, "created"),
        (("a", "d1"), {"d1": "s1"}, {"d1": "s1", "d2": "s2"}, "added"),
        (("a", "d1"), {"d1": "s1"}, {"d1": "s1"}, "added"),  # a retry
        (("a", "d1"), {"d1": "s1"}, {"d1": "other"}, "conflict"),
        (("b", "d1"), {}, {"d1": "s1"}, "conflict"),  # another maker
        (("a", "d9"), {}, {"d1": "s1"}, "conflict"),  # another device of the maker
    ],
)
def test_uploading_an_epoch(row, have, shares, expected):
    assert epoch_upload(row, have, "a", "d1", shares) == expected
