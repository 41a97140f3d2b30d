"""Frame parsing: every malformed input class gets its defined error."""

import json

import pytest

from chatd.core import frames
from chatd.core.errors import BadRequest, TooLarge, Unauthorized
from chatd.core.frames import Ack, Auth, Ping, Seen, Send, Typing, parse_client_frame
from chatd.core.model import ReceiptKey, Status


def j(obj) -> str:
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (j({"type": "auth", "token": "t"}), Auth("t")),
        (j({"type": "send", "cid": "c1", "to": "bob", "body": "hi"}), Send("c1", "hi", to="bob")),
        (
            j({"type": "send", "cid": "c1", "conversation": "g:1", "body": "hi"}),
            Send("c1", "hi", conversation="g:1"),
        ),
        (j({"type": "ack", "ids": ["a", "b", "a"]}), Ack(ids=("a", "b"))),
        (
            j({"type": "ack", "receipts": ["01A:bob:seen"]}),
            Ack(
                receipts=("01A:bob:seen",),
                keys=(ReceiptKey("01A", "bob", Status.SEEN),),
            ),
        ),
        (j({"type": "ack"}), Ack()),
        (j({"type": "seen", "ids": ["a"]}), Seen(("a",))),
        (j({"type": "typing", "conversation": "dm:a:b"}), Typing("dm:a:b")),
        (j({"type": "ping"}), Ping()),
        # Unknown extra fields are ignored (forward compatibility).
        (j({"type": "ping", "extra": 1}), Ping()),
    ],
)
def test_valid_frames(raw, expected):
    assert parse_client_frame(raw) == expected


@pytest.mark.parametrize(
    ("raw", "error", "cid"),
    [
        ("not json", BadRequest, None),
        ("[1, 2]", BadRequest, None),
        ('"auth"', BadRequest, None),
        (j({"token": "x"}), BadRequest, None),
        (j({"type": 5}), BadRequest, None),
        (j({"type": "shout"}), BadRequest, None),
        # An auth frame without a usable token is a bad token: unauthorized.
        (j({"type": "auth"}), Unauthorized, None),
        (j({"type": "auth", "token": ""}), Unauthorized, None),
        (j({"type": "auth", "token": 12}), Unauthorized, None),
        (j({"type": "ack", "ids": ["a"], "receipts": ["not-a-rid"]}), BadRequest, None),
        (j({"type": "send", "to": "bob", "body": "hi"}), BadRequest, None),
        (j({"type": "send", "cid": "", "to": "bob", "body": "hi"}), BadRequest, None),
        (j({"type": "send", "cid": "x" * 65, "to": "bob", "body": "hi"}), BadRequest, None),
        (j({"type": "send", "cid": "a\nb", "to": "bob", "body": "hi"}), BadRequest, None),
        (j({"type": "send", "cid": "c", "body": "hi"}), BadRequest, "c"),
        (
            j({"type": "send", "cid": "c", "to": "b", "conversation": "g:1", "body": "x"}),
            BadRequest,
            "c",
        ),
        (j({"type": "send", "cid": "c", "to": "bob"}), BadRequest, "c"),
        (j({"type": "send", "cid": "c", "to": "bob", "body": 5}), BadRequest, "c"),
        (j({"type": "send", "cid": "c", "to": "bob", "body": "   "}), BadRequest, "c"),
        (j({"type": "send", "cid": "c", "to": 7, "body": "x"}), BadRequest, "c"),
        (j({"type": "send", "cid": "c", "to": "bob", "body": "x" * 4001}), TooLarge, "c"),
        (j({"type": "ack", "ids": "a"}), BadRequest, None),
        (j({"type": "ack", "ids": [1]}), BadRequest, None),
        (j({"type": "ack", "ids": [""]}), BadRequest, None),
        (j({"type": "ack", "ids": ["x"] * 1001}), TooLarge, None),
        (j({"type": "seen"}), BadRequest, None),
        (j({"type": "typing"}), BadRequest, None),
        (b'{"type":"ping"}', BadRequest, None),
    ],
)
def test_invalid_frames(raw, error, cid):
    with pytest.raises(error) as info:
        parse_client_frame(raw)
    assert info.value.cid == cid
    assert info.value.message


def test_body_of_exactly_4000_chars_is_fine():
    frame = parse_client_frame(j({"type": "send", "cid": "c", "to": "bob", "body": "é" * 4000}))
    assert isinstance(frame, Send) and len(frame.body) == 4000


def test_frame_limit_counts_utf8_bytes():
    # 20,000 three-byte characters: 60 KB of UTF-8, under 64 KiB: parsed.
    under = json.dumps({"type": "typing", "conversation": "€" * 20000}, ensure_ascii=False)
    assert len(under.encode()) < 64 * 1024 < len(under) * 4
    assert frames.frame_size(under) == len(under.encode())
    assert parse_client_frame(under) == Typing("€" * 20000)
    over = json.dumps({"type": "typing", "conversation": "€" * 22000}, ensure_ascii=False)
    assert len(over) < 64 * 1024 < len(over.encode())
    with pytest.raises(TooLarge):
        parse_client_frame(over)


def test_oversize_marker_is_too_large():
    with pytest.raises(TooLarge):
        parse_client_frame(frames.OVERSIZE)


def test_deeply_nested_json_is_a_bad_request():
    nested = "[" * 30000 + "]" * 30000  # 60 KB: under the size limit, too deep to parse
    with pytest.raises(BadRequest):
        parse_client_frame(nested)


def test_server_frames_have_the_contract_fields():
    assert frames.sent("c", "i", "dm:a:b", 3, 9) == {
        "type": "sent",
        "cid": "c",
        "id": "i",
        "conversation": "dm:a:b",
        "seq": 3,
        "ts": 9,
    }
    assert set(frames.message("i", "c", 1, "a", "b", 2)) == {
        "type",
        "id",
        "conversation",
        "seq",
        "from",
        "body",
        "ts",
    }
    assert set(frames.receipt("r", "i", "c", "seen", "b", 2)) == {
        "type",
        "rid",
        "id",
        "conversation",
        "status",
        "by",
        "ts",
    }
    assert frames.error("forbidden", "no") == {
        "type": "error",
        "code": "forbidden",
        "message": "no",
    }
    assert frames.error("too_large", "x", "c1")["cid"] == "c1"
