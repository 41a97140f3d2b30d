"""The Redis broker: the Broker contract, then what only a shared backend has
(dead nodes leave presence, Redis losing its data, outages, key layout).

Every test talks to a throwaway ``redis-server`` on a free loopback port
(:mod:`harness.redis_server`), never to the machine's Redis.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatd.broker.redis import RedisBroker
from chatd.broker.resp import hash_slot
from chatd.core.errors import Unavailable
from chatd.ports import Routed
from chatd.testing.broker_contract import BrokerContract, start_node
from harness.redis_cluster import RedisClusterSet, SentinelSet
from harness.redis_server import RedisServer, free_port

#: Short timings so that expiry and recovery happen within a test.
FAST = {
    "presence_ttl": 1.0,
    "heartbeat_interval": 0.2,
    "backoff_min": 0.05,
    "backoff_max": 0.3,
    "op_timeout": 1.0,
    "connect_timeout": 0.3,
}

Make = Callable[..., RedisBroker]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop, kill or flush it."""
    with RedisServer() as server:
        yield server


@asynccontextmanager
async def _factory(server: RedisServer | str, **options: object) -> AsyncIterator[Make]:
    """Brokers on ``server`` (or a URL) whose connections run in one nursery of
    the test's."""
    url = server if isinstance(server, str) else server.url
    made: list[RedisBroker] = []
    async with trio.open_nursery() as nursery:

        def make(**tuning: object) -> RedisBroker:
            broker = RedisBroker.from_url(url, nursery=nursery, **{**FAST, **options, **tuning})
            made.append(broker)
            return broker

        try:
            yield make
        finally:
            for broker in made:
                await broker.aclose()


class TestRedisBroker(BrokerContract):
    @pytest.fixture
    async def brokers(self, shared_server: RedisServer) -> AsyncIterator[Make]:
        shared_server.flushall()
        async with _factory(shared_server) as make:
            yield make


@pytest.fixture
async def make(server: RedisServer) -> AsyncIterator[Make]:
    async with _factory(server) as make:
        yield make


