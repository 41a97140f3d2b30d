"""The server's end-to-end rules that both stores apply, table-driven: the
epoch upload rule (write-once shares, one sending device per epoch) and an
edit's fit with its conversation's mode."""

from __future__ import annotations

import pytest

from chatd.core.e2e import (
    E2E_OFF,
    E2E_REQUIRED,
    REFUSED,
    EpochUpload,
    edit_mismatch,
    judge_epoch_upload,
)
from chatd.core.events import Target, judge
from chatd.core.model import EventKind
from chatd.store.mongo_plan import new_shares
from chatd.store.sqlite_rows import epoch_upload

ALICE_PHONE = ("alice", "phone")

#: (maker, have, user, device, shares) -> what the upload does.
UPLOADS = [
    # A new epoch: made by the uploading device, with what it brings.
    (None, {}, "alice", "phone", {"d2": "s2"}, EpochUpload("created", {"d2": "s2"})),
    (None, {}, "alice", "phone", {}, EpochUpload("created", {})),  # nobody else to read it yet
    # More shares into the device's own epoch: only the new ones are written.
    (ALICE_PHONE, {"d2": "s2"}, "alice", "phone", {"d3": "s3"}, EpochUpload("added", {"d3": "s3"})),
    (
        ALICE_PHONE,
        {"d2": "s2"},
        "alice",
        "phone",
        {"d2": "s2", "d3": "s3"},
        EpochUpload("added", {"d3": "s3"}),
    ),
    # A chunk sent again unchanged (a retry): fine, nothing to write.
    (ALICE_PHONE, {"d2": "s2"}, "alice", "phone", {"d2": "s2"}, EpochUpload("added", {})),
    (ALICE_PHONE, {"d2": "s2"}, "alice", "phone", {}, EpochUpload("added", {})),
    # Write-once: another share for a device that has one.
    (ALICE_PHONE, {"d2": "s2"}, "alice", "phone", {"d2": "other"}, EpochUpload("conflict", {})),
    (
        ALICE_PHONE,
        {"d2": "s2"},
        "alice",
        "phone",
        {"d3": "s3", "d2": "other"},
        EpochUpload("conflict", {}),
    ),
    # One sending device per epoch: another device of the maker, another user.
    (ALICE_PHONE, {}, "alice", "laptop", {"d2": "s2"}, EpochUpload("conflict", {})),
    (ALICE_PHONE, {}, "bob", "phone", {"d2": "s2"}, EpochUpload("conflict", {})),
    (ALICE_PHONE, {"d2": "s2"}, "bob", "laptop", {"d2": "s2"}, EpochUpload("conflict", {})),
]


@pytest.mark.parametrize(("maker", "have", "user", "device", "shares", "expected"), UPLOADS)
def test_epoch_upload_rule(maker, have, user, device, shares, expected):
    assert judge_epoch_upload(maker, have, user, device, shares) == expected


@pytest.mark.parametrize(("maker", "have", "user", "device", "shares", "expected"), UPLOADS)
def test_both_stores_read_their_epoch_into_the_one_rule(
    maker, have, user, device, shares, expected
):
    """SQLite's row and MongoDB's document go into the same rule: the same
    answer for the same epoch."""
    row = None if maker is None else list(maker)
    assert epoch_upload(row, have, user, device, shares) == expected.outcome
    if maker is not None:  # MongoDB inserts a new epoch whole (no document to read)
        doc = {"user": maker[0], "device": maker[1], "shares": dict(have)}
        got = new_shares(doc, user, device, shares)
        assert got == (None if expected.outcome == "conflict" else expected.new)


@pytest.mark.parametrize(
    ("sealed", "e2e", "expected"),
    [
        (False, False, None),
        (True, True, None),
        (False, True, E2E_REQUIRED),  # a plain edit in an end-to-end conversation
        (True, False, E2E_OFF),  # only a send switches a conversation
    ],
)
def test_an_edit_fits_its_conversations_mode(sealed, e2e, expected):
    assert edit_mismatch(sealed=sealed, e2e=e2e) == expected


def _target(e2e: bool, *, sender: str = "alice", deleted: bool = False) -> Target:
    return Target("d:a:b", sender, 90, deleted, 1, e2e)


@pytest.mark.parametrize(
    ("kind", "by", "target", "sealed", "code"),
    [
        (EventKind.EDITED, "alice", _target(True), False, E2E_REQUIRED),
        (EventKind.EDITED, "alice", _target(False), True, E2E_OFF),
        (EventKind.EDITED, "alice", _target(True), True, None),
        (EventKind.EDITED, "alice", _target(False), False, None),
        # The mode is judged after "no such message" and before who may edit
        # (the service's order: it checks the content before the store the rest).
        (EventKind.EDITED, "alice", _target(True, deleted=True), False, "not_found"),
        (EventKind.EDITED, "bob", _target(True), False, E2E_REQUIRED),
        (EventKind.EDITED, "bob", _target(True), True, "forbidden"),
        # Reactions and deletions carry no content: no mode to fit.
        (EventKind.REACTION, "bob", _target(True), False, None),
        (EventKind.DELETED, "alice", _target(True), False, None),
    ],
)
def test_the_event_rule_holds_an_edit_to_the_mode(kind, by, target, sealed, code):
    refusal = judge(kind, by, "d:a:b", target, 100, window_ms=1000, sealed=sealed)
    assert (refusal.code if refusal else None) == code
    if refusal is not None and code in REFUSED:
        assert refusal.reason == REFUSED[code]
