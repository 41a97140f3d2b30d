"""The Broker port's contract, as a test suite any implementation runs unchanged.

Subclass it and provide ``brokers``: an async fixture yielding a factory
``make() -> Broker`` whose brokers all share one backend (for the memory
broker, the same instance every time; for Redis, a new client on the same
server), so the suite can play several nodes::

    class TestMemoryBroker(BrokerContract):
        @pytest.fixture
        async def brokers(self):
            shared = MemoryBroker()
            yield lambda: shared

Each test states one guarantee from :class:`chatd.ports.Broker`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel

from chatd.ports import Broker, QueueEntry, Routed

Make = Callable[[], Broker]


class Node:
    """A node as the service runs it: ``broker.run`` delivering into a list."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = name
        self.got: list[Routed] = []
        self.resyncs = 0
        self._arrived = trio.Event()
        self._barriers = 0

    def deliver(self, item: Routed) -> None:
        self.got.append(item)
        self._arrived.set()
        self._arrived = trio.Event()

    def resync(self, users: object = None) -> None:
        self.resyncs += 1

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Routed]:
        with trio.fail_after(timeout):
            while len(self.got) < count:
                await self._arrived.wait()
        return self.got

    async def barrier(self, via: Node) -> None:
        """Route a marker from ``via`` (another node) to this one through the
        backend and wait for it. The backend hands a node its items in the
        order they were routed, so whatever was routed before the marker
        has arrived once it has: an absence asserted after it means
        something (a sleep would only mean "not yet"). The marker goes to
        a user of its own and is taken out of :attr:`got`."""
        if via is self:
            raise ValueError("a barrier must come through the backend, from another node")
        probe = f"barrier-{self.name}"
        if not self._barriers:
            await self.broker.attach(probe, self.name, "barrier")
        self._barriers += 1
        key = f"barrier-{self._barriers}"
        await via.broker.route([Routed(probe, key, "", queued=False)])
        with trio.fail_after(5):
            while not any(i.user == probe and i.key == key for i in self.got):
                await self._arrived.wait()
        self.got = [i for i in self.got if i.user != probe]


async def start_node(nursery: trio.Nursery, broker: Broker, name: str) -> Node:
    node = Node(broker, name)
    await nursery.start(broker.run, name, node.deliver, node.resync)
    return node


