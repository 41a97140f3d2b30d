"""Receipt transitions, rids, targets and backlog order: the rules as tables."""

import pytest

from chatd.core.delivery import (
    RECEIPT_TRANSITIONS,
    ReceiptState,
    apply_mark,
    recipients,
    settled_rids,
    target_of,
)
from chatd.core.errors import BadRequest, Forbidden
from chatd.core.frames import Send
from chatd.core.model import ReceiptKey, Status
from chatd.core.names import parse_rid, rid

D, S = Status.DELIVERED, Status.SEEN


@pytest.mark.parametrize(
    ("delivered", "seen", "status", "expected"),
    [
        (None, None, D, (100, None, (D,))),
        (None, None, S, (100, 100, (D, S))),
        (50, None, D, (50, None, ())),
        (50, None, S, (50, 100, (S,))),
        (50, 60, D, (50, 60, ())),
        (50, 60, S, (50, 60, ())),
    ],
)
def test_apply_mark(delivered, seen, status, expected):
    assert apply_mark(delivered, seen, status, 100) == expected


def test_transition_table_is_total_and_monotonic():
    order = [ReceiptState.NEW, ReceiptState.DELIVERED, ReceiptState.SEEN]
    for state in order:
        for status in Status:
            nxt, _ = RECEIPT_TRANSITIONS[(state, status)]
            assert order.index(nxt) >= order.index(state)


def test_rid_roundtrip_and_supersession():
    r = rid("01ABC", "bob.x", S)
    assert r == "01ABC:bob.x:seen"
    assert parse_rid(r) == ReceiptKey("01ABC", "bob.x", S)
    assert settled_rids(parse_rid(r)) == ["01ABC:bob.x:seen", "01ABC:bob.x:delivered"]
    assert settled_rids(ReceiptKey("01ABC", "bob", D)) == ["01ABC:bob:delivered"]


@pytest.mark.parametrize("bad", ["", "x", "a:b", "a:bob:read", ":bob:seen", "a:B!:seen", "a:b:c:d"])
def test_bad_rids(bad):
    with pytest.raises(BadRequest):
        parse_rid(bad)


@pytest.mark.parametrize(
    ("frame", "sender", "conversation", "peer"),
    [
        (Send("c", "x", to="Bob"), "alice", "dm:alice:bob", "bob"),
        (Send("c", "x", to="alice"), "bob", "dm:alice:bob", "alice"),
        (Send("c", "x", conversation="dm:alice:bob"), "bob", "dm:alice:bob", "alice"),
        (Send("c", "x", conversation="g:01XYZ"), "bob", "g:01XYZ", None),
    ],
)
def test_target_of(frame, sender, conversation, peer):
    t = target_of(frame, sender)
    assert (t.conversation, t.peer) == (conversation, peer)


@pytest.mark.parametrize(
    ("frame", "sender", "error"),
    [
        (Send("c", "x", to="alice"), "alice", BadRequest),
        (Send("c", "x", to="no way"), "alice", BadRequest),
        (Send("c", "x", conversation="dm:bob:carol"), "alice", Forbidden),
        (Send("c", "x", conversation="dm:carol:bob"), "bob", BadRequest),
        (Send("c", "x", conversation="nonsense"), "bob", BadRequest),
    ],
)
def test_target_errors_carry_the_cid(frame, sender, error):
    with pytest.raises(error) as info:
        target_of(frame, sender)
    assert info.value.cid == "c"


def test_recipients_are_the_members_but_the_sender():
    assert recipients(("alice", "bob", "carol"), "bob") == ("alice", "carol")
