"""Several chatd replicas sharing one real Redis, behind a real NGINX.

Cross-replica behaviour with users pinned to replicas (direct connections),
then fault injection through NGINX with clients that behave like real apps
(reconnect, re-send unconfirmed messages with the same cid, ack what they
get): every message that got `sent` must reach every recipient; duplicates
are allowed only as repeated ids.
"""

from __future__ import annotations

import time

import pytest
import trio

from harness.client import Api, connect
from harness.cluster import Cluster
from harness.faults import run_with_fault
from harness.nginx import requires_nginx

pytestmark = [
    pytest.mark.e2e,
    requires_nginx(),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), replicas=3).start()
    yield c
    codes = c.close()
    assert codes == [0, 0, 0], c.logs()


@pytest.fixture
async def api(cluster):
    client = Api(cluster.url)  # through NGINX
    yield client
    await client.aclose()


def ws(cluster: Cluster, i: int) -> str:
    """Connect straight to replica i (pinning a user to it)."""
    return cluster.nodes[i].ws_url


# -- cross-replica behaviour ------------------------------------------------------------


async def test_live_delivery_and_receipts_across_replicas(cluster, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(ws(cluster, 0), alice) as a, connect(ws(cluster, 1), bob) as b:
        assert (await a.auth(ta))["node"] == "r1"
        assert (await b.auth(tb))["node"] == "r2"
        cid = await a.send("across the cluster", to=bob)
        sent = await a.expect("sent", cid=cid)
        msg = await b.expect("message", id=sent["id"])
        assert msg["body"] == "across the cluster"
        await b.seen([msg["id"]])
        d = await a.expect("receipt", id=sent["id"], status="delivered")
        s = await a.expect("receipt", id=sent["id"], status="seen")
        await a.ack(receipts=[d["rid"], s["rid"]])
        # typing and presence cross replicas too
        await b.send_json({"type": "typing", "conversation": sent["conversation"]})
        t = await a.expect("typing")
        assert t["from"] == bob
    async with connect(ws(cluster, 0), alice) as a:
        await a.auth(ta)
        async with connect(ws(cluster, 2), bob) as b:
            await b.auth(tb)
            # (The "offline" of bob's previous connection, on r2, may still be
            # on its way when alice connects: match the frames by content.)
            await a.expect("presence", user=bob, online=True)
            leaving = time.time() * 1000
        p = await a.expect(
            "presence", lambda f: not f["online"] and f["last_seen"] >= leaving - 5, user=bob
        )
        assert p["last_seen"]
        status, info = await api.call("GET", f"/api/users/{bob}", ta)
        assert status == 200 and info["online"] is False


async def test_a_senders_devices_on_different_replicas(cluster, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with (
        connect(ws(cluster, 0), "alice@r1") as a1,
        connect(ws(cluster, 2), "alice@r3") as a3,
        connect(ws(cluster, 1), "bob@r2") as b,
    ):
        for c, t in ((a1, ta), (a3, ta), (b, tb)):
            await c.auth(t)
        cid = await a1.send("from my phone", to=bob)
        sent = await a1.expect("sent", cid=cid)
        echo = await a3.expect("message", id=sent["id"])  # the laptop shows it too
        assert echo["from"] == alice
        await b.expect("message", id=sent["id"])
        await b.ack([sent["id"]])
        await a1.expect("receipt", id=sent["id"], status="delivered")
        await a3.expect("receipt", id=sent["id"], status="delivered")


async def test_group_spread_over_replicas(cluster, api, names):
    users = [names(f"g{i}x") for i in range(4)]
    tokens = [await api.user(u) for u in users]
    status, group = await api.call(
        "POST", "/api/conversations", tokens[0], json={"members": users[1:], "title": "spread"}
    )
    assert status == 201
    async with (
        connect(ws(cluster, 0), users[0]) as c0,
        connect(ws(cluster, 1), users[1]) as c1,
        connect(ws(cluster, 2), users[2]) as c2,
        connect(cluster.ws_url, users[3]) as c3,  # wherever NGINX puts it
    ):
        clients = [c0, c1, c2, c3]
        for c, t in zip(clients, tokens, strict=True):
            await c.auth(t)
        cid = await c1.send("hello everyone", conversation=group["id"])
        sent = await c1.expect("sent", cid=cid)
        for c in (c0, c2, c3):
            m = await c.expect("message", id=sent["id"])
            await c.seen([m["id"]])
        receipts = [await c1.expect("receipt", id=sent["id"]) for _ in range(6)]
        assert {(r["by"], r["status"]) for r in receipts} == {
            (u, s) for u in (users[0], users[2], users[3]) for s in ("delivered", "seen")
        }


async def test_nginx_serves_api_websocket_and_web_client(cluster, api, names):
    status, body = await api.call("GET", "/api/info")
    assert status == 200 and body["ws_url"] == "/ws"
    resp = await api.http.get("/")
    assert resp.status_code == 200 and "<html" in resp.text.lower()
    nodes = set()
    alice = names("alice")
    token = await api.user(alice)
    for _ in range(6):
        async with connect(cluster.ws_url, alice) as a:
            nodes.add((await a.auth(token))["node"])
    assert len(nodes) >= 2  # balanced over the replicas
    status, body = await api.call("GET", "/readyz")
    assert status == 200 and body["checks"] == {"store": "ok", "broker": "ok"}


# -- fault injection ----------------------------------------------------------------------


async def test_kill_9_a_replica_while_messages_flow(tmp_path, names):
    async def fault(cluster):
        cluster.kill(0)

    traffic = await run_with_fault(tmp_path, names, fault)
    # The clients NGINX had put on r1 lost their socket and came back elsewhere.
    assert any(c.connections > 1 for c in traffic.clients)
    assert all(c.nodes[-1] != "r1" for c in traffic.clients)


async def test_a_killed_replicas_users_go_offline_for_their_peers(tmp_path, names):
    """kill -9 a replica: once its heartbeat expires, exactly one survivor
    announces its users offline (last-seen about when it died); a user who
    is also connected to a survivor stays online."""
    c = Cluster(tmp_path, replicas=3, with_nginx=False).start()
    try:
        api = Api(c.nodes[0].http_url)
        alice, bob, carol = names("alice"), names("bob"), names("carol")
        zed = names("zed")  # named to come after carol
        ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
        tz = await api.user(zed)
        async with (
            connect(c.nodes[0].ws_url, alice) as a,
            connect(c.nodes[1].ws_url, bob) as b,
            connect(c.nodes[1].ws_url, "carol@r2") as c2,
            connect(c.nodes[2].ws_url, "carol@r3") as c3,
            connect(c.nodes[1].ws_url, zed) as z,
        ):
            for conn, token in ((a, ta), (b, tb), (c2, tc), (c3, tc), (z, tz)):
                await conn.auth(token)
            for peer in (bob, carol, zed):  # one-to-one conversations: presence peers
                await a.expect("sent", cid=await a.send("hi", to=peer))
            killed_at = time.time() * 1000
            c.kill(1)
            p = await a.expect("presence", lambda f: not f["online"], user=bob, timeout=30)
            assert killed_at - 4000 <= p["last_seen"] <= killed_at + 100, (p, killed_at)
            # No offline for carol. The barrier: the survivor announces the
            # dead node's users one after another in name order (bob, carol,
            # zed), so zed's offline comes after where carol's would be.
            gone = await a.expect("presence", lambda f: not f["online"], user=zed, timeout=10)
            await a.quiet("presence", before=gone, where=lambda f: not f["online"], user=carol)
            status, info = await api.call("GET", f"/api/users/{bob}", ta)
            assert status == 200 and info["online"] is False
            status, info = await api.call("GET", f"/api/users/{carol}", ta)
            assert status == 200 and info["online"] is True
        announced = [i for i in (0, 2) if "node died" in c.nodes[i].logs()]
        assert len(announced) == 1, c.logs()
        await api.aclose()
    finally:
        c.close()


async def test_flushall_mid_run(tmp_path, names):
    async def fault(cluster):
        assert cluster.redis.keys("chatd:*{u:*")  # presence (and queues) to lose
        # Atomic with the flush: traffic goes on writing right after it.
        _, left = cluster.redis.transaction(("FLUSHALL",), ("KEYS", "chatd:*{u:*"))
        assert left == []  # every queue and presence entry gone
        # A heartbeat notices (every 3 s) and resyncs: as soon as every replica has.
        with trio.move_on_after(10):
            while not all("resync" in node.logs() for node in cluster.nodes):  # noqa: ASYNC110 - polls log files
                await trio.sleep(0.2)
        for node in cluster.nodes:
            assert "resync" in node.logs(), "the replica did not notice the flush"

    await run_with_fault(tmp_path, names, fault)


async def test_stop_redis_send_then_start_redis(tmp_path, names):
    async def fault(cluster):
        cluster.redis.stop()
        api = Api(cluster.url)
        try:
            await trio.sleep(0.5)
            status, body = await api.call("GET", "/readyz")
            assert status == 503 and body["error"]["code"] == "unavailable"
            assert body["checks"]["store"] == "ok" and body["checks"]["broker"] != "ok"
            await trio.sleep(1.5)  # traffic keeps flowing into the store meanwhile
            cluster.redis.start()
            with trio.fail_after(15):
                while (await api.call("GET", "/readyz"))[0] != 200:  # noqa: ASYNC110 - polls HTTP
                    await trio.sleep(0.2)
        finally:
            await api.aclose()

    await run_with_fault(tmp_path, names, fault)


async def test_rolling_restart_under_traffic(tmp_path, names):
    async def fault(cluster):
        for i in range(len(cluster.nodes)):
            assert cluster.stop(i) == 0  # drains: 1001, clients move on via NGINX
            cluster.restart(i)
            await trio.sleep(0.5)

    traffic = await run_with_fault(tmp_path, names, fault)
    assert all(c.connections >= 2 for c in traffic.clients)  # everyone was moved at least once
