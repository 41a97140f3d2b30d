"""One catalogue per fact (issue 13): the error codes, the client and server
frame types. Every other list derives from these; these tests keep the
catalogues themselves complete against the code and the docs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from chatd.core import errors, frames
from chatd.core.model import EventKind

PROTOCOL = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def test_every_error_class_is_in_the_catalogue_once():
    classes = {
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.ChatError) and c is not errors.ChatError
    }
    assert set(errors.CATALOGUE) == classes
    assert len(errors.ALL_CODES) == len(set(errors.ALL_CODES))
    # One code per HTTP status, so the status -> code map loses nothing.
    assert len(errors.HTTP_CODES) == len(errors.CATALOGUE)


def test_the_codes_are_the_documented_ones():
    table = PROTOCOL[PROTOCOL.index("## 4. Error codes") : PROTOCOL.index("## 5. Close codes")]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert tuple(documented) == errors.ALL_CODES


def test_client_frames_parse_to_their_records():
    samples = {
        "auth": {"token": "t"},
        "send": {"cid": "c", "to": "bob", "body": "hi"},
        "ack": {"ids": []},
        "seen": {"ids": ["01M8FXEEZWXF56X4BQVYBE2HNS"]},
        "typing": {"conversation": "dm:a:b"},
        "ping": {},
        "react": {"cid": "c", "id": "m", "emoji": "👍"},
        "edit": {"cid": "c", "id": "m", "body": "x"},
        "delete": {"cid": "c", "id": "m"},
    }
    assert set(samples) == set(frames.CLIENT_TYPES)
    for kind, fields in samples.items():
        parsed = frames.parse_client_frame(frames.encode({"type": kind, **fields}).decode())
        assert frames.TYPE_OF[type(parsed)] == kind


def test_every_server_frame_type_is_built_and_documented():
    built = {
        frames.ready("u", "n")["type"],
        frames.devices("u")["type"],
        frames.sent("c", "i", "dm:a:b", 1, 1)["type"],
        frames.message("i", "dm:a:b", 1, "a", "x", 1)["type"],
        frames.applied("c", "reaction", "e", "dm:a:b", "i", 1, 1)["type"],
        frames.members("e", "g:x", 1, "a", 1, "add", [], [], [], None)["type"],
        frames.receipt("r", "i", "dm:a:b", "seen", "b", 1)["type"],
        frames.typing("dm:a:b", "a")["type"],
        frames.presence("a", True, None)["type"],
        frames.pong()["type"],
        frames.error("bad_request", "m")["type"],
    } | {
        frames.event(k.value, "e", "dm:a:b", 1, "i", "a", 1)["type"]
        for k in EventKind
        if k is not EventKind.MEMBERS
    }
    assert built == set(frames.SERVER_TYPES)
    for kind in frames.SERVER_TYPES + frames.CLIENT_TYPES:
        assert f"`{kind}`" in PROTOCOL, kind
