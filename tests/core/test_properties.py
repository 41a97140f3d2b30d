"""Property-based tests of the sans-I/O core (hypothesis): the frame parser,
the session, the receipt table, and the store's receipts under any
interleaving of reports.

The example budget is fixed for CI (profile ``ci``); ``make fuzz`` runs the
``long`` profile (HYPOTHESIS_PROFILE=long) for a deeper search.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.core import frames
from chatd.core.delivery import RECEIPT_TRANSITIONS, apply_mark, receipt_state
from chatd.core.errors import ChatError
from chatd.core.model import Mark, NewMessage, Sealed, Status, User
from chatd.core.session import Outbound, Phase, Session, SlowConsumer

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FRAME_TYPES = ["auth", "send", "ack", "seen", "typing", "ping", "nope", "", None, 7]
FIELDS = ["token", "cid", "body", "to", "conversation", "ids", "receipts", "x"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

#: Frames that look almost right: known types and field names, any values.
near_valid = st.fixed_dictionaries(
    {"type": st.sampled_from(FRAME_TYPES)},
    optional={
        name: st.one_of(
            json_values,
            st.text(alphabet="abc-_.:0123456789", min_size=1, max_size=70),
            st.lists(
                st.text(alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZ:.dsv", max_size=40), max_size=5
            ),
        )
        for name in FIELDS
    },
)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_bytes_parse_or_are_refused_with_a_chat_error(raw):
    try:
        frame = frames.parse_client_frame(raw)
    except ChatError as exc:
        assert exc.code in ("bad_request", "too_large", "unauthorized")
    else:
        assert isinstance(frame, frames.ClientFrame)


@given(near_valid)
def test_near_valid_frames_parse_or_are_refused_with_a_chat_error(doc):
    raw = json.dumps(doc)
    try:
        frame = frames.parse_client_frame(raw)
    except ChatError as exc:
        assert exc.code in ("bad_request", "too_large", "unauthorized")
        if doc.get("type") == "send" and isinstance(doc.get("cid"), str) and exc.cid:
            assert exc.cid == doc["cid"]  # the error names the send it refuses
    else:
        assert isinstance(frame, frames.ClientFrame)
        if isinstance(frame, frames.Send):
            assert frame.body.strip() and len(frame.body) <= frames.MAX_BODY_CHARS
            assert (frame.to is None) != (frame.conversation is None)


# -- the session -------------------------------------------------------------------------

session_steps = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.sampled_from(["m1", "m2", "m3", "r1", None])),
        st.tuples(st.just("settle"), st.sampled_from(["m1", "m2", "m3", "r1"])),
        st.tuples(st.just("finish"), st.none()),
        st.tuples(st.just("backlog"), st.lists(st.sampled_from(["m1", "m2", "r1"]), max_size=3)),
    ),
    max_size=40,
)


@given(session_steps)
def test_a_session_never_sends_an_owed_item_twice_until_it_is_settled(steps):
    session = Session(rate=0)
    session.authenticated("alice")
    outstanding: set[str] = set()  # sent to the device, not acked yet
    for kind, arg in steps:
        out: list[Outbound] = []
        try:
            if kind == "offer":
                out = session.offer(Outbound(b"{}", arg, (0, "", 0)))
            elif kind == "settle":
                session.settled([arg])
                outstanding.discard(arg)
            elif kind == "finish" and session.phase is Phase.BACKLOG:
                out = session.finish_backlog()
            elif kind == "backlog" and session.phase is Phase.BACKLOG:
                out = session.backlog([Outbound(b"{}", k, (0, "", 0)) for k in arg])
        except SlowConsumer:
            return
        for item in out:
            if item.key is not None:
                assert item.key not in outstanding, (item.key, steps)
                outstanding.add(item.key)


# -- the receipt table -------------------------------------------------------------------

reports = st.lists(
    st.tuples(st.sampled_from([Status.DELIVERED, Status.SEEN]), st.integers(1, 10**6))
)


@given(reports)
def test_receipts_seen_implies_delivered_and_one_receipt_per_status(marks):
    delivered = seen = None
    made: list[Status] = []
    for status, ts in marks:
        before = receipt_state(delivered, seen)
        delivered, seen, produced = apply_mark(delivered, seen, status, ts)
        made += produced
        assert RECEIPT_TRANSITIONS[(before, status)][1] == produced
        if seen is not None:
            assert delivered is not None  # seen implies delivered
    assert made.count(Status.DELIVERED) <= 1 and made.count(Status.SEEN) <= 1
    assert (Status.SEEN in made) == any(s is Status.SEEN for s, _ in marks)
    assert bool(made) == bool(marks)


# -- the store's receipts under interleaved reports ---------------------------------------

store_marks = st.lists(
    st.tuples(
        st.sampled_from(["bob", "carol", "alice", "mallory"]),
        st.integers(0, 2),  # which message
        st.sampled_from([Status.DELIVERED, Status.SEEN]),
    ),
    min_size=1,
    max_size=25,
)


# A store per example costs milliseconds: a quarter of the profile's budget.
@settings(max_examples=max(40, settings.default.max_examples // 4))
@given(store_marks, st.integers(1, 5))
def test_the_store_reports_each_receipt_once_whatever_the_interleaving(marks, batch):
    """SQLite, in batches of any size: every (message, member) pair moves
    only forward, a member who reports seen first gets both receipts, no
    receipt is reported twice, and outsiders or the sender change nothing."""
    from chatd.store.sqlite import SqliteStore

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore.open(Path(tmp))
            try:
                for name in ("alice", "bob", "carol", "mallory"):
                    await store.create_user(User(name, "x", 1))
                group = await store.create_group("g:t", None, ["alice", "bob", "carol"], 1)
                sealed = Sealed("k1", b"n" * 12, b"c")
                appended = await store.append(
                    [
                        NewMessage(f"m{i}", group.id, "alice", f"c{i}", 2, sealed, ("bob", "carol"))
                        for i in range(3)
                    ]
                )
                ids = [a.id for a in appended]
                reported: list[tuple[str, str, Status]] = []
                pending = [
                    Mark(user, ids[i], status, 10 + n) for n, (user, i, status) in enumerate(marks)
                ]
                for start in range(0, len(pending), batch):
                    chunk = pending[start : start + batch]
                    for mark, result in zip(chunk, await store.mark(chunk), strict=True):
                        outsider = mark.user == "mallory"
                        assert result.known == (not outsider)
                        if outsider or mark.user == "alice":
                            assert not result.transitions
                        for receipt in result.transitions:
                            reported.append((receipt.message_id, receipt.member, receipt.status))
                assert len(reported) == len(set(reported))  # never twice
                stored = {m.id: m for m in await store.get_messages(ids)}
                for message_id, member, status in reported:
                    if status is Status.SEEN:
                        assert (message_id, member, Status.DELIVERED) in reported
                        assert member in stored[message_id].seen_by
                    assert member in stored[message_id].delivered_to
                for user, i, status in marks:
                    if user in ("bob", "carol"):
                        assert user in stored[ids[i]].delivered_to
                        if status is Status.SEEN:
                            assert user in stored[ids[i]].seen_by
            finally:
                await store.aclose()

    trio.run(main)
