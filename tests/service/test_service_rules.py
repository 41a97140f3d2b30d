"""The service with real ports (SQLite, memory broker) and fake connections
(issue 13: tests in the middle): the end-to-end rules, events and groups,
driven without sockets, each refusal checked for what it leaves behind."""

from __future__ import annotations

import pytest

from chatd.core.e2e import stored_text
from chatd.core.errors import BadRequest, Forbidden, NotFound
from chatd.core.frames import Ack, Delete, Edit, React, Send, Typing
from chatd.core.model import GroupAction, NewMessage, Sealed
from chatd.ports import Store, Writes
from chatd.service import ChatService
from harness.e2e_client import E2EDevice
from tests.service.test_service import FakeConn


class DeviceConn(FakeConn):
    def __init__(self, conn_id: str, user: str, device: str | None = None) -> None:
        super().__init__(conn_id, user)
        self.device = device


async def device(svc: ChatService, user: str) -> E2EDevice:
    dev = E2EDevice(user)
    assert await svc.register_device(user, dev.device, dev.keys.registration()) is True
    return dev


async def epoch(svc: ChatService, dev: E2EDevice, conv: str, members: list[str]) -> str:
    listed = {m: (await svc.user_devices(dev.username, m))["devices"] for m in members}
    epoch_id, bodies = dev.plan_epoch(conv, listed)
    for body in bodies:
        await svc.put_epoch(dev.username, conv, epoch_id, body)
    dev.use_epoch(conv, epoch_id)
    return epoch_id


def error_of(conn: FakeConn, cid: str) -> dict:
    [err] = [f for f in conn.of("error") if f.get("cid") == cid]
    return err


async def test_e2e_sends_are_checked_against_the_members_devices(svc):
    conv = (await svc.open_dm("alice", "bob")).id
    a, b = await device(svc, "alice"), await device(svc, "bob")
    ca = DeviceConn("a1", "alice", a.device)
    await epoch(svc, a, conv, ["alice", "bob"])
    sealed = a.encrypt(conv, "hello")
    # Not this connection's device: refused before anything is stored.
    with pytest.raises(Forbidden):
        await svc.send(DeviceConn("a2", "alice"), Send("x1", None, conversation=conv, e2e=sealed))
    await svc.send(ca, Send("x2", None, conversation=conv, e2e=sealed))
    await svc.flush()
    assert [f["cid"] for f in ca.of("sent")] == ["x2"]
    assert (await svc.store.get_conversation(conv)).e2e is True
    # bob adds a device: alice's epoch misses it.
    b2 = await device(svc, "bob")
    with pytest.raises(BadRequest) as stale:
        await svc.send(ca, Send("x3", None, conversation=conv, e2e=a.encrypt(conv, "again")))
    assert stale.value.extra == {"reason": "e2e_stale", "missing": [b2.device], "extra": []}
    assert len(await svc.store.history(conv, None, 10)) == 1
    # After the switch, a plain body is refused with its reason.
    with pytest.raises(BadRequest) as plain:
        await svc.send(DeviceConn("b1", "bob", b.device), Send("p1", "plain", conversation=conv))
    assert plain.value.extra["reason"] == "e2e_required"


async def test_a_plain_send_that_races_the_switch_is_refused_by_the_store(svc):
    """The service's copy of a one-to-one conversation can predate its
    switch (a cache, another replica): the store's answer is what counts."""
    conv = (await svc.open_dm("alice", "bob")).id
    a = await device(svc, "alice")
    await device(svc, "bob")
    stale_copy = await svc.store.get_conversation(conv)  # plain, as cached
    await epoch(svc, a, conv, ["alice", "bob"])
    ca = DeviceConn("a1", "alice", a.device)
    await svc.send(ca, Send("x1", None, conversation=conv, e2e=a.encrypt(conv, "s")))
    await svc.flush()
    svc._conversations[conv] = stale_copy  # the other replica's view
    cb = DeviceConn("b1", "bob")
    await svc.send(cb, Send("p1", "plain", conversation=conv))
    await svc.flush()
    assert error_of(cb, "p1")["reason"] == "e2e_required"
    assert len(await svc.store.history(conv, None, 10)) == 1
    # The refusal taught the service: its copy says end-to-end now.
    assert svc._conversations[conv].e2e is True


