"""Where the broker's commands go: URLs of the three modes, and discovery
against a real Redis Cluster and a real Sentinel set-up."""

from __future__ import annotations

import pytest
import trio

from chatd.broker import resp
from chatd.broker.topology import (
    Cluster,
    Mode,
    Sentinel,
    SentinelTarget,
    Standalone,
    TopologyError,
    detect,
    parse_url,
)
from harness.redis_cluster import RedisClusterSet, SentinelSet
from harness.redis_server import RedisServer


def test_a_sentinel_url_names_the_sentinels_the_master_and_how_to_log_in():
    target = parse_url(
        "redis+sentinel://chatd:s%40cret@10.0.0.1:26379,10.0.0.2,10.0.0.3:26380/prod/2"
        "?sentinel_password=watch"
    )
    assert isinstance(target, SentinelTarget)
    assert target.master == "prod"
    assert [(s.host, s.port, s.password) for s in target.sentinels] == [
        ("10.0.0.1", 26379, "watch"),
        ("10.0.0.2", 26379, "watch"),
        ("10.0.0.3", 26380, "watch"),
    ]
    assert (target.server.username, target.server.password, target.server.db) == (
        "chatd",
        "s@cret",
        2,
    )
    assert not target.server.tls
    assert parse_url("rediss+sentinel://h:1/m").server.tls  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "url", ["redis+sentinel:///prod", "redis+sentinel://h:26379", "redis+sentinel://h:26379/"]
)
def test_a_sentinel_url_without_sentinels_or_master_is_refused(url):
    with pytest.raises(ValueError):
        parse_url(url)


def test_other_urls_are_one_server():
    assert parse_url("redis://h:7000/0") == resp.Address("h", 7000)


async def opener_in(nursery: trio.Nursery):
    async def open_(address: resp.Address) -> resp.Connection:
        conn = await resp.Connection.open(address, connect_timeout=1, reply_timeout=2)
        await nursery.start(conn.run)
        return conn

    return open_


async def test_auto_on_one_server_is_standalone(nursery):
    with RedisServer() as server:
        topology = await detect(server.url, Mode.AUTO, await opener_in(nursery), connect_timeout=1)
        assert isinstance(topology, Standalone)
        conn = await topology.connection(resp.hash_slot("anything"))
        assert await conn.call(("PING",)) == ["PONG"]
        topology.close()


@pytest.fixture(scope="module")
def cluster():
    with RedisClusterSet() as cluster:
        yield cluster


async def test_auto_on_a_cluster_finds_every_shard(cluster, nursery):
    topology = await detect(cluster.url, Mode.AUTO, await opener_in(nursery), connect_timeout=1)
    assert isinstance(topology, Cluster)
    assert len(topology.masters()) == 3
    for key in ("chatd:{u:alice}:q", "chatd:{u:bob}:q", "chatd:{u:carol}:q", "x", "y", "z"):
        slot = resp.hash_slot(key)
        owner = cluster.owner(slot)
        assert topology.address_of(slot).port == owner.server.port  # type: ignore[union-attr]
        conn = await topology.connection(slot)
        assert await conn.call(("SET", key, "v"), ("GET", key)) == ["OK", "v"]
    described = topology.describe()
    assert described["mode"] == "cluster"
    assert sum(s["slots"] for s in described["shards"]) == 16384
    assert all(len(s["replicas"]) == 1 for s in described["shards"])
    topology.close()


async def test_a_cluster_mode_on_one_plain_server_is_an_error(nursery):
    with RedisServer() as server, pytest.raises(TopologyError, match="not a cluster node"):
        await detect(server.url, Mode.CLUSTER, await opener_in(nursery), connect_timeout=1)


async def test_sentinel_names_the_master_and_follows_a_failover(nursery):
    with SentinelSet() as sentinels:
        topology = await detect(
            sentinels.url, Mode.AUTO, await opener_in(nursery), connect_timeout=1
        )
        assert isinstance(topology, Sentinel)
        assert topology.master.port == sentinels.master.port  # type: ignore[union-attr]
        conn = await topology.connection(0)
        assert await conn.call(("SET", "k", "before")) == ["OK"]
        new = await trio.to_thread.run_sync(sentinels.fail_over)
        topology.lost(conn)
        await topology.discover()
        assert topology.master.port == new.port  # type: ignore[union-attr]
        conn = await topology.connection(0)
        assert await conn.call(("GET", "k")) == ["before"]  # the replica had it
        assert topology.describe()["master"] == f"127.0.0.1:{new.port}"
        topology.close()


async def test_sentinel_mode_needs_a_sentinel_url(nursery):
    with pytest.raises(TopologyError, match="redis\\+sentinel://"):
        await detect("redis://h:1", Mode.SENTINEL, await opener_in(nursery), connect_timeout=1)


def test_the_modes_are_the_configs() -> None:
    """--redis-mode accepts exactly the broker's modes."""
    from chatd.config import REDIS_MODES

    assert tuple(m.value for m in Mode) == REDIS_MODES
