"""End-to-end: devices (registered once, bounded, tombstoned), epochs and
their shares (and the one read a send is checked against), conversations
switched to end-to-end, and edits judged against the mode.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

from dataclasses import replace

from chatd.core.model import Device, EventKind, NewEvent
from chatd.ports import Store, Writes
from chatd.testing.store_contract.helpers import (
    ContractBase,
    new_event,
    new_message,
    one_event,
    present,
    users,
)


class DevicesContract(ContractBase):
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

    async def test_an_epoch_check_reads_the_epoch_and_the_devices_at_once(
        self, store: Store
    ) -> None:
        await users(store, "alice", "bob", "carol")
        conv = await store.ensure_dm("alice", "bob", 1)
        for user, device in [("alice", "a-phone-1"), ("bob", "b-phone-1"), ("bob", "b-old-001")]:
            d = Device(user, device, "S" * 43, "D" * 43, "", "G" * 86, 1)
            assert await store.put_device(d, 4) == "created"
        await store.put_device(Device("carol", "c-phone-1", "S" * 43, "D" * 43, "", "G" * 86, 1), 4)
        await store.remove_device("bob", "b-old-001", 3)
        shares = {"b-phone-1": "s" * 107, "b-old-001": "t" * 107}
        assert await store.put_epoch(conv.id, "epoch-0001", "alice", "a-phone-1", shares, 5) == (
            "created"
        )
        check = await store.epoch_check(conv.id, "epoch-0001", ["alice", "bob"])
        assert check.epoch == await store.get_epoch(conv.id, "epoch-0001")
        assert present(check.epoch).recipients == ("b-old-001", "b-phone-1")
        # The members' active devices (not a removed one, nobody else's).
        assert check.active == ("a-phone-1", "b-phone-1")
        none = await store.epoch_check(conv.id, "epoch-0002", ["alice", "bob"])
        assert none.epoch is None and none.active == ("a-phone-1", "b-phone-1")
        # What it reads is what is stored now: a device added since shows.
        await store.put_device(Device("bob", "b-new-001", "S" * 43, "D" * 43, "", "G" * 86, 9), 4)
        again = await store.epoch_check(conv.id, "epoch-0001", ["alice", "bob"])
        assert again.active == ("a-phone-1", "b-new-001", "b-phone-1")

    async def test_an_edit_must_fit_the_conversations_mode(self, store: Store) -> None:
        """As for appends, the store judges an edit against the mode it
        holds (the service's copy may be stale): a plain edit in an
        end-to-end conversation is refused ``e2e_required``, an end-to-end
        edit in a plain one ``e2e_off``; a refused edit changes nothing."""
        await users(store, "alice", "bob")
        conv = (await store.ensure_dm("alice", "bob", 1)).id
        first = new_message(conv, "alice", ("bob",), ts=5)
        await store.append([first])

        def edit(message_id: str, e2e: bool) -> NewEvent:
            return new_event(conv, EventKind.EDITED, message_id, "alice", ("bob",), e2e=e2e)

        off = await one_event(store, edit(first.id, True))
        assert (off.refused, off.event) == ("e2e_off", None)
        assert (await one_event(store, edit(first.id, False))).refused is None  # the control
        # The switch and a plain edit in one write: the edit comes after it.
        switch = replace(new_message(conv, "alice", ("bob",), ts=6), e2e=True)
        done = await store.write(Writes(appends=[switch], events=[edit(first.id, False)]))
        assert done.appended[0].refused is None
        assert done.events[0].refused == "e2e_required" and done.events[0].event is None
        # Old plain messages and the end-to-end one alike, from now on.
        for message in (first, switch):
            assert (await one_event(store, edit(message.id, False))).refused == "e2e_required"
            assert (await one_event(store, edit(message.id, True))).refused is None
        # Two edits applied (eseq 1, 2, 3), no refused one stored or owed.
        assert [e.eseq for e in await store.owed_events("bob", 10)] == [1, 2, 3]
        got = {m.id: m.edits for m in await store.history(conv, None, 10)}
        assert got == {first.id: 2, switch.id: 1}

    async def test_an_edit_in_a_group_made_end_to_end(self, store: Store) -> None:
        await users(store, "alice", "bob")
        await store.create_group("g:sealed", "t", ["alice", "bob"], 1, creator="alice", e2e=True)
        msg = replace(new_message("g:sealed", "alice", ("bob",), ts=5), e2e=True)
        await store.append([msg])
        plain = new_event("g:sealed", EventKind.EDITED, msg.id, "alice", ("bob",))
        assert (await one_event(store, plain)).refused == "e2e_required"
        sealed = replace(plain, id=plain.id + "x", cid="c-sealed", e2e=True)
        assert (await one_event(store, sealed)).refused is None
        [got] = await store.history("g:sealed", None, 10)
        assert got.edits == 1