async def eventually(check: Callable[[], object], timeout: float = 5.0, step: float = 0.05):
    """Await ``check()`` (sync or async) until it is truthy."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
            await trio.sleep(step)


async def beats(server: RedisServer, nodes: dict[str, RedisBroker], count: int = 2) -> None:
    """Wait until each of ``nodes`` (name: its broker) has beaten ``count``
    more times (its last beat in the index of incarnations changed). A node
    beats, then buries the dead, then sleeps: after two beats every burial
    round it was in has ended, and so has a whole one begun after the call."""

    def last(name: str, broker: RedisBroker) -> object:
        return server.command("ZSCORE", broker.incarnations_key(), broker.incarnation(name))

    seen = {name: [last(name, broker)] for name, broker in nodes.items()}

    def done() -> bool:
        for name, broker in nodes.items():
            score = last(name, broker)
            if score != seen[name][-1]:
                seen[name].append(score)
        return all(len(scores) > count for scores in seen.values())

    await eventually(done, timeout=FAST["heartbeat_interval"] * (count + 1) + 3, step=0.02)


async def logged(caplog: pytest.LogCaptureFixture, text: str, times: int, since: int) -> None:
    """Wait until ``text`` is in ``times`` log records after the first ``since``."""
    await eventually(
        lambda: sum(text in r.getMessage() for r in caplog.records[since:]) >= times, step=0.02
    )


async def expect_unavailable_fast(call: Callable[[], object], limit: float) -> float:
    start = trio.current_time()
    with pytest.raises(Unavailable):
        await call()  # type: ignore[misc]
    took = trio.current_time() - start
    assert took < limit, f"took {took:.2f} s"
    return took


# -- presence across nodes ------------------------------------------------------------------


async def test_a_dead_node_leaves_presence_within_seconds(make: Make, server: RedisServer) -> None:
    observer = make()
    dying = make()
    async with trio.open_nursery() as nursery:
        await start_node(nursery, dying, "n1")
        assert await dying.attach("bob", "n1", "c1") is True
        assert (await observer.presence(["bob"]))["bob"].nodes == ("n1",)
        # The node stops beating without detaching: as good as kill -9 for Redis.
        nursery.cancel_scope.cancel()
    died = trio.current_time()

    async def offline() -> bool:
        return not (await observer.presence(["bob"]))["bob"].online

    await eventually(offline, timeout=FAST["presence_ttl"] + 2)
    assert trio.current_time() - died < FAST["presence_ttl"] + 1
    p = (await observer.presence(["bob"]))["bob"]
    assert p.nodes == () and p.last_seen is not None
    # The dead incarnation's connection is gone from Redis, not only hidden.
    assert server.command("HLEN", observer.user_key("bob", "conns")) == 0
    # A new process under the same node name is a new incarnation.
    reborn = make()
    async with trio.open_nursery() as nursery:
        await start_node(nursery, reborn, "n1")
        assert await reborn.attach("bob", "n1", "c2") is True
        nursery.cancel_scope.cancel()


async def test_one_survivor_announces_a_dead_nodes_users(make: Make, server: RedisServer) -> None:
    """A node dies without detaching: exactly one of the survivors calls
    ``gone`` for each user who was online only there (with a last-seen of
    about its last beat), none for a user still online elsewhere; the dead
    node's bookkeeping is cleared."""
    gone: list[tuple[str, str, int]] = []
    alive: dict[str, RedisBroker] = {}
    async with trio.open_nursery() as survivors:
        for name in ("n1", "n2", "n3"):
            b = alive[name] = make()
            await survivors.start(
                partial(b.run, gone=lambda u, ts, n=name: gone.append((n, u, ts))),
                name,
                lambda item: None,
                lambda users=None: None,
            )
            if name == "n1":
                n1 = b
        dying = make()
        async with trio.open_nursery() as nursery:
            await start_node(nursery, dying, "nx")
            await dying.attach("alice", "nx", "a1")
            await dying.attach("alice", "nx", "a2")
            await dying.attach("bob", "nx", "b1")
            await dying.attach("carol", "nx", "c1")
            await dying.detach("carol", "nx", "c1", 1)  # left properly: already announced
            await n1.attach("bob", "n1", "b2")
            before = time.time_ns() // 1_000_000
            nursery.cancel_scope.cancel()  # stops beating, detaches nothing

        await eventually(lambda: bool(gone), timeout=FAST["presence_ttl"] + 3)
        # Every survivor has had a whole burial round since, to claim it too.
        await beats(server, alive)
        survivors.cancel_scope.cancel()

    assert [(u) for _, u, _ in gone] == ["alice"], gone
    _, _, last_seen = gone[0]
    assert before - 2 * FAST["heartbeat_interval"] * 1000 <= last_seen <= before + 1000
    p = await n1.presence(["alice", "bob"])
    assert not p["alice"].online and p["alice"].last_seen == last_seen
    assert p["bob"].nodes == ("n1",)
    inc = dying.incarnation("nx")
    assert server.command("EXISTS", dying.users_key(inc)) == 0
    assert server.command("ZSCORE", dying.incarnations_key(), inc) is None


async def test_first_attach_ignores_a_dead_node(make: Make, server: RedisServer) -> None:
    dying, other = make(), make()
    async with trio.open_nursery() as nursery:
        await start_node(nursery, dying, "n1")
        await dying.attach("bob", "n1", "c1")
        nursery.cancel_scope.cancel()
    # While n1's heartbeat lives, bob is still online there.
    assert await other.attach("bob", "n2", "c2") is False
    # Until it expires (presence_ttl after n1's last beat).
    heartbeat = dying.heartbeat_key(dying.incarnation("n1"))
    await eventually(lambda: server.command("EXISTS", heartbeat) == 0, FAST["presence_ttl"] + 1)
    assert await other.detach("bob", "n2", "c2", 500) is True
    assert await other.attach("bob", "n2", "c3") is True
    assert (await other.presence(["bob"]))["bob"].nodes == ("n2",)


async def test_flushall_heartbeat_reasserts_presence_and_resyncs(
    make: Make, server: RedisServer, nursery: trio.Nursery
) -> None:
    n1 = await start_node(nursery, make(), "n1")
    sender = make()
    await n1.broker.attach("bob", "n1", "c1")
    server.flushall()
    assert not (await sender.presence(["bob"]))["bob"].online

    async def back() -> bool:
        return (await sender.presence(["bob"]))["bob"].online

    await eventually(back, timeout=2)
    await eventually(lambda: n1.resyncs >= 1, timeout=2)
    await sender.route([Routed("bob", "m1", "after-flush", queued=True)])
    [got] = await n1.wait_for(1)
    assert got.payload == "after-flush"