async def test_epoch_uploads_are_refused_for_strangers_and_foreign_devices(svc):
    conv = (await svc.open_dm("alice", "bob")).id
    a, c = await device(svc, "alice"), await device(svc, "carol")
    with pytest.raises(Forbidden):  # carol is not a member
        await svc.put_epoch("carol", conv, "epoch-0001", {"device": c.device, "shares": {}})
    with pytest.raises(Forbidden):  # not alice's device
        await svc.put_epoch("alice", conv, "epoch-0001", {"device": c.device, "shares": {}})
    _, bodies = a.plan_epoch(conv, {"carol": [c.keys.public()]})
    with pytest.raises(BadRequest) as unknown:  # a share to a non-member's device
        await svc.put_epoch("alice", conv, "epoch-0002", bodies[0])
    assert unknown.value.extra == {"unknown": [c.device]}
    assert await svc.store.get_epoch(conv, "epoch-0002") is None
    with pytest.raises(NotFound):
        await svc.put_epoch("alice", "g:nope", "epoch-0003", {"device": a.device, "shares": {}})


async def test_events_reach_the_others_and_refusals_change_nothing(svc):
    a, b = FakeConn("a1", "alice"), FakeConn("b1", "bob")
    await svc.attach(b)
    await svc.send(a, Send("m1", "hello", to="bob"))
    await svc.flush()
    [msg] = b.of("message")
    await svc.act(b, React("r1", msg["id"], "👍", True))
    await svc.act(a, Edit("e1", msg["id"], "hello!"))
    await svc.flush()
    assert [f["type"] for f in b.frames if f["type"] in ("reaction", "edited")] == ["edited"]
    assert b.of("edited")[0]["body"] == "hello!"
    # bob may not edit alice's message; carol may not even see it.
    await svc.act(b, Edit("e2", msg["id"], "mine now"))
    await svc.flush()
    assert error_of(b, "e2")["code"] == "forbidden"
    with pytest.raises(NotFound):
        await svc.act(FakeConn("c1", "carol"), Delete("d1", msg["id"]))
    [stored] = await svc.store.get_messages([msg["id"]])
    assert svc._open(stored).body == "hello!" and stored.reactions == (("👍", ("bob",)),)


async def test_typing_needs_membership_and_a_removed_member_hears_nothing(svc):
    group = await svc.create_group("alice", ["bob", "carol"], "g")
    b, c = FakeConn("b1", "bob"), FakeConn("c1", "carol")
    await svc.attach(b)
    await svc.attach(c)
    await svc.change_group("alice", group.id, GroupAction.REMOVE, ["carol"])
    await svc.typing(FakeConn("a1", "alice"), Typing(group.id))
    await svc.send(FakeConn("a1", "alice"), Send("g1", "after", conversation=group.id))
    await svc.flush()
    assert [f["type"] for f in b.frames if f["type"] in ("typing", "message")] == [
        "typing",
        "message",
    ]
    # The positive control above: bob got both. carol got the change only.
    assert [f["type"] for f in c.frames] == ["members"]
    with pytest.raises(Forbidden):
        await svc.typing(c, Typing(group.id))
    with pytest.raises(Forbidden):
        await svc.send(c, Send("g2", "let me in", conversation=group.id))


async def test_history_gives_e2e_objects_as_sent_and_never_a_body(svc):
    conv = (await svc.open_dm("alice", "bob")).id
    a = await device(svc, "alice")
    await device(svc, "bob")
    await epoch(svc, a, conv, ["alice", "bob"])
    sealed = a.encrypt(conv, "secret")
    await svc.send(
        DeviceConn("a1", "alice", a.device), Send("x1", None, conversation=conv, e2e=sealed)
    )
    await svc.flush()
    [item] = await svc.history("bob", conv, None, None)
    assert item["e2e"] == sealed and "body" not in item
    listed = [c for c in await svc.conversations("bob") if c["id"] == conv]
    assert listed[0]["e2e"] is True and listed[0]["last_message"]["e2e"] == sealed


