"""The service with real ports (SQLite, memory broker) and fake connections:
no sockets, so paging and resync can be checked exactly."""

import json

import pytest
import trio

from chatd import service as service_mod
from chatd.core.frames import Ack, Seen, Send
from chatd.core.session import Outbound, Session
from chatd.service import connections as backlog_mod


class FakeConn:
    def __init__(self, conn_id: str, user: str) -> None:
        self.id = conn_id
        self.user = user
        self.device: str | None = None
        self.session = Session(rate=0)
        self.session.authenticated(user)
        self.session.finish_backlog()
        self.frames: list[dict] = []
        self.arrived = trio.Event()

    def offer(self, item: Outbound) -> None:
        for out in self.session.offer(item):
            self.frames.append(json.loads(out.data))
            self.arrived.set()

    def reply(self, item: Outbound) -> None:
        self.frames.append(json.loads(item.data))

    def close_soon(self, code: int, reason: str) -> None:
        pass

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def of(self, kind: str) -> list[dict]:
        return [f for f in self.frames if f["type"] == kind]


async def resync_pass(svc, monkeypatch, users=None) -> list[str]:
    """``svc.resync(users)``, then wait until the pass it starts has gone
    through every user it re-offers to (the barrier for "nothing more was
    offered"); the users of that pass."""
    reoffer = svc.reoffer
    passes: list[list[str]] = []
    done = trio.Event()

    async def recorded(pass_users):
        try:
            return await reoffer(pass_users)
        finally:
            passes.append(list(pass_users))
            done.set()

    monkeypatch.setattr(svc, "reoffer", recorded)
    try:
        svc.resync(users)
        with trio.fail_after(5):
            await done.wait()
    finally:
        monkeypatch.setattr(svc, "reoffer", reoffer)
    return passes[0]


async def collect_backlog(svc, user):
    got = []

    async def emit(items):
        got.append(items)

    await svc.backlog(user, emit)
    return got


async def test_backlog_comes_in_pages_and_in_order(svc, monkeypatch):
    monkeypatch.setattr(backlog_mod, "BACKLOG_PAGE", 3)
    a = FakeConn("a1", "alice")
    for i in range(8):
        await svc.send(a, Send(f"c{i}", f"m{i}", to="bob"))
        await svc.flush()
    for i in range(2):
        await svc.send(a, Send(f"g{i}", f"x{i}", to="carol"))
        await svc.flush()
    pages = await collect_backlog(svc, "bob")
    assert [len(p) for p in pages] == [3, 3, 2]
    frames = [json.loads(o.data) for p in pages for o in p]
    assert [f["body"] for f in frames] == [f"m{i}" for i in range(8)]
    assert [f["seq"] for f in frames] == list(range(1, 9))


async def test_receipts_backlog_pages_by_member(svc, monkeypatch):
    monkeypatch.setattr(backlog_mod, "BACKLOG_PAGE", 2)
    a, b = FakeConn("a1", "alice"), FakeConn("b1", "bob")
    await svc.attach(b)
    for i in range(3):
        await svc.send(a, Send(f"c{i}", f"m{i}", to="bob"))
        await svc.flush()
    ids = [f["id"] for f in b.of("message")]
    assert len(ids) == 3
    await svc.seen(b, Seen(tuple(ids)))
    await svc.flush()
    pages = await collect_backlog(svc, "alice")
    receipts = [json.loads(o.data) for p in pages for o in p]
    assert sorted((r["id"], r["status"]) for r in receipts) == sorted(
        (i, s) for i in ids for s in ("delivered", "seen")
    )
    assert len(pages) == 2  # 3 (message, member) pairs in pages of 2


async def test_stale_queue_entries_are_settled(svc):
    a = FakeConn("a1", "alice")
    await svc.send(a, Send("c1", "hi", to="bob"))
    await svc.flush()
    [entry] = await svc.broker.queued("bob")
    [msg] = await svc.store.owed_messages("bob", 10)
    # Delivered as the store records it, but the queue did not hear (a
    # lost settle): the next backlog offers nothing and cleans the queue.
    from chatd.core.model import Mark, Status

    await svc.store.mark([Mark("bob", msg.id, Status.DELIVERED, 1)])
    assert await collect_backlog(svc, "bob") == []
    assert await svc.broker.queued("bob") == []
    assert entry.key == msg.id


async def test_resync_offers_what_live_delivery_missed(svc, monkeypatch):
    a, b = FakeConn("a1", "alice"), FakeConn("b1", "bob")
    await svc.send(a, Send("c1", "sent while bob's node was cut off", to="bob"))
    await svc.flush()
    svc.hub.add(b)  # bob is connected but missed the live copy
    assert b.of("message") == []
    svc.resync()
    with trio.fail_after(5):
        await b.arrived.wait()
    assert b.of("message")[0]["body"] == "sent while bob's node was cut off"
    # Offered once per connection, even if resync runs again (its pass over
    # bob is done: that is when it would have come).
    assert "bob" in await resync_pass(svc, monkeypatch)
    assert len(b.of("message")) == 1