# -- outages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_outage_unavailable_fast_run_survives_and_resyncs(
    how: str,
    make: Make,
    server: RedisServer,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="chatd.broker")
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    await b.attach("bob", "n1", "c1")
    await b.route([Routed("bob", "m0", "before", queued=True)])
    await n1.wait_for(1)

    since = len(caplog.records)
    getattr(server, how)()
    limit = 0.5  # refused connections fail at once; well under op_timeout
    await expect_unavailable_fast(lambda: b.route([Routed("bob", "m1", "x", queued=True)]), limit)
    await expect_unavailable_fast(lambda: b.queued("bob"), limit)
    await expect_unavailable_fast(lambda: b.settle("bob", ["m0"]), limit)
    await expect_unavailable_fast(lambda: b.attach("carol", "n1", "c2"), limit)
    await expect_unavailable_fast(lambda: b.detach("dave", "n1", "c3", 1), limit)
    await expect_unavailable_fast(lambda: b.presence(["bob"]), limit)
    await expect_unavailable_fast(b.ping, limit)
    # run() keeps retrying meanwhile; it must not crash, nor resync while
    # Redis is away: it has lost its subscription and tried again twice.
    await logged(caplog, "redis subscription lost; retrying", 3, since)
    assert n1.resyncs == 0

    server.start()  # same port, all data lost
    await eventually(lambda: n1.resyncs == 1, timeout=3)
    await b.ping()
    # The heartbeat put back bob and carol (attached during the outage).
    p = await b.presence(["bob", "carol"])
    assert p["bob"].nodes == ("n1",) and p["carol"].nodes == ("n1",)
    other = make()
    await other.route([Routed("bob", "m2", "after", queued=True)])
    await n1.wait_for(2)
    assert n1.got[-1].key == "m2"
    assert [o.key for o in await b.queued("bob")] == ["m2"]


async def test_a_hung_server_gives_unavailable_not_a_hang(
    make: Make, server: RedisServer, nursery: trio.Nursery
) -> None:
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    await b.attach("bob", "n1", "c1")
    server.freeze()
    try:
        limit = FAST["op_timeout"] + 0.3
        await expect_unavailable_fast(
            lambda: b.route([Routed("bob", "m1", "x", queued=True)]), limit
        )
        await expect_unavailable_fast(lambda: b.presence(["bob"]), limit)
        await expect_unavailable_fast(b.ping, limit)
    finally:
        server.thaw()
    await eventually(lambda: n1.resyncs >= 1, timeout=5)

    async def works() -> bool:
        try:
            await b.route([Routed("bob", "m2", "y", queued=True)])
        except Unavailable:
            return False
        return True

    await eventually(works, timeout=3)
    await eventually(lambda: any(i.key == "m2" for i in n1.got), timeout=3)


async def test_work_sent_without_waiting_and_lost_resyncs(
    make: Make, server: RedisServer, nursery: trio.Nursery
) -> None:
    """The command connection dies with routes in flight while the
    subscription stays: the broker reconnects and the node resyncs, once."""
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    await b.ping()
    server.command("CLIENT", "KILL", "TYPE", "normal")  # not the subscription
    for i in range(3):
        b.route_nowait([Routed("bob", f"m{i}", "p", queued=True)])
    await eventually(lambda: n1.resyncs == 1, timeout=3)
    # The barrier: work sent without waiting after the recovery goes through,
    # in order with a later call, on the new connection.
    b.route_nowait([Routed("bob", "after", "p", queued=True)])
    assert [o.key for o in await b.queued("bob")][-1] == "after"
    assert n1.resyncs == 1  # once per lost connection, not per call


async def test_nowait_while_redis_is_away_resyncs_once_back(
    make: Make, server: RedisServer, nursery: trio.Nursery
) -> None:
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    await b.ping()
    server.kill()
    for i in range(20):
        b.route_nowait([Routed("bob", f"m{i}", "p", queued=True)])  # never raises
        b.settle_nowait("bob", [f"m{i}"])
        await trio.sleep(0.01)
    server.start()
    await eventually(lambda: n1.resyncs >= 1, timeout=5)
    await b.ping()
    b.route_nowait([Routed("bob", "after", "p", queued=True)])
    assert [o.key for o in await b.queued("bob")] == ["after"]