async def test_a_retry_gets_its_first_sent_whatever_changed_since(svc):
    """protocol.md: a repeated (sender, cid) is answered with the first
    ``sent``, even when a device or the conversation's mode changed since."""
    conv = (await svc.open_dm("alice", "bob")).id
    a = await device(svc, "alice")
    await device(svc, "bob")
    ca = DeviceConn("a1", "alice", a.device)
    await svc.send(ca, Send("p1", "plain first", conversation=conv))
    await epoch(svc, a, conv, ["alice", "bob"])
    sealed = a.encrypt(conv, "sealed")
    await svc.send(ca, Send("x1", None, conversation=conv, e2e=sealed))
    await svc.flush()
    first = {f["cid"]: f["id"] for f in ca.of("sent")}
    await device(svc, "bob")  # alice's epoch is stale now
    await svc.send(ca, Send("x1", None, conversation=conv, e2e=sealed))
    await svc.send(ca, Send("p1", "plain first", conversation=conv))  # after the switch
    await svc.flush()
    again = [(f["cid"], f["id"]) for f in ca.of("sent")][2:]
    assert again == [("x1", first["x1"]), ("p1", first["p1"])]
    assert ca.of("error") == []
    assert len(await svc.store.history(conv, None, 10)) == 2


async def test_a_retry_routes_what_a_killed_replica_stored_but_never_routed(svc):
    """A replica stored a message and was killed (kill -9) before its commit
    callback routed it; the sender resends the same cid (on another
    replica): bob, online, gets the message live as it was stored (its id,
    seq, ts, body and reply_to, not the retry's), not at his next
    reconnect; alice gets the first ``sent``."""
    a1, a2, b = FakeConn("a1", "alice"), FakeConn("a2", "alice"), FakeConn("b1", "bob")
    for conn in (a1, a2, b):
        await svc.attach(conn)
    await svc.send(a1, Send("c0", "first", to="bob"))
    await svc.flush()
    [m0] = b.of("message")
    conv = m0["conversation"]
    # What the killed replica committed: stored and owed, never routed.
    mid = svc.ids.new()
    body = svc.keyring.seal(stored_text(body="as stored"), mid, conv)
    lost = NewMessage(mid, conv, "alice", "c1", 1234, body, ("bob",), reply_to=m0["id"])
    [stored] = await svc.store.append([lost])
    assert not stored.duplicate and len(b.of("message")) == 1
    await svc.send(a1, Send("c1", "as retried", to="bob"))
    await svc.flush()
    [sent] = [f for f in a1.of("sent") if f["cid"] == "c1"]
    assert (sent["id"], sent["seq"], sent["ts"]) == (mid, 2, 1234)
    again = [(f["id"], f["seq"], f["ts"], f["body"], f.get("reply_to")) for f in b.of("message")]
    assert again[1:] == [(mid, 2, 1234, "as stored", m0["id"])]
    # Owed to bob (queued until he acks it), as a first routing does; a
    # copy to alice's other device, none to the connection that sent it.
    assert mid in [e.key for e in await svc.broker.queued("bob")]
    assert [f["id"] for f in a2.of("message")] == [m0["id"], mid]
    assert a1.of("message") == []
    assert len(await svc.store.history(conv, None, 10)) == 2


