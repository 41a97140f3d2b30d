"""The Store port's contract, as a test suite any implementation runs unchanged.

Use it by subclassing in a test module and providing a ``store`` fixture
that yields a fresh, empty store::

    class TestSqliteStore(StoreContract):
        @pytest.fixture
        async def store(self, tmp_path):
            s = SqliteStore.open(tmp_path)
            yield s
            await s.aclose()

Each test states one guarantee from :class:`chatd.ports.Store`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, TypeVar

import pytest
import trio

from chatd.core.errors import Conflict, NotFound
from chatd.core.events import MAX_REACTIONS_PER_USER
from chatd.core.ids import UlidFactory
from chatd.core.model import (
    Device,
    EventKind,
    GroupAction,
    Mark,
    NewEvent,
    NewMembership,
    NewMessage,
    ReceiptKey,
    Sealed,
    Status,
    Transition,
    User,
)
from chatd.ports import Reseal, Store, Writes

_ids = UlidFactory()
T = TypeVar("T")


def present(value: T | None) -> T:
    """``value``, which the contract says is there (a test failure if not)."""
    if value is None:
        raise AssertionError("expected a value, got None")
    return value


def sealed(tag: str = "x", key_id: str = "k1") -> Sealed:
    return Sealed(key_id=key_id, nonce=os.urandom(12), ciphertext=f"ct-{tag}".encode())


def new_message(
    conversation: str,
    sender: str,
    recipients: tuple[str, ...],
    cid: str | None = None,
    ts: int = 1,
    key_id: str = "k1",
) -> NewMessage:
    mid = _ids.new()
    return NewMessage(mid, conversation, sender, cid or mid, ts, sealed(mid, key_id), recipients)


def new_event(
    conversation: str,
    kind: EventKind,
    message_id: str,
    by: str,
    recipients: tuple[str, ...],
    cid: str | None = None,
    ts: int = 10,
    **fields: Any,
) -> NewEvent:
    eid = _ids.new()
    if kind is EventKind.EDITED and "body" not in fields:
        fields["body"] = sealed("edit-" + eid)
    return NewEvent(eid, conversation, kind, message_id, by, cid or eid, ts, recipients, **fields)


async def one_event(store: Store, ev: NewEvent) -> Any:
    [result] = (await store.write(Writes(events=[ev]))).events
    return result


async def users(store: Store, *names: str) -> None:
    for n in names:
        await store.create_user(User(n, "hash-" + n, 1))


class StoreContract:
    @pytest.fixture
    async def store(self) -> Store:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    # -- users -------------------------------------------------------------------

    async def test_create_and_get_user(self, store: Store) -> None:
        await store.create_user(User("alice", "h1", 10))
        got = await store.get_user("alice")
        assert got is not None
        assert (got.username, got.password_hash, got.created_ts, got.disabled) == (
            "alice",
            "h1",
            10,
            False,
        )
        assert await store.get_user("nobody") is None

    async def test_username_taken_is_conflict(self, store: Store) -> None:
        await store.create_user(User("alice", "h1", 10))
        with pytest.raises(Conflict):
            await store.create_user(User("alice", "h2", 11))
        got = await store.get_user("alice")
        assert got is not None and got.password_hash == "h1"

    async def test_last_seen_only_moves_forward(self, store: Store) -> None:
        await users(store, "alice")
        await store.set_last_seen("alice", 500)
        await store.set_last_seen("alice", 300)
        got = await store.get_user("alice")
        assert got is not None and got.last_seen == 500

    # -- conversations -----------------------------------------------------------

    async def test_ensure_dm_is_idempotent_and_deterministic(self, store: Store) -> None:
        await users(store, "alice", "bob")
        c1 = await store.ensure_dm("bob", "alice", 5)
        c2 = await store.ensure_dm("alice", "bob", 6)
        assert c1.id == c2.id == "dm:alice:bob"
        assert c1.members == ("alice", "bob") and c1.kind == "dm"

    async def test_concurrent_ensure_dm_makes_one(self, store: Store) -> None:
        await users(store, "alice", "bob")
        out = []

        async def one() -> None:
            out.append(await store.ensure_dm("alice", "bob", 5))

        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(one)
        assert {c.id for c in out} == {"dm:alice:bob"}
        conv = await store.get_conversation("dm:alice:bob")
        assert conv is not None and conv.members == ("alice", "bob")

    async def test_group_and_membership(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol", "dave")
        g = await store.create_group("g:1", "team", ["carol", "alice", "bob"], 7)
        assert g.members == ("alice", "bob", "carol") and g.title == "team" and g.kind == "group"
        assert await store.get_conversation("g:1") == g
        assert await store.get_conversation("g:nope") is None
        assert await store.shares_conversation("alice", "carol")
        assert not await store.shares_conversation("alice", "dave")

    async def test_empty_conversation_has_no_last_message(self, store: Store) -> None:
        await users(store, "alice", "bob")
        await store.ensure_dm("alice", "bob", 3)
        [summary] = await store.conversations_of("alice")
        assert summary.last_seq == 0 and summary.unread == 0 and summary.last_message is None
        assert summary.last_ts is None

    async def test_dm_peers_lists_only_one_to_one(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        await store.ensure_dm("alice", "bob", 1)
        await store.create_group("g:1", None, ["alice", "carol"], 1)
        assert await store.dm_peers("alice") == ["bob"]
        assert await store.dm_peers("carol") == []

    async def test_conversations_of_with_unread_and_last_seq(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        dm = await store.ensure_dm("alice", "bob", 1)
        g = await store.create_group("g:1", "g", ["alice", "bob", "carol"], 2)
        await store.append([new_message(dm.id, "alice", ("bob",), ts=10)])
        await store.append([new_message(dm.id, "alice", ("bob",), ts=11)])
        done = await store.append([new_message(g.id, "carol", ("alice", "bob"), ts=20)])
        summaries = {s.id: s for s in await store.conversations_of("bob")}
        assert set(summaries) == {dm.id, g.id}
        assert summaries[dm.id].last_seq == 2 and summaries[dm.id].unread == 2
        assert summaries[g.id].last_seq == 1 and summaries[g.id].unread == 1
        assert summaries[g.id].members == ("alice", "bob", "carol")
        last = summaries[dm.id].last_message
        assert last is not None and last.seq == 2 and last.ts == 11 and last.sender == "alice"
        assert summaries[g.id].last_message is not None
        assert present(summaries[g.id].last_message).id == done[0].id
        # Most recent activity first.
        assert [s.id for s in await store.conversations_of("bob")] == [g.id, dm.id]
        await store.mark([Mark("bob", done[0].id, Status.SEEN, 30)])
        assert {s.id: s.unread for s in await store.conversations_of("bob")}[g.id] == 0
        # The sender has nothing unread of their own.
        assert {s.id: s.unread for s in await store.conversations_of("alice")}[dm.id] == 0

    # -- messages ----------------------------------------------------------------

    async def test_seq_per_conversation(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        ab = await store.ensure_dm("alice", "bob", 1)
        ac = await store.ensure_dm("alice", "carol", 1)
        out = await store.append(
            [
                new_message(ab.id, "alice", ("bob",)),
                new_message(ac.id, "alice", ("carol",)),
                new_message(ab.id, "bob", ("alice",)),
            ]
        )
        assert [(a.conversation, a.seq) for a in out] == [(ab.id, 1), (ac.id, 1), (ab.id, 2)]
        assert not any(a.duplicate for a in out)

    async def test_idempotent_by_sender_and_cid(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        first = new_message(dm.id, "alice", ("bob",), cid="same", ts=5)
        [a1] = await store.append([first])
        again = new_message(dm.id, "alice", ("bob",), cid="same", ts=9)
        [a2] = await store.append([again])
        assert a2.duplicate and (a2.id, a2.seq, a2.ts) == (a1.id, a1.seq, 5)
        # The same cid from another sender is another message.
        [b1] = await store.append([new_message(dm.id, "bob", ("alice",), cid="same")])
        assert not b1.duplicate and b1.seq == 2
        history = await store.history(dm.id, None, 10)
        assert [m.id for m in history] == [a1.id, b1.id]

    async def test_idempotent_within_one_batch(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        out = await store.append(
            [
                new_message(dm.id, "alice", ("bob",), cid="c"),
                new_message(dm.id, "alice", ("bob",), cid="c"),
            ]
        )
        assert [a.duplicate for a in out] == [False, True]
        assert out[0].id == out[1].id and out[0].seq == out[1].seq == 1

    async def test_concurrent_appends_have_no_gaps(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        seqs: list[int] = []

        async def writer(i: int) -> None:
            for j in range(10):
                [done] = await store.append([new_message(dm.id, "alice", ("bob",), f"{i}-{j}")])
                seqs.append(done.seq)

        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(writer, i)
        assert sorted(seqs) == list(range(1, 51))

    async def test_bodies_are_stored_as_given(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(dm.id, "alice", ("bob",))
        await store.append([msg])
        [got] = await store.get_messages([msg.id])
        assert got.body == msg.body and got.sender == "alice" and got.ts == msg.ts

    async def test_history_pages_oldest_first(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        for _ in range(7):
            await store.append([new_message(dm.id, "alice", ("bob",))])
        last3 = await store.history(dm.id, None, 3)
        assert [m.seq for m in last3] == [5, 6, 7]
        before5 = await store.history(dm.id, 5, 3)
        assert [m.seq for m in before5] == [2, 3, 4]
        assert [m.seq for m in await store.history(dm.id, 2, 10)] == [1]
        assert await store.history(dm.id, 1, 10) == []
        assert await store.history("dm:nobody:other", None, 10) == []

    # -- receipts ----------------------------------------------------------------

    async def test_delivered_then_seen_reported_once(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(dm.id, "alice", ("bob",))
        await store.append([msg])
        [r1] = await store.mark([Mark("bob", msg.id, Status.DELIVERED, 100)])
        assert r1.known and [(t.status, t.member, t.sender, t.ts) for t in r1.transitions] == [
            (Status.DELIVERED, "bob", "alice", 100)
        ]
        [r2] = await store.mark([Mark("bob", msg.id, Status.DELIVERED, 101)])
        assert r2.known and r2.transitions == ()
        [r3] = await store.mark([Mark("bob", msg.id, Status.SEEN, 102)])
        assert [t.status for t in r3.transitions] == [Status.SEEN]
        [r4] = await store.mark([Mark("bob", msg.id, Status.SEEN, 103)])
        assert r4.transitions == ()
        [got] = await store.history(dm.id, None, 1)
        assert got.delivered_to == ("bob",) and got.seen_by == ("bob",)

    async def test_seen_first_makes_both_receipts(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(dm.id, "alice", ("bob",))
        await store.append([msg])
        [r] = await store.mark([Mark("bob", msg.id, Status.SEEN, 100)])
        assert [t.status for t in r.transitions] == [Status.DELIVERED, Status.SEEN]
        [r2] = await store.mark([Mark("bob", msg.id, Status.DELIVERED, 101)])
        assert r2.transitions == ()

    async def test_marks_by_strangers_and_senders(self, store: Store) -> None:
        await users(store, "alice", "bob", "eve")
        dm = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(dm.id, "alice", ("bob",))
        await store.append([msg])
        eve, own, unknown = await store.mark(
            [
                Mark("eve", msg.id, Status.SEEN, 1),
                Mark("alice", msg.id, Status.SEEN, 1),
                Mark("bob", "no-such-id", Status.SEEN, 1),
            ]
        )
        assert not eve.known and eve.transitions == ()
        assert own.known and own.transitions == ()
        assert not unknown.known
        [got] = await store.history(dm.id, None, 1)
        assert got.delivered_to == () and got.seen_by == ()

    async def test_concurrent_marks_report_one_transition(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(dm.id, "alice", ("bob",))
        await store.append([msg])
        made: list[Transition] = []

        async def marker() -> None:
            [r] = await store.mark([Mark("bob", msg.id, Status.DELIVERED, 5)])
            made.extend(r.transitions)

        async with trio.open_nursery() as n:
            for _ in range(6):
                n.start_soon(marker)
        assert len(made) == 1

    async def test_group_receipts_are_per_member(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        msg = new_message(g.id, "alice", ("bob", "carol"))
        await store.append([msg])
        await store.mark([Mark("bob", msg.id, Status.SEEN, 5)])
        await store.mark([Mark("carol", msg.id, Status.DELIVERED, 6)])
        [got] = await store.history(g.id, None, 1)
        assert got.delivered_to == ("bob", "carol") and got.seen_by == ("bob",)

    async def test_owed_messages_until_delivered(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        ab = await store.ensure_dm("alice", "bob", 1)
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        m1 = new_message(ab.id, "alice", ("bob",))
        m2 = new_message(g.id, "carol", ("alice", "bob"))
        m3 = new_message(ab.id, "alice", ("bob",))
        await store.append([m1, m2, m3])
        owed = await store.owed_messages("bob", 100)
        # Ordered by conversation, then seq.
        assert [(m.conversation, m.seq) for m in owed] == sorted(
            (m.conversation, m.seq) for m in owed
        )
        assert {m.id for m in owed} == {m1.id, m2.id, m3.id}
        assert [m.id for m in await store.owed_messages("alice", 100)] == [m2.id]
        await store.mark([Mark("bob", m1.id, Status.DELIVERED, 5)])
        await store.mark([Mark("bob", m2.id, Status.SEEN, 5)])
        assert [m.id for m in await store.owed_messages("bob", 100)] == [m3.id]
        assert len(await store.owed_messages("bob", 0)) == 0

    async def test_owed_receipts_until_acked(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        msg = new_message(g.id, "alice", ("bob", "carol"))
        await store.append([msg])
        assert await store.owed_receipts("alice", 100) == []
        await store.mark([Mark("bob", msg.id, Status.SEEN, 5)])
        await store.mark([Mark("carol", msg.id, Status.DELIVERED, 6)])
        owed = await store.owed_receipts("alice", 100)
        assert sorted((r.member, r.status.value, r.ts) for r in owed) == [
            ("bob", "delivered", 5),
            ("bob", "seen", 5),
            ("carol", "delivered", 6),
        ]
        assert all(r.message_id == msg.id and r.sender == "alice" for r in owed)
        # Someone else acking alice's receipts changes nothing.
        await store.ack_receipts([("bob", ReceiptKey(msg.id, "carol", Status.DELIVERED))])
        assert len(await store.owed_receipts("alice", 100)) == 3
        # A seen ack settles the delivered receipt of the same member too.
        await store.ack_receipts([("alice", ReceiptKey(msg.id, "bob", Status.SEEN))])
        owed = await store.owed_receipts("alice", 100)
        assert [(r.member, r.status.value) for r in owed] == [("carol", "delivered")]
        await store.ack_receipts([("alice", ReceiptKey(msg.id, "carol", Status.DELIVERED))])
        assert await store.owed_receipts("alice", 100) == []
        # A later seen by carol is owed again (a new receipt).
        await store.mark([Mark("carol", msg.id, Status.SEEN, 9)])
        assert [(r.member, r.status.value) for r in await store.owed_receipts("alice", 100)] == [
            ("carol", "seen")
        ]

    async def test_write_does_appends_then_marks_then_acks(self, store: Store) -> None:
        """One write with everything that arrived together: the same results as
        the three calls in that order (a mark may name a message appended in
        the same write, an ack a receipt its marks just made)."""
        await users(store, "alice", "bob", "carol")
        dm = await store.ensure_dm("alice", "bob", 1)
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        old = new_message(dm.id, "alice", ("bob",))
        await store.append([old])
        fresh = new_message(g.id, "bob", ("alice", "carol"), cid="fresh")
        again = NewMessage(
            _ids.new(), dm.id, "alice", old.cid, 2, sealed(), ("bob",)
        )  # a retry of `old`
        done = await store.write(
            Writes(
                appends=[fresh, again],
                marks=[
                    Mark("bob", old.id, Status.SEEN, 10),
                    Mark("carol", fresh.id, Status.DELIVERED, 11),
                    Mark("eve", old.id, Status.SEEN, 12),
                ],
                receipt_acks=[("alice", ReceiptKey(old.id, "bob", Status.SEEN))],
            )
        )
        assert [(a.id, a.seq, a.duplicate) for a in done.appended] == [
            (fresh.id, 1, False),
            (old.id, 1, True),
        ]
        assert [[t.status.value for t in r.transitions] for r in done.marked] == [
            ["delivered", "seen"],
            ["delivered"],
            [],
        ]
        assert [r.known for r in done.marked] == [True, True, False]
        # The seen ack in the same write settled both of bob's receipts.
        assert await store.owed_receipts("alice", 100) == []
        [r] = await store.owed_receipts("bob", 100)
        assert (r.message_id, r.member, r.status) == (fresh.id, "carol", Status.DELIVERED)
        assert [m.id for m in await store.owed_messages("alice", 100)] == [fresh.id]

    async def test_write_of_nothing(self, store: Store) -> None:
        done = await store.write(Writes())
        assert done.appended == [] and done.marked == []

    async def test_owed_receipts_page_by_message_and_member(self, store: Store) -> None:
        """The port's paging: up to ``limit`` (message id, member) pairs after
        ``after``, each with its delivered and/or seen receipt, in (message id,
        member, delivered before seen) order."""
        await users(store, "alice", "bob", "carol", "dave")
        g = await store.create_group("g:1", None, ["alice", "bob", "carol", "dave"], 1)
        msgs = [new_message(g.id, "alice", ("dave", "bob", "carol")) for _ in range(3)]
        await store.append(msgs)
        for i, m in enumerate(msgs):
            await store.mark([Mark("bob", m.id, Status.SEEN, 10 + i)])
            await store.mark([Mark("dave", m.id, Status.DELIVERED, 20 + i)])
        # carol owes nothing on msgs[1]; acked everything of bob's on msgs[2].
        await store.mark([Mark("carol", msgs[0].id, Status.DELIVERED, 30)])
        await store.mark([Mark("carol", msgs[2].id, Status.DELIVERED, 31)])
        await store.ack_receipts([("alice", ReceiptKey(msgs[2].id, "bob", Status.SEEN))])
        expected_pairs = [
            (msgs[0].id, "bob"),
            (msgs[0].id, "carol"),
            (msgs[0].id, "dave"),
            (msgs[1].id, "bob"),
            (msgs[1].id, "dave"),
            (msgs[2].id, "carol"),
            (msgs[2].id, "dave"),
        ]
        everything = await store.owed_receipts("alice", 100)
        assert [(r.message_id, r.member, r.status.value) for r in everything] == [
            (mid, member, status)
            for mid, member in expected_pairs
            for status in (("delivered", "seen") if member == "bob" else ("delivered",))
            if not (mid == msgs[2].id and member == "bob")
        ]
        for limit in (1, 2, 3, 5, 7, 8):
            pages, after = [], None
            while True:
                page = await store.owed_receipts("alice", limit, after)
                pairs = sorted({(r.message_id, r.member) for r in page})
                assert len(pairs) <= limit
                pages.extend(page)
                if len(pairs) < limit:
                    break
                after = pairs[-1]
            assert pages == everything, limit
        assert await store.owed_receipts("alice", 0) == []

    async def test_owed_messages_page_after_conversation_and_seq(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        ab = await store.ensure_dm("alice", "bob", 1)
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        sent = []
        for i in range(9):
            conv = ab.id if i % 3 else g.id
            sent.append(new_message(conv, "alice", ("bob",) if conv == ab.id else ("bob", "carol")))
        await store.append(sent)
        await store.mark([Mark("bob", sent[4].id, Status.DELIVERED, 5)])
        everything = await store.owed_messages("bob", 100)
        assert len(everything) == 8
        keys = [(m.conversation, m.seq) for m in everything]
        assert keys == sorted(keys)
        for limit in (1, 2, 3, 8):
            got, after = [], None
            while True:
                page = await store.owed_messages("bob", limit, after)
                got.extend(page)
                if len(page) < limit:
                    break
                after = (page[-1].conversation, page[-1].seq)
            assert [m.id for m in got] == [m.id for m in everything], limit
        assert await store.owed_messages("bob", 10, (g.id, 99)) == []

    async def test_append_to_an_unknown_conversation(self, store: Store) -> None:
        await users(store, "alice", "bob")
        with pytest.raises(NotFound):
            await store.append([new_message("dm:alice:bob", "alice", ("bob",))])
        assert await store.history("dm:alice:bob", None, 10) == []

    async def test_a_taken_group_id_is_conflict(self, store: Store) -> None:
        await users(store, "alice", "bob")
        await store.create_group("g:1", None, ["alice", "bob"], 1)
        with pytest.raises(Conflict):
            await store.create_group("g:1", "other", ["alice", "bob"], 2)

    async def test_acking_a_receipt_that_did_not_happen_changes_nothing(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(dm.id, "alice", ("bob",))
        await store.append([msg])
        # alice acks receipts bob never produced: the real ones still come.
        await store.ack_receipts([("alice", ReceiptKey(msg.id, "bob", Status.SEEN))])
        await store.mark([Mark("bob", msg.id, Status.SEEN, 7)])
        owed = await store.owed_receipts("alice", 10)
        assert [(r.status.value, r.ts) for r in owed] == [("delivered", 7), ("seen", 7)]

    # -- administration ----------------------------------------------------------

    async def test_list_users_pages_by_name(self, store: Store) -> None:
        await users(store, "carol", "alice", "dave", "bob")
        await store.set_disabled("bob", True)
        everything = await store.list_users(None, 10)
        assert [u.username for u in everything] == ["alice", "bob", "carol", "dave"]
        assert [u.disabled for u in everything] == [False, True, False, False]
        got, after = [], None
        while page := await store.list_users(after, 3):
            got.extend(page)
            after = page[-1].username
        assert got == everything
        assert await store.list_users("dave", 10) == []
        assert await store.list_users(None, 0) == []

    async def test_disable_and_enable(self, store: Store) -> None:
        await users(store, "alice")
        await store.set_disabled("alice", True)
        got = await store.get_user("alice")
        assert got is not None and got.disabled and not got.deleted
        assert got.password_hash == "hash-alice"
        await store.set_disabled("alice", False)
        got = await store.get_user("alice")
        assert got is not None and not got.disabled
        with pytest.raises(NotFound):
            await store.set_disabled("nobody", True)

    async def test_delete_user_keeps_others_history(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        dm = await store.ensure_dm("alice", "bob", 1)
        to_bob = new_message(dm.id, "alice", ("bob",))
        in_group = new_message(g.id, "alice", ("bob", "carol"))
        from_bob = new_message(g.id, "bob", ("alice", "carol"))
        await store.append([to_bob, in_group, from_bob])
        await store.mark([Mark("alice", from_bob.id, Status.SEEN, 5)])
        await store.mark([Mark("bob", in_group.id, Status.DELIVERED, 6)])
        before = {c: await store.history(c, None, 10) for c in (g.id, dm.id)}
        assert len(await store.owed_receipts("bob", 10)) == 2
        done = await store.delete_user("bob")
        assert (done.messages_dropped, done.receipts_settled) == (1, 2)
        got = await store.get_user("bob")
        assert got is not None and got.deleted and got.disabled and got.password_hash == ""
        assert await store.owed_messages("bob", 10) == []
        assert await store.owed_receipts("bob", 10) == []
        # Everyone else's history and what is owed to them: unchanged.
        assert {c: await store.history(c, None, 10) for c in (g.id, dm.id)} == before
        assert {m.id for m in await store.owed_messages("carol", 10)} == {in_group.id, from_bob.id}
        assert (await store.get_conversation(dm.id)) is not None
        # The name stays taken; the account stays deleted.
        with pytest.raises(Conflict):
            await store.create_user(User("bob", "new-hash", 9))
        with pytest.raises(Conflict):
            await store.set_disabled("bob", False)
        with pytest.raises(NotFound):
            await store.delete_user("nobody")

    async def test_delete_user_again_clears_what_came_since(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        await store.delete_user("bob")
        late = new_message(dm.id, "alice", ("bob",))
        await store.append([late])
        assert [m.id for m in await store.owed_messages("bob", 10)] == [late.id]
        again = await store.delete_user("bob")
        assert again.messages_dropped == 1
        assert await store.owed_messages("bob", 10) == []

    async def test_stats_count_what_is_stored_and_owed(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol", "dave")
        await store.set_disabled("dave", True)
        g = await store.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        await store.ensure_dm("alice", "bob", 1)
        old = new_message(g.id, "alice", ("bob", "carol"), ts=100)
        new = new_message(g.id, "alice", ("bob", "carol"), ts=2000)
        await store.append([old, new])
        await store.mark([Mark("bob", old.id, Status.SEEN, 500)])
        await store.mark([Mark("bob", new.id, Status.DELIVERED, 2500)])
        await store.mark([Mark("carol", new.id, Status.SEEN, 2600)])
        await store.ack_receipts([("alice", ReceiptKey(new.id, "carol", Status.SEEN))])
        st = await store.stats(1000)
        assert (st.users, st.disabled, st.deleted, st.conversations) == (4, 1, 0, 2)
        assert (st.messages, st.messages_since, st.since) == (2, 1, 1000)
        assert st.owed_messages == 1  # carol has not got ``old``
        assert st.owed_receipts == 3  # bob's two on old, bob's delivered on new
        assert (st.delivered_since, st.seen_since) == (2, 1)
        await store.delete_user("dave")
        st = await store.stats(0)
        assert (st.disabled, st.deleted, st.delivered_since, st.seen_since) == (1, 1, 3, 2)

    async def test_messages_by_key_and_count_by_key(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        batch = [new_message(dm.id, "alice", ("bob",), key_id=k) for k in "ababa"]
        await store.append(batch)
        assert await store.count_by_key() == {"a": 3, "b": 2}
        got, after = [], None
        while page := await store.messages_by_key("a", after, 2):
            got.extend(page)
            after = page[-1].id
        assert [m.id for m in got] == sorted(m.id for m in batch if m.body.key_id == "a")
        assert all(m.body.key_id == "a" for m in got)
        assert [m.body for m in got] == [m.body for m in batch if m.body.key_id == "a"]
        assert await store.messages_by_key("zz", None, 10) == []

    async def test_reseal_is_compare_and_set(self, store: Store) -> None:
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        m1 = new_message(dm.id, "alice", ("bob",), key_id="old")
        m2 = new_message(dm.id, "alice", ("bob",), key_id="old")
        await store.append([m1, m2])
        await store.mark([Mark("bob", m1.id, Status.SEEN, 5)])
        fresh1, fresh2 = sealed("n1", "new"), sealed("n2", "new")
        stale = sealed("someone-else", "old")
        done = await store.reseal(
            [
                Reseal(m1.id, m1.body, fresh1),
                Reseal(m2.id, stale, fresh2),  # changed meanwhile: skipped
                Reseal("no-such-id", m1.body, fresh1),
            ]
        )
        assert done == [True, False, False]
        got = {m.id: m for m in await store.get_messages([m1.id, m2.id])}
        assert got[m1.id].body == fresh1 and got[m2.id].body == m2.body
        # Nothing but the body changed.
        assert (got[m1.id].seq, got[m1.id].ts, got[m1.id].seen_by) == (1, m1.ts, ("bob",))
        assert await store.reseal([Reseal(m1.id, m1.body, fresh2)]) == [False]
        assert await store.count_by_key() == {"new": 1, "old": 1}
        assert await store.reseal([]) == []

    async def test_ping(self, store: Store) -> None:
        await store.ping()

    # -- replies, reactions, edits, deletions -----------------------------------

    async def _trio(self, store: Store) -> tuple[str, NewMessage]:
        """alice, bob and carol in a group alice made; alice's first message."""
        await users(store, "alice", "bob", "carol")
        g = await store.create_group("g:ev", None, ["alice", "bob", "carol"], 1, creator="alice")
        msg = new_message(g.id, "alice", ("bob", "carol"), cid="a-1", ts=5)
        await store.append([msg])
        return g.id, msg

    async def test_group_creator_is_kept(self, store: Store) -> None:
        await users(store, "alice", "bob")
        await store.create_group("g:c", None, ["alice", "bob"], 1, creator="alice")
        conv = await store.get_conversation("g:c")
        assert conv is not None and conv.created_by == "alice"
        dm = await store.ensure_dm("alice", "bob", 1)
        assert dm.created_by is None

    async def test_history_has_cid_and_reply_to(self, store: Store) -> None:
        g, first = await self._trio(store)
        reply = NewMessage(
            _ids.new(), g, "bob", "b-1", 6, sealed("r"), ("alice", "carol"), first.id
        )
        await store.append([reply])
        got = await store.history(g, None, 10)
        assert [(m.cid, m.reply_to) for m in got] == [("a-1", None), ("b-1", first.id)]
        [owed] = [m for m in await store.owed_messages("alice", 10)]
        assert owed.reply_to == first.id
        assert [m.reply_to for m in await store.get_messages([reply.id])] == [first.id]

    async def test_reactions_toggle_with_gap_free_eseq(self, store: Store) -> None:
        g, msg = await self._trio(store)
        r1 = await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍"),
        )
        r2 = await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "carol", ("alice", "bob"), emoji="👍"),
        )
        r3 = await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="🎉"),
        )
        assert [r.event.eseq for r in (r1, r2, r3)] == [1, 2, 3]
        assert not any(r.refused or r.duplicate for r in (r1, r2, r3))
        [got] = await store.history(g, None, 10)
        assert dict(got.reactions) == {"👍": ("bob", "carol"), "🎉": ("bob",)}
        r4 = await one_event(
            store,
            new_event(
                g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍", on=False
            ),
        )
        assert r4.event.eseq == 4 and r4.event.on is False
        [got] = await store.history(g, None, 10)
        assert dict(got.reactions) == {"👍": ("carol",), "🎉": ("bob",)}
        # Owed to every recipient, in eseq order; never to the actor.
        owed = await store.owed_events("alice", 10)
        assert [(e.eseq, e.by, e.emoji, e.on) for e in owed] == [
            (1, "bob", "👍", True),
            (2, "carol", "👍", True),
            (3, "bob", "🎉", True),
            (4, "bob", "👍", False),
        ]
        assert [e.eseq for e in await store.owed_events("bob", 10)] == [2]

    async def test_events_are_idempotent_by_actor_and_cid(self, store: Store) -> None:
        g, msg = await self._trio(store)
        ev = new_event(
            g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), cid="b-r", emoji="👍"
        )
        first = await one_event(store, ev)
        again = await one_event(
            store,
            new_event(
                g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), cid="b-r", emoji="🎉"
            ),
        )
        assert again.duplicate and again.event.id == first.event.id
        assert again.event.eseq == 1 and again.event.emoji == "👍"
        assert len(await store.owed_events("alice", 10)) == 1
        [got] = await store.history(g, None, 10)
        assert dict(got.reactions) == {"👍": ("bob",)}

    async def test_edit_replaces_the_body_and_keeps_receipts(self, store: Store) -> None:
        g, msg = await self._trio(store)
        await store.mark([Mark("bob", msg.id, Status.SEEN, 6)])
        new_body = sealed("fixed")
        result = await one_event(
            store,
            new_event(
                g,
                EventKind.EDITED,
                msg.id,
                "alice",
                ("bob", "carol"),
                ts=50,
                body=new_body,
                window_ms=100,
            ),
        )
        assert result.refused is None and result.event.body == new_body
        [got] = await store.get_messages([msg.id])
        assert got.body == new_body and got.edited_ts == 50 and got.edits == 1
        assert got.seen_by == ("bob",) and got.seq == 1
        [owed] = await store.owed_events("carol", 10)
        assert owed.kind is EventKind.EDITED and owed.body == new_body
        # The edited event always carries the body as it is now.
        newer = sealed("fixed again")
        await one_event(
            store,
            new_event(g, EventKind.EDITED, msg.id, "alice", ("bob", "carol"), ts=60, body=newer),
        )
        assert [e.body for e in await store.owed_events("carol", 10)] == [newer, newer]
        [got] = await store.get_messages([msg.id])
        assert got.edits == 2 and got.edited_ts == 60

    async def test_refused_events_change_nothing(self, store: Store) -> None:
        g, msg = await self._trio(store)
        cases = [
            # someone else's message
            (new_event(g, EventKind.EDITED, msg.id, "bob", ("alice", "carol")), "forbidden"),
            (new_event(g, EventKind.DELETED, msg.id, "bob", ("alice", "carol")), "forbidden"),
            # too old to edit (sent at 5, window 100 ms, now 200)
            (
                new_event(
                    g, EventKind.EDITED, msg.id, "alice", ("bob", "carol"), ts=200, window_ms=100
                ),
                "forbidden",
            ),
            # unknown message, or one of another conversation
            (
                new_event(g, EventKind.REACTION, "nope", "bob", ("alice", "carol"), emoji="👍"),
                "not_found",
            ),
            (
                new_event("g:other", EventKind.REACTION, msg.id, "bob", ("alice",), emoji="👍"),
                "not_found",
            ),
        ]
        for ev, code in cases:
            result = await one_event(store, ev)
            assert (result.refused, result.event) == (code, None), ev
        [got] = await store.get_messages([msg.id])
        assert got.body == msg.body and got.edits == 0 and not got.deleted
        assert await store.owed_events("alice", 10) == []
        assert await store.owed_events("bob", 10) == []
        # No eseq was used up: the next event is the first.
        ok = await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍"),
        )
        assert ok.event.eseq == 1
        # A refused request's cid is not taken: it may be used for a valid one.
        ev, _ = cases[0]
        fixed = new_event(g, EventKind.REACTION, msg.id, "bob", ("alice",), cid=ev.cid, emoji="🎉")
        assert (await one_event(store, fixed)).event.eseq == 2

    async def test_delete_erases_the_body_and_what_is_owed(self, store: Store) -> None:
        g, msg = await self._trio(store)
        await store.mark([Mark("bob", msg.id, Status.SEEN, 6)])  # carol: still owed it
        edit = await one_event(
            store, new_event(g, EventKind.EDITED, msg.id, "alice", ("bob", "carol"))
        )
        react = await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍"),
        )
        deleted = await one_event(
            store, new_event(g, EventKind.DELETED, msg.id, "alice", ("bob", "carol"))
        )
        assert deleted.refused is None and deleted.event.eseq == 3
        rids = [f"{msg.id}:bob:delivered", f"{msg.id}:bob:seen"]
        assert set(deleted.dropped) == {
            ("carol", msg.id),  # the message, never delivered to carol
            ("bob", edit.event.id),
            ("carol", edit.event.id),
            ("alice", react.event.id),
            ("carol", react.event.id),
            *(("alice", r) for r in rids),  # receipts owed to the sender
        }
        [got] = await store.get_messages([msg.id])
        assert got.deleted and got.body.ciphertext == b"" and got.body.nonce == b""
        assert got.reactions == () and got.seq == 1
        [tomb] = await store.history(g, None, 10)
        assert tomb.deleted and tomb.id == msg.id and tomb.seq == 1
        assert await store.owed_messages("carol", 10) == []
        assert await store.owed_receipts("alice", 10) == []
        # carol's ack crossed the deletion: accepted, nothing happens.
        [late] = await store.mark([Mark("carol", msg.id, Status.DELIVERED, 40)])
        assert late.known and late.transitions == ()
        # Only the deletion itself is still owed.
        for member in ("bob", "carol"):
            owed = await store.owed_events(member, 10)
            assert [(e.kind, e.eseq) for e in owed] == [(EventKind.DELETED, 3)]
        assert [(e.kind, e.by) for e in await store.owed_events("alice", 10)] == []
        # A deleted message takes no more events.
        for ev in (
            new_event(g, EventKind.EDITED, msg.id, "alice", ("bob", "carol")),
            new_event(g, EventKind.DELETED, msg.id, "alice", ("bob", "carol")),
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍"),
        ):
            assert (await one_event(store, ev)).refused == "not_found"
        assert await store.count_by_key() == {}
        assert await store.messages_by_key("k1", None, 10) == []

    async def test_a_moderator_deletes_other_members_messages(self, store: Store) -> None:
        g, _ = await self._trio(store)
        bobs = new_message(g, "bob", ("alice", "carol"))
        await store.append([bobs])
        result = await one_event(
            store,
            new_event(g, EventKind.DELETED, bobs.id, "alice", ("bob", "carol"), moderator=True),
        )
        assert result.refused is None
        [got] = await store.get_messages([bobs.id])
        assert got.deleted

    async def test_event_acks_settle_per_user(self, store: Store) -> None:
        g, msg = await self._trio(store)
        r = await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍"),
        )
        eid = r.event.id
        # Another user's ack, or an unknown id, changes nothing.
        await store.write(Writes(event_acks=[("bob", eid), ("alice", "nope")]))
        assert [e.id for e in await store.owed_events("alice", 10)] == [eid]
        await store.write(Writes(event_acks=[("alice", eid)]))
        assert await store.owed_events("alice", 10) == []
        assert [e.id for e in await store.owed_events("carol", 10)] == [eid]

    async def test_an_event_may_name_a_message_of_the_same_write(self, store: Store) -> None:
        g, _ = await self._trio(store)
        msg = new_message(g, "bob", ("alice", "carol"))
        react = new_event(g, EventKind.REACTION, msg.id, "carol", ("alice", "bob"), emoji="👍")
        done = await store.write(Writes(appends=[msg], events=[react]))
        assert done.events[0].refused is None and present(done.events[0].event).eseq == 1

    async def test_owed_events_page_after_conversation_and_eseq(self, store: Store) -> None:
        g, msg = await self._trio(store)
        emojis = ["👍", "🎉", "❤️", "😂", "🔥"]
        for e in emojis:
            await one_event(
                store, new_event(g, EventKind.REACTION, msg.id, "bob", ("alice",), emoji=e)
            )
        seen: list[int] = []
        after = None
        while True:
            page = await store.owed_events("alice", 2, after)
            seen += [e.eseq for e in page]
            if len(page) < 2:
                break
            after = (page[-1].conversation, page[-1].eseq)
        assert seen == [1, 2, 3, 4, 5]

    async def test_reactions_per_user_are_bounded(self, store: Store) -> None:
        g, msg = await self._trio(store)
        symbols = [chr(0x1F600 + i) for i in range(MAX_REACTIONS_PER_USER + 1)]
        for e in symbols[:-1]:
            r = await one_event(
                store, new_event(g, EventKind.REACTION, msg.id, "bob", ("alice",), emoji=e)
            )
            assert r.refused is None
        over = await one_event(
            store, new_event(g, EventKind.REACTION, msg.id, "bob", ("alice",), emoji=symbols[-1])
        )
        assert over.refused == "bad_request"
        # Saying again one already there, or taking one off, is fine.
        again = await one_event(
            store, new_event(g, EventKind.REACTION, msg.id, "bob", ("alice",), emoji=symbols[0])
        )
        assert again.refused is None

    async def test_delete_user_drops_owed_events(self, store: Store) -> None:
        g, msg = await self._trio(store)
        await one_event(
            store,
            new_event(g, EventKind.REACTION, msg.id, "bob", ("alice", "carol"), emoji="👍"),
        )
        await store.delete_user("carol")
        assert await store.owed_events("carol", 10) == []
        assert len(await store.owed_events("alice", 10)) == 1

    # -- groups that change -------------------------------------------------------

    async def _change(
        self, store: Store, by: str, action: GroupAction, *users: str, title: str | None = None
    ) -> Any:
        return await store.change_group(
            NewMembership(_ids.new(), "g:ev", by, 20, action, tuple(users), title)
        )

    async def test_group_changes_are_events_owed_to_old_and_new_members(self, store: Store) -> None:
        g, _msg = await self._trio(store)
        await users(store, "dave")
        conv = present(await store.get_conversation(g))
        assert conv is not None and conv.admins == ("alice",)
        added = await self._change(store, "alice", GroupAction.ADD, "dave")
        assert added.refused is None and added.event.kind is EventKind.MEMBERS
        assert added.event.eseq == 1 and added.event.users == ("dave",)
        assert added.event.members == ("alice", "bob", "carol", "dave")
        assert set(added.recipients) == {"alice", "bob", "carol", "dave"}
        removed = await self._change(store, "alice", GroupAction.REMOVE, "bob")
        assert removed.event.eseq == 2 and removed.event.members == ("alice", "carol", "dave")
        assert set(removed.recipients) == {"alice", "bob", "carol", "dave"}  # bob hears of it
        renamed = await self._change(store, "alice", GroupAction.RENAME, title="Lunch")
        assert renamed.event.title == "Lunch" and "bob" not in renamed.recipients
        conv = present(await store.get_conversation(g))
        assert conv.members == ("alice", "carol", "dave") and conv.title == "Lunch"
        assert conv.visible_from("dave") == 2 and conv.visible_from("carol") == 1
        # The members events are owed like any event, with what they changed.
        owed = await store.owed_events("bob", 10)
        assert [(e.kind, e.action, e.users) for e in owed] == [
            (EventKind.MEMBERS, "add", ("dave",)),
            (EventKind.MEMBERS, "remove", ("bob",)),
        ]
        assert [e.title for e in await store.owed_events("dave", 10)][-1] == "Lunch"
        summaries = {s.id: s for s in await store.conversations_of("carol")}
        assert summaries[g].admins == ("alice",) and summaries[g].title == "Lunch"
        assert summaries[g].joined == (("dave", 2),)
        assert g not in {s.id for s in await store.conversations_of("bob")}

    async def test_membership_in_the_store_decides_who_gets_a_message(self, store: Store) -> None:
        g, _ = await self._trio(store)
        await users(store, "dave")
        await self._change(store, "alice", GroupAction.REMOVE, "bob")
        await self._change(store, "alice", GroupAction.ADD, "dave")
        # The caller's view was stale (bob still listed): the store knows better.
        late = new_message(g, "carol", ("alice", "bob"))
        [done] = await store.append([late])
        assert done.refused is None and set(present(done.recipients)) == {"alice", "dave"}
        assert late.id not in [m.id for m in await store.owed_messages("bob", 10)]
        assert [m.id for m in await store.owed_messages("dave", 10)] == [late.id]
        # A removed member's send is refused and stores nothing.
        refused = new_message(g, "bob", ("alice", "carol"))
        [done] = await store.append([refused])
        assert done.refused == "forbidden"
        assert await store.get_messages([refused.id]) == []
        # Events too: owed to the members of now; a non-member's is refused.
        react = new_event(g, EventKind.REACTION, late.id, "dave", ("alice", "bob"), emoji="👍")
        done = await one_event(store, react)
        assert done.refused is None and set(done.recipients) == {"alice", "carol"}
        bobs = new_event(g, EventKind.REACTION, late.id, "bob", ("alice",), emoji="👍")
        assert (await one_event(store, bobs)).refused == "not_found"

    async def test_a_member_added_later_reads_from_their_join(self, store: Store) -> None:
        g, _first = await self._trio(store)  # seq 1
        await users(store, "dave")
        second = new_message(g, "alice", ("bob", "carol"))
        await store.append([second])  # seq 2
        await self._change(store, "alice", GroupAction.ADD, "dave")
        third = new_message(g, "bob", ("alice", "carol", "dave"))
        await store.append([third])  # seq 3
        assert [m.seq for m in await store.history(g, None, 10, viewer="dave")] == [3]
        assert [m.seq for m in await store.history(g, None, 10, viewer="carol")] == [1, 2, 3]
        assert await store.history(g, None, 10, viewer="mallory") == []
        assert [m.seq for m in await store.history(g, None, 10)] == [1, 2, 3]
        # Nor may they act on what came before.
        old = new_event(g, EventKind.REACTION, second.id, "dave", ("alice",), emoji="👍")
        assert (await one_event(store, old)).refused == "not_found"
        new = new_event(g, EventKind.REACTION, third.id, "dave", ("alice",), emoji="👍")
        assert (await one_event(store, new)).refused is None
        # Their conversation list does not preview what came before either.
        await store.change_group(
            NewMembership(_ids.new(), g, "alice", 30, GroupAction.REMOVE, ("dave",))
        )
        await store.change_group(
            NewMembership(_ids.new(), g, "alice", 31, GroupAction.ADD, ("dave",))
        )
        [summary] = [s for s in await store.conversations_of("dave") if s.id == g]
        assert summary.last_message is None

    async def test_group_change_refusals(self, store: Store) -> None:
        g, _ = await self._trio(store)
        cases = [
            ("bob", GroupAction.ADD, ("alice",), "forbidden"),  # not an admin
            ("bob", GroupAction.RENAME, (), "forbidden"),
            ("alice", GroupAction.ADD, ("bob",), "bad_request"),  # a member already
            ("alice", GroupAction.REMOVE, ("mallory",), "not_found"),
            ("alice", GroupAction.DEMOTE, ("alice",), "bad_request"),  # the only admin
            ("mallory", GroupAction.LEAVE, (), "forbidden"),
        ]
        for by, action, names, code in cases:
            result = await self._change(store, by, action, *names)
            assert (result.refused, result.event) == (code, None), (by, action)
        dm = await store.ensure_dm("alice", "bob", 1)
        result = await store.change_group(
            NewMembership(_ids.new(), dm.id, "alice", 1, GroupAction.ADD, ("carol",))
        )
        assert result.refused == "bad_request"
        missing = await store.change_group(
            NewMembership(_ids.new(), "g:none", "alice", 1, GroupAction.LEAVE)
        )
        assert missing.refused == "not_found"
        conv = present(await store.get_conversation(g))
        assert conv.members == ("alice", "bob", "carol") and conv.admins == ("alice",)
        assert await store.owed_events("bob", 10) == []

    async def test_admins_and_the_last_admin_leaving(self, store: Store) -> None:
        g, msg = await self._trio(store)
        promoted = await self._change(store, "alice", GroupAction.PROMOTE, "carol")
        assert promoted.event.admins == ("alice", "carol")
        # An admin may delete others' messages; a plain member may not.
        bobs = new_message(g, "bob", ("alice", "carol"))
        await store.append([bobs])
        assert (
            await one_event(store, new_event(g, EventKind.DELETED, msg.id, "bob", ("alice",)))
        ).refused == "forbidden"
        assert (
            await one_event(store, new_event(g, EventKind.DELETED, bobs.id, "carol", ("alice",)))
        ).refused is None
        await self._change(store, "alice", GroupAction.LEAVE)
        await self._change(store, "carol", GroupAction.LEAVE)
        # The last admin left: the longest-standing member left takes over.
        conv = present(await store.get_conversation(g))
        assert conv.members == ("bob",) and conv.admins == ("bob",)

    # -- end-to-end devices -------------------------------------------------------

    async def test_devices_register_once_and_tombstone(self, store: Store) -> None:
        await users(store, "alice")
        phone = Device("alice", "phone-0001", "S" * 43, "D" * 43, "Phone", "G" * 86, 5)
        assert await store.put_device(phone, 4) == "created"
        renamed = Device("alice", "phone-0001", "S" * 43, "D" * 43, "My phone", "G" * 86, 9)
        assert await store.put_device(renamed, 4) == "same"
        other_keys = Device("alice", "phone-0001", "T" * 43, "D" * 43, "x", "G" * 86, 9)
        assert await store.put_device(other_keys, 4) == "conflict"
        laptop = Device("alice", "laptop-001", "L" * 43, "M" * 43, "Laptop", "H" * 86, 7)
        assert await store.put_device(laptop, 4) == "created"
        got = await store.devices("alice")
        assert [(d.device, d.name, d.created_ts, d.removed_ts) for d in got] == [
            ("phone-0001", "My phone", 5, None),
            ("laptop-001", "Laptop", 7, None),
        ]
        assert got[0].sig_key == "S" * 43 and got[0].self_sig == "G" * 86
        assert await store.remove_device("alice", "phone-0001", 20) is True
        assert await store.remove_device("alice", "phone-0001", 21) is False
        assert await store.remove_device("alice", "nope-0000", 21) is False
        assert [d.removed_ts for d in await store.devices("alice")] == [20, None]
        # A removed id stays taken, even with its old keys.
        assert await store.put_device(phone, 4) == "conflict"
        assert await store.devices("bob") == []

    async def test_devices_per_user_are_bounded(self, store: Store) -> None:
        await users(store, "alice")
        for i in range(3):
            d = Device("alice", f"device-{i:04d}", "S" * 43, "D" * 43, "", "G" * 86, i)
            assert await store.put_device(d, 3) == "created"
        extra = Device("alice", "device-9999", "S" * 43, "D" * 43, "", "G" * 86, 9)
        assert await store.put_device(extra, 3) == "full"
        again = Device("alice", "device-0001", "S" * 43, "D" * 43, "", "G" * 86, 1)
        assert await store.put_device(again, 3) == "same"

    async def test_a_device_id_is_one_users(self, store: Store) -> None:
        await users(store, "alice", "bob")
        mine = Device("alice", "shared-0001", "S" * 43, "D" * 43, "", "G" * 86, 1)
        assert await store.put_device(mine, 4) == "created"
        theirs = Device("bob", "shared-0001", "S" * 43, "D" * 43, "", "G" * 86, 2)
        assert await store.put_device(theirs, 4) == "conflict"
        assert await store.devices("bob") == []

    async def test_active_devices_of_several_users(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol")
        for user, device in [("alice", "a-phone-1"), ("alice", "a-laptop1"), ("bob", "b-phone-1")]:
            d = Device(user, device, "S" * 43, "D" * 43, "", "G" * 86, 1)
            assert await store.put_device(d, 4) == "created"
        await store.remove_device("alice", "a-laptop1", 5)
        assert await store.active_devices(["alice", "bob"]) == ["a-phone-1", "b-phone-1"]
        assert await store.active_devices(["carol"]) == []
        assert await store.active_devices([]) == []

    async def test_epochs_keep_their_device_and_shares(self, store: Store) -> None:
        await users(store, "alice", "bob")
        conv = await store.ensure_dm("alice", "bob", 1)
        share = "s" * 107
        got = await store.put_epoch(
            conv.id, "epoch-0001", "alice", "a-phone-1", {"b-one-01": share}, 5
        )
        assert got == "created"
        # More shares in a second chunk; a share sent again is kept as is.
        more = {"b-one-01": share, "b-two-02": "t" * 107}
        assert (
            await store.put_epoch(conv.id, "epoch-0001", "alice", "a-phone-1", more, 6) == "added"
        )
        epoch = await store.get_epoch(conv.id, "epoch-0001")
        assert epoch is not None
        assert (epoch.user, epoch.device, epoch.created_ts) == ("alice", "a-phone-1", 5)
        assert epoch.recipients == ("b-one-01", "b-two-02")
        # Another device's epoch id, or another share for a device: refused, unchanged.
        assert (
            await store.put_epoch(
                conv.id, "epoch-0001", "alice", "a-laptop1", {"b-thr-03": share}, 7
            )
            == "conflict"
        )
        assert (
            await store.put_epoch(
                conv.id, "epoch-0001", "alice", "a-phone-1", {"b-one-01": "u" * 107}, 7
            )
            == "conflict"
        )
        assert present(await store.get_epoch(conv.id, "epoch-0001")).recipients == (
            "b-one-01",
            "b-two-02",
        )
        assert await store.get_epoch(conv.id, "epoch-0002") is None
        # Shares only to the devices asked for, of the epochs asked for.
        shares = await store.epoch_shares(
            conv.id, ["epoch-0001", "epoch-0002"], ["b-two-02", "zz-other"]
        )
        assert [(s.epoch, s.sender, s.device, s.to, s.share) for s in shares] == [
            ("epoch-0001", "alice", "a-phone-1", "b-two-02", "t" * 107)
        ]
        # Epoch ids are per conversation.
        group = await store.create_group("g:e2e", None, ["alice", "bob"], 1, creator="alice")
        assert await store.get_epoch(group.id, "epoch-0001") is None
        assert await store.epoch_shares(group.id, ["epoch-0001"], ["b-two-02"]) == []

    async def test_the_first_e2e_message_switches_a_conversation_for_good(
        self, store: Store
    ) -> None:
        await users(store, "alice", "bob")
        conv = await store.ensure_dm("alice", "bob", 1)
        assert conv.e2e is False
        plain = new_message(conv.id, "alice", ("bob",))
        assert (await store.append([plain]))[0].seq == 1
        switch = replace(new_message(conv.id, "alice", ("bob",)), e2e=True)
        late = new_message(conv.id, "bob", ("alice",))
        got = await store.append([switch, late])
        assert got[0].seq == 2 and got[0].refused is None
        # The plain message after the switch, in the same batch: refused.
        assert got[1].refused == "e2e_required"
        assert present(await store.get_conversation(conv.id)).e2e is True
        [summary] = [s for s in await store.conversations_of("bob") if s.id == conv.id]
        assert summary.e2e is True and summary.last_seq == 2
        again = await store.append([new_message(conv.id, "bob", ("alice",))])
        assert again[0].refused == "e2e_required"
        assert [m.seq for m in await store.history(conv.id, None, 10)] == [1, 2]
        # A retry of the switch is a duplicate, not a refusal.
        assert (await store.append([switch]))[0].duplicate is True

    async def test_sent_id_finds_a_message_by_its_senders_cid(self, store: Store) -> None:
        await users(store, "alice", "bob")
        conv = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(conv.id, "alice", ("bob",), cid="c-1")
        await store.append([msg])
        assert await store.sent_id("alice", "c-1") == msg.id
        assert await store.sent_id("bob", "c-1") is None
        assert await store.sent_id("alice", "c-2") is None

    async def test_a_group_made_end_to_end(self, store: Store) -> None:
        await users(store, "alice", "bob")
        group = await store.create_group(
            "g:sealed", "t", ["alice", "bob"], 1, creator="alice", e2e=True
        )
        assert group.e2e is True
        assert present(await store.get_conversation("g:sealed")).e2e is True
        got = await store.append([new_message("g:sealed", "alice", ("bob",))])
        assert got[0].refused == "e2e_required"
        ok = await store.append([replace(new_message("g:sealed", "alice", ("bob",)), e2e=True)])
        assert ok[0].refused is None and ok[0].seq == 1

    async def test_contacts_are_everyone_sharing_a_conversation(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol", "dave")
        await store.ensure_dm("alice", "bob", 1)
        await store.create_group("g:c", None, ["alice", "carol", "bob"], 1, creator="alice")
        assert await store.contacts("alice") == ["bob", "carol"]
        assert await store.contacts("carol") == ["alice", "bob"]
        assert await store.contacts("dave") == []


class SplitStore:
    """Writes through one store, reads through another on the same database,
    as two replicas do: run the contract on it to check that what one
    process commits, another reads."""

    _READS = frozenset(
        {
            "get_user",
            "get_conversation",
            "conversations_of",
            "shares_conversation",
            "dm_peers",
            "history",
            "get_messages",
            "owed_messages",
            "owed_receipts",
            "owed_events",
            "devices",
            "contacts",
            "active_devices",
            "sent_id",
            "get_epoch",
            "epoch_shares",
            "ping",
            "list_users",
            "count_by_key",
            "messages_by_key",
            "stats",
        }
    )
    #: Everything else the port has (tests/contract/test_split_store.py
    #: checks that the two cover every method of Store, once).
    _WRITES = frozenset(
        {
            "write",
            "append",
            "mark",
            "ack_receipts",
            "create_user",
            "set_last_seen",
            "ensure_dm",
            "create_group",
            "change_group",
            "put_device",
            "remove_device",
            "put_epoch",
            "set_disabled",
            "delete_user",
            "reseal",
            "aclose",
        }
    )

    def __init__(self, writer: Store, reader: Store) -> None:
        self._writer = writer
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader if name in self._READS else self._writer, name)