async def test_run_starts_only_once_redis_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="chatd.broker")
    server = RedisServer()  # not started yet
    try:
        async with (
            RedisBroker.from_url(server.url, **FAST) as broker,
            trio.open_nursery() as nursery,
        ):
            started = trio.Event()

            async def node() -> None:
                await start_node(nursery, broker, "n1")
                started.set()

            nursery.start_soon(node)
            # It has tried twice (and failed) by now: not started.
            await logged(caplog, "redis not reachable; retrying", 2, 0)
            assert not started.is_set()
            server.start()
            with trio.fail_after(3):
                await started.wait()
            nursery.cancel_scope.cancel()
    finally:
        server.close()


# -- the queue ----------------------------------------------------------------------------


async def test_queue_is_bounded_dropping_the_oldest_and_expires(
    make: Make, server: RedisServer
) -> None:
    b = make(queue_limit=3, queue_ttl=100)
    await b.route([Routed("bob", f"m{i}", f"p{i}", queued=True) for i in range(5)])
    assert [(o.key, o.payload) for o in await b.queued("bob")] == [
        ("m2", "p2"),
        ("m3", "p3"),
        ("m4", "p4"),
    ]
    q, qo = b.user_key("bob", "q"), b.user_key("bob", "qo")
    assert server.command("HLEN", q) == 3 and server.command("ZCARD", qo) == 3
    for key in (q, qo):
        assert 90 <= server.command("TTL", key) <= 100
        server.command("EXPIRE", key, 5)
    # A write refreshes the TTL; a read or a live-only item does not.
    await b.queued("bob")
    await b.route([Routed("bob", "typing", "t", queued=False)])
    assert server.command("TTL", q) <= 5
    await b.route([Routed("bob", "m5", "p5", queued=True)])
    for key in (q, qo):
        assert 90 <= server.command("TTL", key) <= 100
    assert [o.key for o in await b.queued("bob")] == ["m3", "m4", "m5"]
    await b.settle("bob", ["m3", "m4", "m5"])
    assert server.keys(f"{b.prefix}:{{u:bob}}:q*") == []


async def test_keys_carry_one_hash_tag_per_user(
    make: Make, server: RedisServer, nursery: trio.Nursery
) -> None:
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    users = ["alice", "bob.b", "c-d_e"]
    for u in users:
        await b.attach(u, "n1", f"conn-{u}")
    await b.route([Routed(u, f"m-{u}", "p", queued=True) for u in users])
    await b.detach("alice", "n1", "conn-alice", 42)
    await b.presence(users)

    slots: dict[str, set[int]] = {}
    node_keys = []
    for key in server.keys("*"):
        m = re.fullmatch(r"chatd:\{u:([^{}]+)\}:(conns|q|qo|seen)", key)
        if m:
            assert key.count("{") == 1
            slots.setdefault(m.group(1), set()).add(hash_slot(key.encode()))
        else:
            node_keys.append(key)
    assert set(slots) == set(users)
    assert all(len(s) == 1 for s in slots.values())
    # Besides the users' keys: the node's heartbeat, the users it serves (for
    # a survivor to announce if it dies) and the index of incarnations.
    inc = b.incarnation("n1")
    assert sorted(node_keys) == sorted(
        [b.heartbeat_key(inc), b.users_key(inc), b.incarnations_key()]
    )
    # Every per-user key has a TTL: nothing is kept forever.
    for key in server.keys("chatd:*"):
        assert server.command("TTL", key) > 0, key


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[RedisServer]:
    with RedisServer(cluster=True) as server:
        yield server


class TestRedisBrokerOnAClusterNode(BrokerContract):
    """The contract again on a one-node Redis Cluster: Redis refuses any
    command or script whose keys span two hash slots (CROSSSLOT), so this
    proves every call the broker makes is cluster-safe."""

    @pytest.fixture
    async def brokers(self, cluster_node: RedisServer) -> AsyncIterator[Make]:
        cluster_node.flushall()
        async with _factory(cluster_node) as make:
            yield make