async def test_a_retry_routes_nothing_owed_to_who_acked_already(svc):
    """The control: a retry after bob acked the message routes nothing owed
    to bob; carol, who has not had it, gets it again."""
    group = await svc.create_group("alice", ["bob", "carol"], "g")
    a1, b, c = FakeConn("a1", "alice"), FakeConn("b1", "bob"), FakeConn("c1", "carol")
    for conn in (a1, b, c):
        await svc.attach(conn)
    await svc.send(a1, Send("m1", "hello", conversation=group.id))
    await svc.flush()
    [m] = b.of("message")
    await svc.ack(b, Ack(ids=(m["id"],)))
    await svc.flush()
    assert await svc.broker.queued("bob") == []
    # Fresh connections: a session drops a key it offered already.
    b2, c2 = FakeConn("b2", "bob"), FakeConn("c2", "carol")
    await svc.attach(b2)
    await svc.attach(c2)
    await svc.send(a1, Send("m1", "hello?", conversation=group.id))
    await svc.flush()
    assert [f["id"] for f in a1.of("sent")] == [m["id"], m["id"]]
    assert b2.of("message") == [] and await svc.broker.queued("bob") == []
    assert [(f["id"], f["body"]) for f in c2.of("message")] == [(m["id"], "hello")]
    assert [e.key for e in await svc.broker.queued("carol")] == [m["id"]]


# -- the end-to-end mode: the store decides, the service's copy is a hint ----------


class Counting:
    """A store whose calls, but ``write`` (the group commit), are recorded:
    the reads a request makes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        real = getattr(self.store, name)

        async def call(*args, **kwargs):
            if name != "write":
                self.calls.append(name)
            return await real(*args, **kwargs)

        return call


class SwitchedFirst(Counting):
    """Another replica switches the conversation to end-to-end (``switch``,
    stored straight into the store) just before the next write with an
    event commits: after every check the service made."""

    def __init__(self, store: Store, switch: NewMessage) -> None:
        super().__init__(store)
        self.switch: NewMessage | None = switch

    async def write(self, writes: Writes):
        if writes.events and self.switch is not None:
            [done] = await self.store.append([self.switch])
            assert done.refused is None
            self.switch = None
        return await self.store.write(writes)


async def _plain_dm_cached(svc: ChatService) -> tuple[FakeConn, str, str]:
    """alice's plain message to bob, sent through ``svc`` (which caches the
    one-to-one conversation, plain): her connection, the conversation, the
    message id."""
    a1 = FakeConn("a1", "alice")
    await svc.send(a1, Send("m1", "plain first", to="bob"))
    await svc.flush()
    [sent] = a1.of("sent")
    assert svc._conversations[sent["conversation"]].e2e is False
    return a1, sent["conversation"], sent["id"]


async def _switch_on(replica: ChatService, conv: str) -> tuple[E2EDevice, str]:
    """alice switches ``conv`` to end-to-end on ``replica``: her device and
    the end-to-end message's id."""
    a = await device(replica, "alice")
    await device(replica, "bob")
    await epoch(replica, a, conv, ["alice", "bob"])
    ra = DeviceConn("r1", "alice", a.device)
    await replica.send(ra, Send("x1", None, conversation=conv, e2e=a.encrypt(conv, "sealed")))
    await replica.flush()
    [sent] = ra.of("sent")
    return a, sent["id"]


async def test_a_stale_copy_lets_no_plain_edit_into_an_e2e_conversation(svc, replica):
    """Another replica switched the one-to-one conversation; this one's
    copy still says plain. A plain edit costs no conversation read: it goes
    to the store, which refuses it (``e2e_required``), changing nothing,
    and the service learns the mode from that answer."""
    a1, conv, mid = await _plain_dm_cached(svc)
    await _switch_on(replica, conv)
    svc.store = counting = Counting(svc.store)
    await svc.act(a1, Edit("e1", mid, "sneaked in"))
    await svc.flush()
    assert error_of(a1, "e1")["reason"] == "e2e_required"
    assert a1.of("applied") == []
    assert counting.calls == ["get_messages"]  # the message; no conversation read
    [stored] = await svc.store.get_messages([mid])
    assert (svc._open(stored).body, stored.edits) == ("plain first", 0)
    assert svc._conversations[conv].e2e is True
    # From now on the service's own copy answers, before the store.
    with pytest.raises(BadRequest) as again:
        await svc.act(a1, Edit("e2", mid, "again"))
    assert again.value.extra == {"reason": "e2e_required"}


