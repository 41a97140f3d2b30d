"""The Store port's outage contract: "unavailable, nothing else escapes".

While its backend is away, every method of a store raises
:class:`chatd.core.errors.Unavailable`, never the client library's own
exception (sqlite3's, pymongo's) nor anything else; a call refused that way
leaves nothing behind; once the backend is back the same store works again,
without being reopened.

Use it by subclassing in a test module and providing a ``down`` fixture
that yields a :class:`Down`: a store with some data in reach, and a switch
that takes its backend away (:mod:`chatd.testing.outage` has switches for
SQLite and MongoDB)::

    class TestSqliteStoreOutage(StoreOutageContract):
        @pytest.fixture(params=sorted(SQLITE_FAILURES))
        async def down(self, tmp_path, request):
            store = SqliteStore.open(tmp_path)
            yield Down(store, sqlite_outage(store, request.param))
            await store.aclose()

A store whose method lets something else escape (or does not recover) lists
it in :attr:`Down.escapes` / :attr:`Down.mid_call_escapes` (method name ->
reason): that case is then an expected failure, and a failure once it no
longer escapes (so the lists stay true).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import pytest
import trio

from chatd.core.errors import Unavailable
from chatd.core.model import (
    Device,
    EventKind,
    GroupAction,
    Mark,
    NewMembership,
    ReceiptKey,
    Sealed,
    Status,
    User,
)
from chatd.ports import Reseal, Store, Writes
from chatd.testing.store_contract.helpers import _ids, new_event, new_message, sealed, users


class Switch(Protocol):
    def begin(self) -> None: ...

    def begin_after(self, calls: int) -> None:
        """Begin after ``calls`` more calls into the backend have gone through."""

    def end(self) -> None: ...


@dataclass
class Down:
    """A fresh, empty store and the switch that takes its backend away."""

    store: Store
    outage: Switch
    #: Methods known to let something other than Unavailable escape (or not
    #: to recover) in an outage, with why.
    escapes: Mapping[str, str] = field(default_factory=dict)
    #: The same, for an outage that begins in the middle of a call.
    mid_call_escapes: Mapping[str, str] = field(default_factory=dict)


@dataclass
class World:
    """What the calls below name, made before the outage."""

    dm: str
    group: str
    message: str
    message_body: Sealed
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter):05d}"

    @classmethod
    async def make(cls, store: Store) -> World:
        await users(store, "alice", "bob", "carol")
        dm = await store.ensure_dm("alice", "bob", 1)
        group = await store.create_group(
            "g:out", "t", ["alice", "bob", "carol"], 1, creator="alice"
        )
        msg = new_message(dm.id, "alice", ("bob",), cid="m-cid")
        await store.append([msg])
        phone = Device("alice", "phone-0001", "S" * 43, "D" * 43, "Phone", "G" * 86, 1)
        await store.put_device(phone, 8)
        await store.put_epoch(
            dm.id, "epoch-0001", "alice", "phone-0001", {"b-dev-01": "s" * 107}, 1
        )
        return cls(dm.id, group.id, msg.id, msg.body)


Call = Callable[[Store, World], Awaitable[object]]


def _write(s: Store, w: World) -> Awaitable[object]:
    msg = new_message(w.dm, "bob", ("alice",))
    react = new_event(w.dm, EventKind.REACTION, w.message, "bob", ("alice",), emoji="👍")
    return s.write(
        Writes(
            appends=[msg],
            events=[react],
            marks=[Mark("bob", w.message, Status.SEEN, 7)],
            receipt_acks=[("alice", ReceiptKey(w.message, "bob", Status.SEEN))],
            event_acks=[("alice", "no-such-event")],
        )
    )


#: One call of every method of the port (but ``aclose``), each with arguments
#: that need the backend (no empty batch a store may answer by itself).
CALLS: dict[str, Call] = {
    "create_user": lambda s, w: s.create_user(User(w.fresh("user"), "h", 1)),
    "get_user": lambda s, w: s.get_user("alice"),
    "set_last_seen": lambda s, w: s.set_last_seen("alice", 99),
    "ensure_dm": lambda s, w: s.ensure_dm("bob", "carol", 2),
    "create_group": lambda s, w: s.create_group(
        w.fresh("g:"), None, ["alice", "bob"], 2, creator="alice"
    ),
    "get_conversation": lambda s, w: s.get_conversation(w.dm),
    "change_group": lambda s, w: s.change_group(
        NewMembership(_ids.new(), w.group, "alice", 20, GroupAction.RENAME, (), w.fresh("t"))
    ),
    "conversations_of": lambda s, w: s.conversations_of("alice"),
    "shares_conversation": lambda s, w: s.shares_conversation("alice", "bob"),
    "dm_peers": lambda s, w: s.dm_peers("alice"),
    "sent_id": lambda s, w: s.sent_id("alice", "m-cid"),
    "append": lambda s, w: s.append([new_message(w.dm, "alice", ("bob",))]),
    "history": lambda s, w: s.history(w.dm, None, 10),
    "get_messages": lambda s, w: s.get_messages([w.message]),
    "mark": lambda s, w: s.mark([Mark("bob", w.message, Status.DELIVERED, 5)]),
    "ack_receipts": lambda s, w: s.ack_receipts(
        [("alice", ReceiptKey(w.message, "bob", Status.DELIVERED))]
    ),
    "write": _write,
    "owed_messages": lambda s, w: s.owed_messages("bob", 10),
    "owed_events": lambda s, w: s.owed_events("alice", 10),
    "owed_receipts": lambda s, w: s.owed_receipts("alice", 10),
    "put_device": lambda s, w: s.put_device(
        Device("alice", w.fresh("dev-"), "S" * 43, "D" * 43, "", "G" * 86, 2), 8
    ),
    "remove_device": lambda s, w: s.remove_device("alice", "phone-0001", 9),
    "devices": lambda s, w: s.devices("alice"),
    "contacts": lambda s, w: s.contacts("alice"),
    "active_devices": lambda s, w: s.active_devices(["alice", "bob"]),
    "put_epoch": lambda s, w: s.put_epoch(
        w.dm, w.fresh("epoch-"), "alice", "phone-0001", {"b-dev-01": "s" * 107}, 5
    ),
    "get_epoch": lambda s, w: s.get_epoch(w.dm, "epoch-0001"),
    "epoch_check": lambda s, w: s.epoch_check(w.dm, "epoch-0001", ["alice", "bob"]),
    "epoch_shares": lambda s, w: s.epoch_shares(w.dm, ["epoch-0001"], ["b-dev-01"]),
    "list_users": lambda s, w: s.list_users(None, 10),
    "set_disabled": lambda s, w: s.set_disabled("carol", True),
    "delete_user": lambda s, w: s.delete_user("carol"),
    "stats": lambda s, w: s.stats(0),
    "count_by_key": lambda s, w: s.count_by_key(),
    "messages_by_key": lambda s, w: s.messages_by_key("k1", None, 10),
    "reseal": lambda s, w: s.reseal([Reseal(w.message, w.message_body, sealed("r", "k2"))]),
    "ping": lambda s, w: s.ping(),
}

#: Port methods not called during an outage: closing is not an operation on
#: the backend.
NOT_CALLED = frozenset({"aclose"})


async def _outcome(call: Awaitable[object]) -> object:
    """What ``call`` raised (an Exception, kept as it is), or what it returned."""
    try:
        return await call
    except Exception as exc:
        return exc


def _describe(got: object) -> str:
    if isinstance(got, BaseException):
        return f"raised {type(got).__module__}.{type(got).__qualname__}: {got}"
    return f"returned {got!r} with its backend away"


async def _recovered(store: Store, world: World, method: str) -> str | None:
    """None if, the backend back, ``method`` goes through again and the store
    reads and writes; else what went wrong."""
    for what, call in (
        (method, CALLS[method]),
        ("append", CALLS["append"]),
        ("get_messages", CALLS["get_messages"]),
    ):
        got = await _outcome(call(store, world))
        if isinstance(got, BaseException):
            return f"after the outage ended, {what} {_describe(got)}"
    return None


def _judge(down: Down, known: Mapping[str, str], method: str, problem: str | None) -> None:
    """Fail on ``problem``, unless ``known`` lists ``method`` (then an expected
    failure, and a failure if there is no problem any more)."""
    if method in known:
        if problem is None:
            pytest.fail(f"{method} is listed as escaping but no longer does: unlist it")
        pytest.xfail(f"{known[method]} [{problem}]")
    assert problem is None, problem


class StoreOutageContract:
    @pytest.fixture
    async def down(self) -> Down:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def test_every_method_of_the_port_is_called(self) -> None:
        methods = {n for n, v in vars(Store).items() if callable(v) and not n.startswith("_")}
        assert methods == set(CALLS) | NOT_CALLED

    @pytest.mark.parametrize("method", sorted(CALLS))
    async def test_unavailable_and_nothing_else_while_the_backend_is_away(
        self, down: Down, method: str
    ) -> None:
        """Every call during the outage raises Unavailable; once it ends, the
        same call goes through on the same store, and the store works."""
        world = await World.make(down.store)
        down.outage.begin()
        try:
            got = await _outcome(CALLS[method](down.store, world))
        finally:
            down.outage.end()
        problem = None
        if not isinstance(got, Unavailable):
            problem = f"{method} {_describe(got)}"
        else:
            problem = await _recovered(down.store, world, method)
        _judge(down, down.escapes, method, problem)

    @pytest.mark.parametrize("method", sorted(CALLS))
    async def test_an_outage_that_begins_in_the_middle_of_a_call(
        self, down: Down, method: str
    ) -> None:
        """The backend goes away after the call's first operation on it (and
        so stays away for any clean-up the call does): the call may have done
        its work or not, but it returns or raises Unavailable, nothing else,
        and once the backend is back the store works."""
        world = await World.make(down.store)
        down.outage.begin_after(1)
        try:
            got = await _outcome(CALLS[method](down.store, world))
        finally:
            down.outage.end()
        problem = None
        if isinstance(got, BaseException) and not isinstance(got, Unavailable):
            problem = f"{method} {_describe(got)}"
        else:
            problem = await _recovered(down.store, world, method)
        _judge(down, down.mid_call_escapes, method, problem)

    async def test_a_call_refused_in_an_outage_leaves_nothing_behind(self, down: Down) -> None:
        store = down.store
        world = await World.make(store)
        down.outage.begin()
        try:
            outcomes: list[object] = []

            async def one(method: str) -> None:
                outcomes.append(await _outcome(CALLS[method](store, world)))

            async with trio.open_nursery() as nursery:
                for method in ("append", "write", "append", "mark", "history", "create_user"):
                    nursery.start_soon(one, method)
        finally:
            down.outage.end()
        if not all(isinstance(o, Unavailable) for o in outcomes):
            escaped = [_describe(o) for o in outcomes if not isinstance(o, Unavailable)]
            if set(down.escapes) & {"append", "write", "mark", "history", "create_user"}:
                pytest.xfail(f"listed in escapes: {escaped}")
            pytest.fail(f"not Unavailable: {escaped}")
        # No seq was used up, no user made, no receipt moved.
        [done] = await store.append([new_message(world.dm, "alice", ("bob",))])
        assert done.seq == 2 and not done.duplicate
        assert [u.username for u in await store.list_users(None, 10)] == ["alice", "bob", "carol"]
        assert await store.owed_receipts("alice", 10) == []

    async def test_the_store_works_again_after_an_outage(self, down: Down) -> None:
        store = down.store
        world = await World.make(store)
        for _ in range(2):  # a second outage after recovering is no different
            down.outage.begin()
            try:
                got = await _outcome(store.ping())
            finally:
                down.outage.end()
            assert isinstance(got, Unavailable), _describe(got)
            await store.ping()
            await store.create_user(User(world.fresh("later"), "h", 3))
            msg = new_message(world.dm, "bob", ("alice",))
            [done] = await store.append([msg])
            assert not done.duplicate and done.refused is None
            [r] = await store.mark([Mark("alice", msg.id, Status.SEEN, 9)])
            assert [t.status for t in r.transitions] == [Status.DELIVERED, Status.SEEN]
            assert (await store.history(world.dm, None, 10))[-1].id == msg.id
