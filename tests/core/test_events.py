"""Replies, reactions, edits, deletions: the frames and the rule every store
applies (chatd.core.events.judge), table-driven."""

import json

import pytest

from chatd.core.errors import BadRequest, TooLarge
from chatd.core.events import MAX_REACTIONS_PER_USER, Target, is_emoji, judge
from chatd.core.frames import Ack, Delete, Edit, React, Send, parse_client_frame
from chatd.core.model import EventKind


def j(obj) -> str:
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"type": "send", "cid": "c", "to": "bob", "body": "hi", "reply_to": "01A"},
            Send("c", "hi", to="bob", reply_to="01A"),
        ),
        (
            {"type": "send", "cid": "c", "to": "bob", "body": "hi", "reply_to": None},
            Send("c", "hi", to="bob"),
        ),
        ({"type": "react", "cid": "c", "id": "01A", "emoji": "👍"}, React("c", "01A", "👍", True)),
        (
            {"type": "react", "cid": "c", "id": "01A", "emoji": "👍", "on": False},
            React("c", "01A", "👍", False),
        ),
        ({"type": "edit", "cid": "c", "id": "01A", "body": "fixed"}, Edit("c", "01A", "fixed")),
        ({"type": "delete", "cid": "c", "id": "01A"}, Delete("c", "01A")),
        ({"type": "ack", "events": ["e1", "e2", "e1"]}, Ack(events=("e1", "e2"))),
    ],
)
def test_parse(raw, expected):
    assert parse_client_frame(j(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "error", "cid"),
    [
        ({"type": "react", "id": "01A", "emoji": "👍"}, BadRequest, None),
        ({"type": "react", "cid": "c", "emoji": "👍"}, BadRequest, "c"),
        ({"type": "react", "cid": "c", "id": "x" * 129, "emoji": "👍"}, BadRequest, "c"),
        ({"type": "react", "cid": "c", "id": "01A", "emoji": "ok"}, BadRequest, "c"),
        ({"type": "react", "cid": "c", "id": "01A", "emoji": "👍", "on": "yes"}, BadRequest, "c"),
        ({"type": "edit", "cid": "c", "id": "01A", "body": "  "}, BadRequest, "c"),
        ({"type": "edit", "cid": "c", "id": "01A", "body": "x" * 4001}, TooLarge, "c"),
        ({"type": "edit", "cid": "c", "id": "01A"}, BadRequest, "c"),
        ({"type": "delete", "cid": "c", "id": 7}, BadRequest, "c"),
        ({"type": "send", "cid": "c", "to": "bob", "body": "hi", "reply_to": 5}, BadRequest, "c"),
        ({"type": "ack", "events": "e1"}, BadRequest, None),
        ({"type": "ack", "events": ["e"] * 1001}, TooLarge, None),
    ],
)
def test_refused(raw, error, cid):
    with pytest.raises(error) as info:
        parse_client_frame(j(raw))
    assert info.value.cid == cid


@pytest.mark.parametrize(
    "text",
    ["👍", "❤️", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "1️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "✅"],
)
def test_emoji_accepted(text):
    assert is_emoji(text)


@pytest.mark.parametrize(
    "text", ["", "a", "ok", "1", " 👍", "👍 ", "👍a", "\u200d", "🏽", "👍" * 17, "<b>"]
)
def test_emoji_refused(text):
    assert not is_emoji(text)


MSG = Target(conversation="dm:a:b", sender="alice", ts=1_000, deleted=False)


@pytest.mark.parametrize(
    ("kind", "by", "target", "kw", "code"),
    [
        (EventKind.REACTION, "bob", MSG, {}, None),
        (EventKind.REACTION, "bob", None, {}, "not_found"),
        (EventKind.REACTION, "bob", Target("dm:a:c", "alice", 1_000, False), {}, "not_found"),
        (EventKind.REACTION, "bob", Target("dm:a:b", "alice", 1_000, True), {}, "not_found"),
        (
            EventKind.REACTION,
            "bob",
            MSG,
            {"reactions_by_user": MAX_REACTIONS_PER_USER},
            "bad_request",
        ),
        (
            EventKind.REACTION,
            "bob",
            MSG,
            {"reactions_by_user": MAX_REACTIONS_PER_USER, "reacted_already": True},
            None,
        ),
        (
            EventKind.REACTION,
            "bob",
            MSG,
            {"reactions_by_user": MAX_REACTIONS_PER_USER, "on": False},
            None,
        ),
        (EventKind.EDITED, "alice", MSG, {"window_ms": 500}, None),
        (EventKind.EDITED, "alice", MSG, {"window_ms": 499}, "forbidden"),
        (EventKind.EDITED, "bob", MSG, {}, "forbidden"),
        (EventKind.EDITED, "bob", MSG, {"moderator": True}, "forbidden"),
        (EventKind.DELETED, "alice", MSG, {}, None),
        (EventKind.DELETED, "bob", MSG, {}, "forbidden"),
        (EventKind.DELETED, "bob", MSG, {"moderator": True}, None),
        (EventKind.DELETED, "alice", Target("dm:a:b", "alice", 1_000, True), {}, "not_found"),
    ],
)
def test_judge(kind, by, target, kw, code):
    refusal = judge(kind, by, "dm:a:b", target, 1_500, **kw)
    assert (refusal.code if refusal else None) == code
