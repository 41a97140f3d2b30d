"""Events on messages: reactions, edits, deletions, their eseq, idempotency,
refusals and what each leaves owed.

Part of :class:`chatd.testing.store_contract.StoreContract`.
"""

from __future__ import annotations

from chatd.core.events import MAX_REACTIONS_PER_USER
from chatd.core.model import (
    EventKind,
    Mark,
    Status,
)
from chatd.ports import Store, Writes
from chatd.testing.store_contract.helpers import (
    ContractBase,
    new_event,
    new_message,
    one_event,
    present,
    sealed,
)


class EventsContract(ContractBase):
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