async def test_repeated_restarts_under_load_are_each_recovered(
    make: Make, server: RedisServer, nursery: trio.Nursery
) -> None:
    """Redis killed and started three times while routes flow: each time the
    node notices, resyncs, and its connections work again."""
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    await b.attach("bob", "n1", "c1")
    for restart in range(1, 4):

        async def load() -> None:
            while True:
                try:
                    await b.route(
                        [Routed("bob", "m", "p", queued=True), Routed("al", "m", "p", queued=True)]
                    )
                except Unavailable:
                    await trio.sleep(0.01)

        async with trio.open_nursery() as inner:
            inner.start_soon(load)
            await trio.sleep(0.05)
            server.kill()
            await trio.sleep(0.1)
            server.start()
            await trio.sleep(0.05)
            inner.cancel_scope.cancel()
        await eventually(lambda restart=restart: n1.resyncs >= restart, timeout=5)
        await b.ping()


async def test_callers_cancelled_mid_call_do_not_disturb_others(
    make: Make, nursery: trio.Nursery
) -> None:
    n1 = await start_node(nursery, make(), "n1")
    b = n1.broker
    for u in ("bob", "carol"):
        await b.attach(u, "n1", f"c-{u}")

    async def sender(i: int) -> None:
        items = [Routed(u, f"m{i}", f"p{i}", queued=True) for u in ("bob", "carol")]
        if i % 2:
            await trio.sleep(random.uniform(0, 0.002))
            with trio.move_on_after(random.uniform(0, 0.002)):
                await b.route(items)
        else:
            await trio.sleep(random.uniform(0, 0.004))
            await b.route(items)  # must not fail because a neighbour was cancelled

    for _ in range(6):
        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(sender, i)
    # Whatever was cut short, the shared connections still work and every
    # entry that made it is whole.
    await b.route(
        [Routed("bob", "last", "p", queued=True), Routed("carol", "last", "p", queued=True)]
    )
    for u in ("bob", "carol"):
        owed = await b.queued(u)
        assert owed[-1].key == "last"
        assert all(o.payload == "p" + o.key[1:] or o.key == "last" for o in owed)
    await eventually(lambda: sum(1 for g in n1.got if g.key == "last") == 2)


# -- a real Redis Cluster, Sentinel, and Redis without sharded pub/sub ---------------------


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[RedisClusterSet]:
    with RedisClusterSet() as cluster:
        yield cluster


class TestRedisBrokerOnARealCluster(BrokerContract):
    """The contract on three masters with a replica each: every user's keys
    and channel on the shard of the user's slot, sharded pub/sub between
    nodes, scans over every shard."""

    @pytest.fixture
    async def brokers(self, real_cluster: RedisClusterSet) -> AsyncIterator[Make]:
        for master in real_cluster.masters():
            master.server.flushall()
        async with _factory(real_cluster.url) as make:
            yield make


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    with SentinelSet() as sentinels:
        yield sentinels


class TestRedisBrokerThroughSentinel(BrokerContract):
    @pytest.fixture
    async def brokers(self, sentinels: SentinelSet) -> AsyncIterator[Make]:
        sentinels.master.flushall()
        async with _factory(sentinels.url) as make:
            yield make


class TestRedisBrokerWithClassicPubSub(BrokerContract):
    """A Redis older than 7.0 has no SPUBLISH: the same channels, PUBLISH and
    SUBSCRIBE (forced here on a 7.0 server)."""

    @pytest.fixture
    async def brokers(self, shared_server: RedisServer) -> AsyncIterator[Make]:
        shared_server.flushall()
        made: list[RedisBroker] = []
        async with _factory(shared_server) as make:

            def classic(**tuning: object) -> RedisBroker:
                broker = make(**tuning)
                broker._link.sharded_allowed = False
                made.append(broker)
                return broker

            yield classic
        assert made and not any(b.sharded for b in made)


async def test_a_cluster_routes_on_the_users_shard_only(
    real_cluster: RedisClusterSet, nursery: trio.Nursery
) -> None:
    """A routed item is published on the shard of the user's slot: the other
    shards see no PUBLISH traffic (not broadcast over the cluster bus)."""
    for master in real_cluster.masters():
        master.server.flushall()
        master.server.command("CONFIG", "RESETSTAT")
    async with _factory(real_cluster.url) as make:
        n1 = await start_node(nursery, make(), "n1")
        n2 = await start_node(nursery, make(), "n2")
        await n2.broker.attach("bob", "n2", "c1")
        assert n1.broker.sharded
        await n1.broker.route([Routed("bob", f"m{i}", "p", queued=True) for i in range(20)])
        await n2.wait_for(20)
    owner = real_cluster.owner(hash_slot(n1.broker.user_key("bob", "conns")))
    for master in real_cluster.masters():
        stats = str(master.server.command("INFO", "commandstats"))
        spublish = "cmdstat_spublish:" in stats
        assert spublish == (master is owner), (master.address, owner.address)
        assert "cmdstat_publish:" not in stats


