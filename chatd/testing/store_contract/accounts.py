"""Users and conversations: accounts, direct messages, groups as made,
who shares a conversation with whom, and the conversation list.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

import pytest
import trio

from chatd.core.errors import Conflict
from chatd.core.model import (
    Mark,
    Status,
    User,
)
from chatd.ports import Store
from chatd.testing.store_contract.helpers import (
    ContractBase,
    new_message,
    present,
    users,
)


class AccountsContract(ContractBase):
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

    async def test_a_taken_group_id_is_conflict(self, store: Store) -> None:
        await users(store, "alice", "bob")
        await store.create_group("g:1", None, ["alice", "bob"], 1)
        with pytest.raises(Conflict):
            await store.create_group("g:1", "other", ["alice", "bob"], 2)

    async def test_group_creator_is_kept(self, store: Store) -> None:
        await users(store, "alice", "bob")
        await store.create_group("g:c", None, ["alice", "bob"], 1, creator="alice")
        conv = await store.get_conversation("g:c")
        assert conv is not None and conv.created_by == "alice"
        dm = await store.ensure_dm("alice", "bob", 1)
        assert dm.created_by is None

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

    async def test_contacts_are_everyone_sharing_a_conversation(self, store: Store) -> None:
        await users(store, "alice", "bob", "carol", "dave")
        await store.ensure_dm("alice", "bob", 1)
        await store.create_group("g:c", None, ["alice", "carol", "bob"], 1, creator="alice")
        assert await store.contacts("alice") == ["bob", "carol"]
        assert await store.contacts("carol") == ["alice", "bob"]
        assert await store.contacts("dave") == []
