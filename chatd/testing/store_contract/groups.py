"""Groups that change: membership events, who gets a message, what a member
added later may read, admins.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

from chatd.core.model import (
    EventKind,
    GroupAction,
    NewMembership,
)
from chatd.ports import Store
from chatd.testing.store_contract.helpers import (
    ContractBase,
    _ids,
    new_event,
    new_message,
    one_event,
    present,
    users,
)


class GroupsContract(ContractBase):
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
