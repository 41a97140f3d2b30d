"""Messages: seq per conversation, idempotency by (sender, cid) (a retry
answers the first message and who still owes it), bodies, history paging,
replies.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

import pytest
import trio

from chatd.core.errors import NotFound
from chatd.core.model import Appended, EventKind, Mark, NewMessage, Status
from chatd.ports import Store, Writes
from chatd.testing.store_contract.helpers import (
    ContractBase,
    _ids,
    new_event,
    new_message,
    one_event,
    present,
    sealed,
    users,
)


class MessagesContract(ContractBase):
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
        batch = [
            new_message(dm.id, "alice", ("bob",), cid="c"),
            new_message(dm.id, "alice", ("bob",), cid="c"),
        ]
        out = await store.append(batch)
        assert [a.duplicate for a in out] == [False, True]
        assert out[0].id == out[1].id and out[0].seq == out[1].seq == 1
        # The repeat answers the message the first copy stored, owed to all.
        first = present(out[1].message)
        assert (first.id, first.body) == (out[0].id, batch[0].body)
        assert out[1].recipients == ("bob",)

    async def test_a_duplicate_answers_the_first_message_and_who_still_owes_it(
        self, store: Store
    ) -> None:
        """The call that stored a message may stop before routing it: its
        retry gets the message as stored (never the retry's content) and the
        recipients it has not been delivered to, to route it again."""
        g, first = await self._trio(store)
        msg = NewMessage(
            _ids.new(), g, "alice", "a-2", 6, sealed("kept"), ("bob", "carol"), first.id
        )
        await store.append([msg])

        async def retry() -> Appended:
            other = NewMessage(_ids.new(), g, "alice", "a-2", 9, sealed("retry"), ("bob",))
            [done] = (await store.write(Writes(appends=[other]))).appended
            assert done.duplicate and done.refused is None
            assert (done.id, done.conversation, done.seq, done.ts) == (msg.id, g, 2, 6)
            stored = present(done.message)
            assert (stored.id, stored.conversation, stored.seq, stored.sender) == (
                msg.id,
                g,
                2,
                "alice",
            )
            assert (stored.ts, stored.body, stored.reply_to) == (6, msg.body, first.id)
            assert not stored.deleted
            return done

        assert sorted(present((await retry()).recipients)) == ["bob", "carol"]
        await store.mark([Mark("bob", msg.id, Status.DELIVERED, 7)])
        assert present((await retry()).recipients) == ("carol",)
        # Seen implies delivered; seen by everyone, owed to no one.
        await store.mark([Mark("carol", msg.id, Status.SEEN, 8)])
        assert present((await retry()).recipients) == ()

    async def test_a_duplicate_of_a_deleted_message_is_owed_to_nobody(self, store: Store) -> None:
        g, first = await self._trio(store)
        ev = new_event(g, EventKind.DELETED, first.id, "alice", ("bob", "carol"))
        assert (await one_event(store, ev)).refused is None
        [again] = await store.append([new_message(g, "alice", ("bob", "carol"), cid="a-1")])
        assert again.duplicate and again.id == first.id and again.recipients == ()
        assert present(again.message).deleted

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

    async def test_append_to_an_unknown_conversation(self, store: Store) -> None:
        await users(store, "alice", "bob")
        with pytest.raises(NotFound):
            await store.append([new_message("dm:alice:bob", "alice", ("bob",))])
        assert await store.history("dm:alice:bob", None, 10) == []

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

    async def test_sent_id_finds_a_message_by_its_senders_cid(self, store: Store) -> None:
        await users(store, "alice", "bob")
        conv = await store.ensure_dm("alice", "bob", 1)
        msg = new_message(conv.id, "alice", ("bob",), cid="c-1")
        await store.append([msg])
        assert await store.sent_id("alice", "c-1") == msg.id
        assert await store.sent_id("bob", "c-1") is None
        assert await store.sent_id("alice", "c-2") is None
