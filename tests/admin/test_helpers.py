"""chatctl's pieces on their own, without a deployment: the password rule it
shares with the service, how a command prints (``--json`` or text), and
the text helpers."""

from __future__ import annotations

import json

import pytest

from admin import text
from admin.cli import Ctx, show
from chatd.auth import MAX_PASSWORD, MIN_PASSWORD, check_password
from chatd.core.errors import BadRequest


@pytest.mark.parametrize("length", [MIN_PASSWORD, MAX_PASSWORD])
def test_a_password_within_the_bounds_passes(length):
    assert check_password("p" * length) == "p" * length


@pytest.mark.parametrize("password", ["p" * (MIN_PASSWORD - 1), "p" * (MAX_PASSWORD + 1), None, 8])
def test_a_password_outside_the_rule_is_a_bad_request(password):
    with pytest.raises(BadRequest, match=f"password must be {MIN_PASSWORD}-{MAX_PASSWORD}"):
        check_password(password)


def test_show_prints_json_or_text(capsys):
    data = {"user": "alice", "purged": 2}
    show(Ctx(flags={}, json=True), data, text.purged)
    assert json.loads(capsys.readouterr().out) == data
    show(Ctx(flags={}, json=True), (data, "ignored"), text.purged, as_json=lambda d: d[0])
    assert json.loads(capsys.readouterr().out) == data
    show(Ctx(flags={}), data, text.purged)
    assert capsys.readouterr().out == "purged 2 entries from the queue of alice\n"


def test_plural_age_and_body():
    assert [text.plural(n, "entry") for n in (0, 1, 2)] == ["0 entries", "1 entry", "2 entries"]
    assert text.plural(3, "message") == "3 messages"
    now = 10 * 86400 * 1000
    assert [text.age(now - s * 1000, now) for s in (4, 180, 7200, 5 * 86400)] == [
        "4s",
        "3m",
        "2h",
        "5d",
    ]
    assert text.age(None) == "-" and text.age(now + 5000, now) == "0s"
    assert text.body({"body": "hi"}, "-") == "hi"
    assert text.body({"body": None, "error": "no key 'k1'"}, "-") == "no key 'k1'"
    assert text.body({}, "-") == "-"