async def test_a_plain_edit_that_races_the_switch_is_refused_by_the_store(svc):
    """The switch commits after every check the service made (its copy and
    the store both said plain then), just before the edit's write: the
    store judges the edit against the mode in its own transaction."""
    a1, conv, mid = await _plain_dm_cached(svc)
    seal = Sealed("k1", b"n" * 12, b"sealed elsewhere")
    switch = NewMessage(svc.ids.new(), conv, "bob", "x-elsewhere", 9, seal, ("alice",), e2e=True)
    svc.store = SwitchedFirst(svc.store, switch)
    await svc.act(a1, Edit("e1", mid, "just in time?"))
    await svc.flush()
    assert error_of(a1, "e1")["reason"] == "e2e_required"
    [stored] = await svc.store.get_messages([mid])
    assert (svc._open(stored).body, stored.edits) == ("plain first", 0)
    assert await svc.store.owed_events("bob", 10) == []
    assert svc._conversations[conv].e2e is True


async def test_an_e2e_edit_on_a_replica_whose_copy_is_plain(svc, replica):
    """The other way round: the copy says plain, the edit is end-to-end.
    The service asks the store (one read) rather than answer ``e2e_off``,
    and learns the mode; the edit is applied."""
    _, conv, _ = await _plain_dm_cached(svc)
    a, x1 = await _switch_on(replica, conv)
    ca = DeviceConn("a2", "alice", a.device)
    await svc.act(ca, Edit("e1", x1, None, e2e=a.encrypt(conv, "sealed!", edit_of=x1)))
    await svc.flush()
    assert [f["cid"] for f in ca.of("applied")] == ["e1"] and ca.of("error") == []
    assert svc._conversations[conv].e2e is True


async def test_a_plain_edit_reads_no_conversation(svc):
    """The service's copy knows the mode: a plain edit reads the message it
    edits and nothing else (the store judges the mode as it applies it)."""
    a1, _, mid = await _plain_dm_cached(svc)
    svc.store = counting = Counting(svc.store)
    await svc.act(a1, Edit("e1", mid, "plain second"))
    await svc.flush()
    assert [f["cid"] for f in a1.of("applied")] == ["e1"]
    assert counting.calls == ["get_messages"]


async def test_an_e2e_send_makes_one_store_read(svc):
    """The epoch and the members' active devices come in one read, still
    against the store as it is now: ``e2e_stale`` stays exact."""
    conv = (await svc.open_dm("alice", "bob")).id
    a, b = await device(svc, "alice"), await device(svc, "bob")
    await epoch(svc, a, conv, ["alice", "bob"])
    ca = DeviceConn("a1", "alice", a.device)
    await svc.send(ca, Send("x1", None, conversation=conv, e2e=a.encrypt(conv, "first")))
    await svc.flush()  # the one-to-one conversation is cached from here on
    svc.store = counting = Counting(svc.store)
    await svc.send(ca, Send("x2", None, conversation=conv, e2e=a.encrypt(conv, "second")))
    await svc.flush()
    assert counting.calls == ["epoch_check"]
    assert [f["cid"] for f in ca.of("sent")] == ["x1", "x2"]
    # bob swaps his device: the epoch misses the new one, shares the removed one.
    b2 = await device(svc, "bob")
    await svc.remove_device("bob", b.device)
    counting.calls.clear()
    with pytest.raises(BadRequest) as stale:
        await svc.send(ca, Send("x3", None, conversation=conv, e2e=a.encrypt(conv, "third")))
    assert stale.value.extra == {
        "reason": "e2e_stale",
        "missing": [b2.device],
        "extra": [b.device],
    }
    # The check, then the refusal's look for a stored retry of the cid.
    assert counting.calls == ["epoch_check", "sent_id"]
