"""Receipts and what is owed: delivered/seen transitions, owed messages and
receipts with their paging, acks, and one ``write`` doing all of it.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

import trio

from chatd.core.model import (
    Mark,
    NewMessage,
    Receipt,
    ReceiptKey,
    Status,
)
from chatd.ports import Store, Writes
from chatd.testing.store_contract.helpers import (
    ContractBase,
    _ids,
    new_message,
    sealed,
    users,
)


class ReceiptsContract(ContractBase):
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
        made: list[Receipt] = []

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