class BrokerContract:
    @pytest.fixture
    async def brokers(self) -> Make:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    # -- owed queue --------------------------------------------------------------

    async def test_nowait_calls_come_before_later_calls(self, brokers: Make) -> None:
        """route_nowait and settle_nowait are in order with every later call."""
        b = brokers()
        b.route_nowait(
            [Routed("bob", "m1", "p1", queued=True), Routed("bob", "m2", "p2", queued=True)]
        )
        b.settle_nowait("bob", ["m1"])
        b.route_nowait([Routed("bob", "m3", "p3", queued=True)])
        assert [(o.key, o.payload) for o in await b.queued("bob")] == [("m2", "p2"), ("m3", "p3")]
        b.settle_nowait("bob", ["m2", "m3"])
        assert await b.queued("bob") == []

    async def test_route_nowait_reaches_this_node_at_once_and_others_soon(
        self, brokers: Make, nursery: trio.Nursery
    ) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        n2 = await start_node(nursery, brokers(), "n2")
        await n1.broker.attach("bob", "n1", "c1")
        await n2.broker.attach("bob", "n2", "c2")
        n1.broker.route_nowait([Routed("bob", "m1", "p1", queued=True)])
        # No await in between: the local connection has it already.
        assert [(i.key, i.payload, i.queued) for i in n1.got] == [("m1", "p1", True)]
        [got] = await n2.wait_for(1)
        assert (got.key, got.payload, got.queued) == ("m1", "p1", True)
        await n1.barrier(n2)
        assert len(n1.got) == 1  # not a second time through the backend

    async def test_owed_items_wait_until_settled(self, brokers: Make) -> None:
        b = brokers()
        await b.route(
            [Routed("bob", "m1", "p1", queued=True), Routed("bob", "m2", "p2", queued=True)]
        )
        assert [(o.key, o.payload) for o in await b.queued("bob")] == [("m1", "p1"), ("m2", "p2")]
        # Reading does not remove.
        assert len(await b.queued("bob")) == 2
        await b.settle("bob", ["m1"])
        assert [o.key for o in await b.queued("bob")] == ["m2"]
        await b.settle("bob", ["m2", "never-there"])
        assert await b.queued("bob") == []

    async def test_one_entry_per_key(self, brokers: Make) -> None:
        b = brokers()
        await b.route([Routed("bob", "m1", "p1", queued=True)])
        await b.route([Routed("bob", "m1", "p1", queued=True)])
        assert [o.key for o in await b.queued("bob")] == ["m1"]

    async def test_not_owed_items_are_not_queued(self, brokers: Make) -> None:
        b = brokers()
        await b.route([Routed("bob", "typing", "t", queued=False)])
        assert await b.queued("bob") == []

    async def test_queues_are_per_user(self, brokers: Make) -> None:
        b = brokers()
        await b.route(
            [Routed("bob", "m1", "p", queued=True), Routed("carol", "m1", "p", queued=True)]
        )
        await b.settle("bob", ["m1"])
        assert await b.queued("bob") == []
        assert [o.key for o in await b.queued("carol")] == ["m1"]

    async def test_settle_while_routing_loses_nothing(self, brokers: Make) -> None:
        b = brokers()
        settled: set[str] = set()

        async def producer() -> None:
            for i in range(200):
                await b.route([Routed("bob", f"m{i}", "p", queued=True)])

        async def consumer() -> None:
            for _ in range(40):
                keys = [o.key for o in await b.queued("bob")]
                await b.settle("bob", keys[:3])
                settled.update(keys[:3])
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            n.start_soon(producer)
            n.start_soon(consumer)
        left = {o.key for o in await b.queued("bob")}
        assert left | settled == {f"m{i}" for i in range(200)}
        assert not left & settled

    # -- delivery ----------------------------------------------------------------

    async def test_route_reaches_the_node_holding_the_user(self, brokers: Make, nursery) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        n2 = await start_node(nursery, brokers(), "n2")
        await n1.broker.attach("bob", "n1", "c1")
        await n2.broker.route([Routed("bob", "m1", "hello", queued=True, exclude="c9")])
        [got] = await n1.wait_for(1)
        assert (got.user, got.key, got.payload, got.queued, got.exclude) == (
            "bob",
            "m1",
            "hello",
            True,
            "c9",
        )
        await n2.barrier(n1)
        assert n2.got == []
        # Delivered live and still owed until settled.
        assert [o.key for o in await n2.broker.queued("bob")] == ["m1"]

    async def test_every_node_of_a_user_gets_it(self, brokers: Make, nursery) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        n2 = await start_node(nursery, brokers(), "n2")
        await n1.broker.attach("bob", "n1", "c1")
        await n2.broker.attach("bob", "n2", "c2")
        await n1.broker.route([Routed("bob", "m1", "x", queued=False)])
        await n1.wait_for(1)
        await n2.wait_for(1)
        await n1.barrier(n2)
        await n2.barrier(n1)
        assert len(n1.got) == len(n2.got) == 1

    async def test_offline_user_is_only_queued(self, brokers: Make, nursery) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        await n1.broker.route([Routed("bob", "m1", "x", queued=True)])
        n2 = await start_node(nursery, brokers(), "n2")
        await n1.barrier(n2)
        assert n1.got == []
        assert [o.key for o in await n1.broker.queued("bob")] == ["m1"]
        # Once bob connects, the next item is delivered, and only that one:
        # what was queued while he was away waits for his backlog.
        await n1.broker.attach("bob", "n1", "c1")
        await n1.broker.route([Routed("bob", "m2", "y", queued=True)])
        [got] = await n1.wait_for(1)
        assert got.key == "m2"

    async def test_many_items_one_call(self, brokers: Make, nursery) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        for u in ("bob", "carol"):
            await n1.broker.attach(u, "n1", f"c-{u}")
        items = [
            Routed(u, f"m{i}", f"p{i}", queued=True) for i in range(50) for u in ("bob", "carol")
        ]
        await n1.broker.route(items)
        got = await n1.wait_for(100)
        assert sorted((g.user, g.key) for g in got) == sorted((i.user, i.key) for i in items)
        assert len(await n1.broker.queued("bob")) == 50

    # -- token revocation ---------------------------------------------------------

    async def test_a_revoked_token_is_refused_everywhere_until_it_expires(
        self, brokers: Make
    ) -> None:
        b1, b2 = brokers(), brokers()
        now = int(time.time() * 1000)
        assert not await b2.is_revoked("t1")
        await b1.revoke("t1", now + 60_000)
        await b1.revoke("t2", now + 300)
        await b1.revoke("t3", now - 1)  # already expired: nothing to keep
        assert await b2.is_revoked("t1") and await b2.is_revoked("t2")
        assert not await b2.is_revoked("t3") and not await b2.is_revoked("t4")
        await trio.sleep(0.4)
        assert not await b2.is_revoked("t2")
        assert await b1.is_revoked("t1")

    async def test_a_refresh_family_rotates_once_per_token_and_ends_on_reuse(
        self, brokers: Make
    ) -> None:
        b1, b2 = brokers(), brokers()
        until = int(time.time() * 1000) + 60_000
        await b1.refresh_begin("f1", "alice", "d1", "jti1", until)
        rotated = await b2.refresh_rotate("f1", "d1", "d2", "jti2", until)
        assert (rotated.outcome, rotated.user, rotated.token_id) == ("rotated", "alice", "jti1")
        assert (await b1.refresh_rotate("f1", "d2", "d3", "jti3", until)).outcome == "rotated"
        # d2 again: a copy was replayed. The family ends, whoever holds d3.
        reused = await b2.refresh_rotate("f1", "d2", "d4", "jti4", until)
        assert (reused.outcome, reused.user, reused.token_id) == ("reused", "alice", "jti3")
        assert (await b1.refresh_rotate("f1", "d3", "d5", "jti5", until)).outcome == "unknown"
        assert (await b1.refresh_rotate("nope", "d1", "d2", "j", until)).outcome == "unknown"
        await b1.refresh_begin("f2", "bob", "e1", "k1", until)
        await b2.refresh_end("f2")
        assert (await b1.refresh_rotate("f2", "e1", "e2", "k2", until)).outcome == "unknown"
        await b1.refresh_begin("f3", "bob", "g1", "m1", int(time.time() * 1000) + 200)
        await trio.sleep(0.4)  # expired
        assert (await b2.refresh_rotate("f3", "g1", "g2", "m2", until)).outcome == "unknown"

    async def test_a_rate_bucket_is_shared_by_every_node(self, brokers: Make) -> None:
        b1, b2 = brokers(), brokers()
        assert (await b1.take("u:alice:send", 3, rate=1, burst=5)).granted == 3
        taken = await b2.take("u:alice:send", 3, rate=1, burst=5)
        assert (taken.granted, taken.retry_after) == (2, 0)
        empty = await b1.take("u:alice:send", 1, rate=1, burst=5)
        assert empty.granted == 0 and 0 < empty.retry_after <= 1
        assert (await b2.take("u:bob:send", 5, rate=1, burst=5)).granted == 5  # its own
        assert (await b2.take("ip:10.0.0.1:login", 9, rate=1, burst=5)).granted == 5
        await trio.sleep(empty.retry_after + 0.05)
        assert (await b2.take("u:alice:send", 3, rate=1, burst=5)).granted == 1
        assert (await b1.take("u:alice:send", 1, rate=0, burst=5)).granted == 1  # no limit

    # -- presence ----------------------------------------------------------------

    async def test_first_attach_and_last_detach(self, brokers: Make) -> None:
        a, b = brokers(), brokers()
        assert await a.attach("bob", "n1", "c1") is True
        assert await b.attach("bob", "n2", "c2") is False
        p = (await a.presence(["bob"]))["bob"]
        assert p.online and p.nodes == ("n1", "n2")
        assert await a.detach("bob", "n1", "c1", 100) is False
        assert await b.detach("bob", "n2", "c2", 200) is True
        p = (await b.presence(["bob"]))["bob"]
        assert not p.online and p.nodes == () and p.last_seen == 200

    async def test_detach_of_unknown_connection_is_harmless(self, brokers: Make) -> None:
        b = brokers()
        assert await b.detach("bob", "n1", "nope", 5) is False
        await b.attach("bob", "n1", "c1")
        assert await b.detach("bob", "n1", "nope", 5) is False
        assert (await b.presence(["bob"]))["bob"].online

    async def test_devices_counts_a_users_connections_on_every_node(self, brokers: Make) -> None:
        b1, b2 = brokers(), brokers()
        await b1.attach("alice", "n1", "c1")
        await b1.attach("alice", "n1", "c2")
        await b2.attach("alice", "n2", "c3")
        assert await b2.devices("alice") == 3 and await b1.devices("bob") == 0
        await b2.detach("alice", "n2", "c3", 1)
        assert await b1.devices("alice") == 2

    async def test_presence_of_unknown_user(self, brokers: Make) -> None:
        p = (await brokers().presence(["ghost"]))["ghost"]
        assert not p.online and p.nodes == () and p.last_seen is None

    # -- administration ----------------------------------------------------------

    async def test_queue_entries_say_when_they_arrived(self, brokers: Make) -> None:
        b = brokers()
        before = _now_ms()
        await b.route([Routed("bob", "m1", "p1", queued=True)])
        await trio.sleep(0.01)
        await b.route([Routed("bob", "m2", "p2", queued=True)])
        first, second = await b.queued("bob")
        assert first.queued_at is not None and second.queued_at is not None
        # Clocks may differ a little between this process and the backend.
        assert before - 2000 <= first.queued_at <= second.queued_at <= _now_ms() + 2000

    async def test_queues_lists_users_with_owed_items(self, brokers: Make) -> None:
        b = brokers()
        assert await b.queues() == []
        await b.route([Routed("bob", f"m{i}", "p", queued=True) for i in range(3)])
        await b.route(
            [Routed("carol", "m1", "p", queued=True), Routed("dave", "t", "x", queued=False)]
        )
        got = {q.user: q for q in await b.queues()}
        assert {u: q.entries for u, q in got.items()} == {"bob": 3, "carol": 1}
        [oldest, *_] = await b.queued("bob")
        assert got["bob"].oldest_queued_at == oldest.queued_at
        await b.settle("carol", ["m1"])
        assert [q.user for q in await b.queues()] == ["bob"]

    async def test_enqueue_queues_without_live_delivery(self, brokers: Make, nursery) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        await n1.broker.attach("bob", "n1", "c1")
        await n1.broker.route([Routed("bob", "m2", "routed", queued=True)])
        await n1.wait_for(1)
        added = await n1.broker.enqueue(
            "bob", [QueueEntry("m1", "p1"), QueueEntry("m2", "other"), QueueEntry("m3", "p3")]
        )
        assert added == 2
        assert [(o.key, o.payload) for o in await n1.broker.queued("bob")] == [
            ("m2", "routed"),
            ("m1", "p1"),
            ("m3", "p3"),
        ]
        n2 = await start_node(nursery, brokers(), "n2")
        await n1.barrier(n2)
        assert [g.key for g in n1.got] == ["m2"]  # nothing enqueued went out live
        assert await n1.broker.enqueue("bob", []) == 0

    async def test_purge_empties_one_queue(self, brokers: Make) -> None:
        b = brokers()
        await b.route([Routed("bob", f"m{i}", "p", queued=True) for i in range(4)])
        await b.route([Routed("carol", "m1", "p", queued=True)])
        assert await b.purge("bob") == 4
        assert await b.queued("bob") == []
        assert [q.user for q in await b.queues()] == ["carol"]
        assert await b.purge("bob") == 0
        # A purged queue fills again as usual.
        await b.route([Routed("bob", "m9", "p", queued=True)])
        assert [o.key for o in await b.queued("bob")] == ["m9"]

    async def test_nodes_report_live_nodes_and_their_connections(
        self, brokers: Make, nursery
    ) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        await start_node(nursery, brokers(), "n2")
        for user, conn in (("bob", "c1"), ("bob", "c2"), ("carol", "c3")):
            await n1.broker.attach(user, "n1", conn)
        observer = brokers()

        async def counts() -> dict[str, tuple[int, int]]:
            return {n.node: (n.connections, n.users) for n in await observer.nodes()}

        # A shared backend learns a node's counts from its next heartbeat.
        with trio.fail_after(5):
            while True:
                if await counts() == {"n1": (3, 2), "n2": (0, 0)}:
                    break
                await trio.sleep(0.05)
        for info in await observer.nodes():
            assert info.incarnation
            assert info.heartbeat_age_ms is not None and 0 <= info.heartbeat_age_ms < 5000
            assert info.started_at is not None and info.started_at <= _now_ms() + 2000

    async def test_online_users(self, brokers: Make, nursery) -> None:
        n1 = await start_node(nursery, brokers(), "n1")
        n2 = await start_node(nursery, brokers(), "n2")
        await n1.broker.attach("bob", "n1", "c1")
        await n2.broker.attach("bob", "n2", "c2")
        await n2.broker.attach("carol", "n2", "c3")
        await n2.broker.detach("carol", "n2", "c3", 100)
        online = await brokers().online_users()
        assert list(online) == ["bob"]
        assert online["bob"].online and online["bob"].nodes == ("n1", "n2")

    async def test_ping(self, brokers: Make) -> None:
        await brokers().ping()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