async def test_resync_is_paced_and_can_name_its_users(svc, monkeypatch):
    """At most resync_concurrency backlogs at once; resync(users) re-offers
    to those users only; a failed user is retried."""
    names = [f"user{i}" for i in range(12)]
    for name in names:
        await svc.register(name, "password123")
    a = FakeConn("a1", "alice")
    for i, name in enumerate(names):
        await svc.send(a, Send(f"c{i}", f"for {name}", to=name))
    await svc.flush()
    conns = {name: FakeConn(f"{name}-1", name) for name in names}
    for conn in conns.values():
        svc.hub.add(conn)

    running = peak = 0
    backlog = svc.backlog

    async def slow_backlog(user, emit):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await trio.sleep(0.02)
            await backlog(user, emit)
        finally:
            running -= 1

    monkeypatch.setattr(svc, "backlog", slow_backlog)
    svc.resync_concurrency = 3
    assert await resync_pass(svc, monkeypatch, names[:2]) == names[:2]
    with trio.fail_after(5):
        for name in names[:2]:
            await conns[name].arrived.wait()
    # That pass is over: the others were not offered anything.
    assert all(conns[n].of("message") == [] for n in names[2:])

    svc.resync()
    with trio.fail_after(5):
        for name in names:
            await conns[name].arrived.wait()
    assert peak == 3
    assert all(len(conns[n].of("message")) == 1 for n in names)


async def test_ack_of_foreign_ids_is_reported_not_applied(svc):
    a, c = FakeConn("a1", "alice"), FakeConn("c1", "carol")
    await svc.send(a, Send("c1", "for bob", to="bob"))
    await svc.flush()
    [msg] = await svc.store.owed_messages("bob", 10)
    await svc.ack(c, Ack(ids=(msg.id, "nope")))
    await svc.flush()
    [refused] = c.of("error")
    assert refused["code"] == "not_found" and refused["ids"] == [msg.id, "nope"]
    assert [m.id for m in await svc.store.owed_messages("bob", 10)] == [msg.id]


# -- replies, reactions, edits, deletions; groups that change ------------------------------


async def test_an_event_is_applied_then_routed_once_per_device(svc):
    from chatd.core.frames import Delete, Edit, React

    a1, a2, b = FakeConn("a1", "alice"), FakeConn("a2", "alice"), FakeConn("b", "bob")
    for conn in (a1, a2, b):
        await svc.attach(conn)
    await svc.send(a1, Send("s1", "hi bob", to="bob"))
    await svc.flush()
    [sent] = a1.of("sent")
    await svc.act(b, React("r1", sent["id"], "👍", True))
    await svc.act(b, React("r1", sent["id"], "👍", True))  # a retry: answered, not routed
    await svc.act(a1, Edit("e1", sent["id"], "hi Bob"))
    await svc.act(a1, Delete("d1", sent["id"]))
    await svc.flush()
    first, again = b.of("applied")
    assert first == again and first["action"] == "react"
    # The actor's other device gets a copy; the acting one only `applied`.
    assert [f["type"] for f in a2.frames if f["type"] != "message"] == [
        "reaction",
        "edited",
        "deleted",
    ]
    assert [f["type"] for f in a1.frames if f["type"] in ("edited", "deleted")] == []
    assert [f["type"] for f in b.frames if f["type"] in ("reaction", "edited", "deleted")] == [
        "edited",
        "deleted",
    ]
    assert [f["eseq"] for f in a1.of("reaction")] == [1]  # bob's reaction, once
    assert set(svc.metrics.events) == {"reaction", "edited", "deleted", "members"}


async def test_the_backlog_offers_messages_then_events_then_receipts(svc):
    from chatd.core.frames import React

    a = FakeConn("a", "alice")
    await svc.attach(a)
    await svc.send(a, Send("s1", "one", to="bob"))
    await svc.flush()
    [sent] = a.of("sent")
    b = FakeConn("b", "bob")
    await svc.attach(b)
    await svc.ack(b, Ack(ids=(sent["id"],)))
    await svc.send(b, Send("s2", "two", to="alice"))
    await svc.flush()
    await svc.act(b, React("r", sent["id"], "🎉", True))
    await svc.flush()
    svc.hub.remove(a)
    pages = await collect_backlog(svc, "alice")
    kinds = [json.loads(o.data)["type"] for page in pages for o in page]
    assert kinds == ["message", "reaction", "receipt"]


async def test_group_changes_route_to_old_and_new_members(svc):
    from chatd.core.model import GroupAction

    await svc.register("dave", "password123")
    conns = {u: FakeConn(u, u) for u in ("alice", "bob", "carol", "dave")}
    for conn in conns.values():
        await svc.attach(conn)
    group = await svc.create_group("alice", ["bob", "carol"], "g")
    out = await svc.change_group("alice", group.id, GroupAction.ADD, ["Dave"])
    assert out["members"] == ["alice", "bob", "carol", "dave"]
    out = await svc.change_group("alice", group.id, GroupAction.REMOVE, ["bob"])
    for user, conn in conns.items():
        # bob hears of his own removal; dave of everything since he joined.
        assert [f["action"] for f in conn.of("members")] == ["add", "remove"], user
    await svc.send(conns["carol"], Send("c1", "after", conversation=group.id))
    await svc.flush()
    assert conns["bob"].of("message") == []
    assert [m["body"] for m in conns["dave"].of("message")] == ["after"]
    with pytest.raises(service_mod.Forbidden):
        await svc.change_group("bob", group.id, GroupAction.RENAME, title="mine")
    with pytest.raises(service_mod.NotFound):
        await svc.change_group("alice", group.id, GroupAction.ADD, ["nobody"])