async def test_a_modes_url_must_match(nursery: trio.Nursery) -> None:
    with pytest.raises(ValueError):
        RedisBroker.from_url("redis+sentinel://h:1")  # no master name
    broker = RedisBroker.from_url("redis://127.0.0.1:1", mode="sentinel", nursery=nursery)
    with pytest.raises(Unavailable, match="redis\\+sentinel://"):
        await broker.ping()


# -- TLS and ACL users from the URL, in every mode --------------------------------------------

ACL = ("on", ">s3cret pass", "~*", "&*", "+@all")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, written to ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, str]]:
    """A server with a TLS port beside its plain one (the plain one is the
    test harness's), and an ACL user; yields it and chatd's rediss:// URL."""
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    port = free_port()
    tls = ("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    tls += ("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    with RedisServer(extra_args=tls) as server:
        server.command("ACL", "SETUSER", "chatd", *ACL)
        yield server, f"rediss://chatd:s3cret%20pass@127.0.0.1:{port}/0?ssl_ca_certs={cert}"


def _logged_in_as_chatd(server: RedisServer, port: int | None = None) -> bool:
    """Whether the server has chatd's connections, all as the ACL user (on
    ``port``, the TLS one, when given)."""
    clients = [
        dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
        for line in server.command("CLIENT", "LIST").splitlines()
    ]
    ours = [c for c in clients if c.get("name", "").startswith("chatd-")]
    return bool(ours) and all(
        c["user"] == "chatd" and (port is None or c["laddr"].endswith(f":{port}")) for c in ours
    )


class TestRedisBrokerOverTlsAsAnAclUser(BrokerContract):
    """The contract through ``rediss://user:password@…`` (the certificate
    checked against ``ssl_ca_certs``), logged in as an ACL user."""

    @pytest.fixture
    async def brokers(self, tls_server: tuple[RedisServer, str]) -> AsyncIterator[Make]:
        server, url = tls_server
        server.flushall()
        async with _factory(url) as make:
            yield make


async def test_tls_and_acl_user_are_what_the_server_sees(
    tls_server: tuple[RedisServer, str], nursery: trio.Nursery
) -> None:
    server, url = tls_server
    async with _factory(url) as make:
        n1 = await start_node(nursery, make(), "n1")
        n2 = await start_node(nursery, make(), "n2")
        await n2.broker.attach("bob", "n2", "c1")
        await n1.broker.route([Routed("bob", "m1", "p", queued=True)])
        await n2.wait_for(1)
        tls_port = int(url.split("@127.0.0.1:")[1].split("/")[0])
        assert _logged_in_as_chatd(server, tls_port)


async def test_a_cluster_and_sentinel_log_in_as_the_urls_user(
    real_cluster: RedisClusterSet, sentinels: SentinelSet, nursery: trio.Nursery
) -> None:
    """Credentials in the URL log in to every cluster node chatd discovers,
    and to the master the sentinels name."""
    for node in real_cluster.nodes:
        node.server.command("ACL", "SETUSER", "chatd", *ACL)
    for server in (sentinels.master, sentinels.replica):
        if server is not None:
            server.command("ACL", "SETUSER", "chatd", *ACL)
    seed = real_cluster.url.replace("redis://", "redis://chatd:s3cret%20pass@")
    via_sentinels = sentinels.url.replace(
        "redis+sentinel://", "redis+sentinel://chatd:s3cret%20pass@"
    )
    for url, servers in (
        (seed, [m.server for m in real_cluster.masters()]),
        (via_sentinels, [sentinels.master]),
    ):
        for server in servers:
            server.flushall()
        async with _factory(url) as make:
            n1 = await start_node(nursery, make(), "n1")
            n2 = await start_node(nursery, make(), "n2")
            users = [f"user{i}" for i in range(30)]  # spread over the shards
            for user in users:
                await n2.broker.attach(user, "n2", f"c-{user}")
            await n1.broker.route([Routed(u, "m1", "p", queued=True) for u in users])
            await n2.wait_for(len(users))
            used = [s for s in servers if _logged_in_as_chatd(s)]
            assert len(used) == len(servers), url  # every shard, each as the ACL user
