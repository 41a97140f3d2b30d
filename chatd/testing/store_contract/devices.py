"""End-to-end: devices (registered once, bounded, tombstoned), epochs and
their shares, and conversations switched to end-to-end.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

from dataclasses import replace

from chatd.core.model import (
    Device,
)
from chatd.ports import Store
from chatd.testing.store_contract.helpers import (
    ContractBase,
    new_message,
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
