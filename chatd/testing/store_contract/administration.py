"""The operator's side: listing, disabling and deleting users, stats, the
key-rotation reads and reseal, ping.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

import pytest

from chatd.core.errors import Conflict, NotFound
from chatd.core.model import (
    Mark,
    ReceiptKey,
    Status,
    User,
)
from chatd.ports import Reseal, Store
from chatd.testing.store_contract.helpers import (
    ContractBase,
    new_message,
    sealed,
    users,
)


class AdministrationContract(ContractBase):
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
