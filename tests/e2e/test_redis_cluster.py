"""chatd replicas on a real Redis Cluster (3 masters, 3 replicas) and behind
Redis Sentinel, with traffic through NGINX: cross-replica chat, then a
master killed with kill -9, slots moved under traffic, and a Sentinel
failover — each with the zero-loss checker reporting nothing missing."""

from __future__ import annotations

import pytest
import trio

from chatd.broker.resp import hash_slot
from harness.faults import run_with_fault
from harness.nginx import requires_nginx
from harness.redis_cluster import RedisClusterSet, SentinelSet
from tests.admin.conftest import ctl

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_nginx()]


@pytest.fixture
def redis_cluster():
    with RedisClusterSet() as cluster:
        yield cluster


async def test_replicas_chat_across_a_cluster(tmp_path, names, redis_cluster):
    async def nothing(cluster):
        await trio.sleep(0.5)

    traffic = await run_with_fault(tmp_path, names, nothing, redis_url=redis_cluster.url)
    # chatctl sees the cluster's shards.
    env = {"CHATD_REDIS_URL": redis_cluster.url, "CHATD_DATA_DIR": str(tmp_path)}
    result = await trio.to_thread.run_sync(lambda: ctl(env, "nodes"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "redis: cluster, 3 shards, sharded pub/sub" in lines
    masters = {m.address for m in redis_cluster.masters()}
    rows = [
        line.split()
        for line in lines[lines.index("redis: cluster, 3 shards, sharded pub/sub") + 2 :]
    ]
    assert {r[0] for r in rows} == masters and sum(int(r[-1]) for r in rows) == 16384
    # The users' keys are spread over the shards, and pub/sub used SPUBLISH.
    shards = {
        redis_cluster.owner(hash_slot(f"chatd:{{u:{c.user}}}:q")).address for c in traffic.clients
    }
    assert len(shards) > 1
    used = [
        "cmdstat_spublish:" in str(m.server.command("INFO", "commandstats"))
        for m in redis_cluster.masters()
    ]
    assert any(used)


async def test_a_master_killed_under_traffic_loses_nothing(tmp_path, names, redis_cluster):
    async def fault(cluster):
        # The shard that serves most of the first users' slots.
        victim = redis_cluster.masters()[0]
        await trio.to_thread.run_sync(redis_cluster.kill_master, victim)

    await run_with_fault(tmp_path, names, fault, redis_url=redis_cluster.url)


async def test_slots_moved_under_traffic_lose_nothing(tmp_path, names, redis_cluster):
    async def fault(cluster):
        source, target = redis_cluster.masters()[:2]
        await trio.to_thread.run_sync(redis_cluster.reshard, source, target, 4000)

    await run_with_fault(tmp_path, names, fault, redis_url=redis_cluster.url)


async def test_a_sentinel_failover_under_traffic_loses_nothing(tmp_path, names):
    with SentinelSet() as sentinels:

        async def fault(cluster):
            await trio.to_thread.run_sync(sentinels.fail_over)

        await run_with_fault(tmp_path, names, fault, redis_url=sentinels.url)
        env = {"CHATD_REDIS_URL": sentinels.url, "CHATD_DATA_DIR": str(tmp_path)}
        result = await trio.to_thread.run_sync(lambda: ctl(env, "nodes"))
        assert result.exit_code == 0, result.output
        promoted = f"{sentinels.master.host}:{sentinels.master.port}"
        assert f"at {promoted} (sentinels" in result.stdout.splitlines()[-1], result.stdout
