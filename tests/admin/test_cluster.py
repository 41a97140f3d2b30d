"""``chatctl presence`` and ``chatctl nodes`` against a running cluster: two
chatd replicas sharing one real redis-server, with devices held open on
each while chatctl runs."""

from __future__ import annotations

import json

import pytest
import trio

from harness.client import Api, connect
from harness.cluster import Cluster
from tests.admin.conftest import ctl, until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), replicas=2, with_nginx=False).start()
    yield c
    assert c.close() == [0, 0], c.logs()


async def run_ctl(cluster: Cluster, *args: str):
    env = {"CHATD_REDIS_URL": cluster.redis.url, "CHATD_DATA_DIR": str(cluster.data_dir)}
    result = await trio.to_thread.run_sync(lambda: ctl(env, *args))
    assert result.exit_code == 0, (result.output, result.stderr)
    return result


async def test_presence_and_nodes_across_replicas(cluster):
    api = Api(cluster.nodes[0].http_url)
    tokens = {u: await api.user(u) for u in ("ann", "ben", "cat")}
    await api.aclose()
    r1, r2 = cluster.nodes[0].ws_url, cluster.nodes[1].ws_url
    async with (
        connect(r1, "ann@r1") as a1,
        connect(r1, "ann@r1-laptop") as a2,
        connect(r2, "ann@r2") as a3,
        connect(r2, "ben@r2") as b,
        connect(r1, "cat") as c,
    ):
        for client, user in ((a1, "ann"), (a2, "ann"), (a3, "ann"), (b, "ben"), (c, "cat")):
            await client.auth(tokens[user])
        await c.ws.aclose()  # cat leaves again
        await c.expect_closed()

        async def settled() -> list | None:
            # Heartbeats carry the counts: at most one interval (3 s) behind.
            found = json.loads((await run_ctl(cluster, "nodes", "--json")).stdout)
            counts = [(n["node"], n["connections"], n["users"]) for n in found]
            return found if counts == [("r1", 2, 1), ("r2", 2, 2)] else None

        nodes = await until(settled, timeout=10, step=0.5)
        for n in nodes:
            assert n["incarnation"].startswith(n["node"] + "#")
            assert 0 <= n["heartbeat_age_ms"] < 10_000 and n["started_at"]
        table = (await run_ctl(cluster, "nodes")).stdout.splitlines()
        assert table[0].split() == [
            "NODE",
            "INCARNATION",
            "CONNECTIONS",
            "USERS",
            "HEARTBEAT",
            "UP",
            "SINCE",
        ]
        assert table[1].split()[:4] == ["r1", nodes[0]["incarnation"], "2", "1"]
        assert "2 live nodes" in table
        redis_line = f"redis: standalone, redis://127.0.0.1:{cluster.redis.port}/0, sharded pub/sub"
        assert table[-1] == redis_line

        online = json.loads((await run_ctl(cluster, "presence", "--json")).stdout)
        assert online == [{"user": "ann", "nodes": ["r1", "r2"]}, {"user": "ben", "nodes": ["r2"]}]
        text = (await run_ctl(cluster, "presence")).stdout
        assert "ann   r1, r2" in text and text.splitlines()[-1] == "2 users online"
        shown = json.loads((await run_ctl(cluster, "users", "show", "ann", "--json")).stdout)
        assert shown["presence"]["online"] and shown["presence"]["nodes"] == ["r1", "r2"]

    # Everyone gone: presence empties as the replicas detach.
    async def nobody() -> bool:
        return json.loads((await run_ctl(cluster, "presence", "--json")).stdout) == []

    await until(nobody, timeout=10, step=0.2)
    st = json.loads((await run_ctl(cluster, "stats", "--json")).stdout)
    assert set(st["nodes"]) == {"r1", "r2"}
