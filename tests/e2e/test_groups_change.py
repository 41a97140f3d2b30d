"""Groups that change, across two replicas behind NGINX on one real Redis:
add, remove, leave, rename, admins; a removed member gets nothing sent after
the removal on either replica, a member added later cannot read before
their join."""

from __future__ import annotations

import pytest

from harness.client import Api, connect
from harness.cluster import Cluster
from harness.nginx import requires_nginx

pytestmark = [pytest.mark.e2e, requires_nginx()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("groups"), replicas=2).start()
    yield c
    assert c.close() == [0, 0], c.logs()


@pytest.fixture
async def api(cluster):
    client = Api(cluster.url)  # through NGINX
    yield client
    await client.aclose()


async def test_a_removed_member_gets_nothing_more_on_either_replica(cluster, api, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    status, group = await api.call(
        "POST", "/api/conversations", ta, json={"members": [bob, carol], "title": "team"}
    )
    assert status == 201 and group["admins"] == [alice]
    gid = group["id"]
    r1, r2 = cluster.nodes[0].ws_url, cluster.nodes[1].ws_url
    async with (
        connect(r1, bob) as b1,
        connect(r2, bob) as b2,
        connect(r1, carol) as c,
        connect(r2, alice) as a,
    ):
        for client, token in ((b1, tb), (b2, tb), (c, tc), (a, ta)):
            await client.auth(token)
        cid = await a.send("before", conversation=gid)
        before = await a.expect("sent", cid=cid)
        for client in (b1, b2, c):
            await client.expect("message", id=before["id"])

        status, changed = await api.call("DELETE", f"/api/conversations/{gid}/members/{bob}", ta)
        assert status == 200, changed
        assert changed["members"] == sorted([alice, carol]) and changed["admins"] == [alice]
        # Everyone, the removed member too, hears of it (owed, on both replicas).
        for client in (b1, b2, c, a):
            ev = await client.expect("members", eid=changed["eid"])
            assert (ev["action"], ev["users"], ev["by"]) == ("remove", [bob], alice)
            assert ev["members"] == changed["members"] and ev["id"] is None

        # Sends from both replicas after the removal: carol (r1) and alice (r2).
        after = []
        for sender in (c, a):
            cid = await sender.send("after", conversation=gid)
            after.append((await sender.expect("sent", cid=cid))["id"])
        await c.send_json({"type": "typing", "conversation": gid})
        # Positive control: the remaining members get them, and the typing.
        await c.expect("message", id=after[1])
        await a.expect("message", id=after[0])
        await a.expect("typing", conversation=gid)
        # bob's devices get none of it. The barrier, on both replicas: a
        # one-to-one message from each sender, sent after, routed the same way.
        markers = []
        for sender in (c, a):
            cid = await sender.send("to bob alone", to=bob)
            markers.append((await sender.expect("sent", cid=cid))["id"])
        for device in (b1, b2):
            for marker in markers:
                got = await device.expect("message", id=marker)
                await device.quiet("message", before=got, conversation=gid)
                await device.quiet("typing", before=got, conversation=gid)
            await device.ack(markers)
        # bob may neither send nor read any more.
        cid = await b1.send("still here?", conversation=gid)
        assert (await b1.expect("error", cid=cid))["code"] == "forbidden"
        status, _ = await api.call("GET", f"/api/conversations/{gid}/messages", tb)
        assert status == 403
    # Nothing sent after the removal is owed to bob either.
    async with connect(cluster.ws_url, bob) as b:
        await b.auth(tb)
        await b.expect("message", id=before["id"])  # owed from before: still his
        # A live message waits for the backlog: whatever it offers is in by then.
        async with connect(cluster.ws_url, alice) as a:
            await a.auth(ta)
            cid = await a.send("live", to=bob)
            live = (await a.expect("sent", cid=cid))["id"]
        await b.expect("message", id=live)
        assert not [f for f in b.frames if f["type"] == "message" and f["id"] in after]


async def test_added_member_reads_from_their_join_and_admins_rule(cluster, api, names):
    alice, bob, dave = names("alice"), names("bob"), names("dave")
    ta, tb, td = await api.user(alice), await api.user(bob), await api.user(dave)
    status, group = await api.call("POST", "/api/conversations", ta, json={"members": [bob]})
    gid = group["id"]
    async with connect(cluster.nodes[0].ws_url, alice) as a:
        await a.auth(ta)
        old = []
        for i in range(3):
            cid = await a.send(f"old {i}", conversation=gid)
            old.append((await a.expect("sent", cid=cid))["id"])
        # Only an admin adds: bob is not one.
        status, body = await api.call(
            "POST", f"/api/conversations/{gid}/members", tb, json={"members": [dave]}
        )
        assert status == 403, body
        status, body = await api.call(
            "POST", f"/api/conversations/{gid}/members", ta, json={"members": [dave, "nobody-x1"]}
        )
        assert status == 404  # an unknown user: nothing changes
        status, added = await api.call(
            "POST", f"/api/conversations/{gid}/members", ta, json={"members": [dave]}
        )
        assert status == 200 and dave in added["members"]
        async with connect(cluster.nodes[1].ws_url, dave) as d:
            await d.auth(td)
            joined = await d.expect("members", eid=added["eid"])
            assert joined["action"] == "add" and joined["users"] == [dave]
            status, page = await api.call("GET", f"/api/conversations/{gid}/messages", td)
            assert status == 200 and page["messages"] == []
            cid = await a.send("welcome", conversation=gid)
            welcome = await a.expect("sent", cid=cid)
            await d.expect("message", id=welcome["id"])
            status, page = await api.call("GET", f"/api/conversations/{gid}/messages", td)
            assert [m["id"] for m in page["messages"]] == [welcome["id"]]
            status, page = await api.call(
                "GET", f"/api/conversations/{gid}/messages?before={welcome['seq']}", td
            )
            assert page["messages"] == []  # paging back stops at the join
            # Nor may dave react to or reply to what came before.
            cid = await d.act("react", old[0], emoji="👍")
            assert (await d.expect("error", cid=cid))["code"] == "not_found"
            cid = await d.send("re", conversation=gid, reply_to=old[1])
            assert (await d.expect("error", cid=cid))["code"] == "not_found"
            # The others still read everything.
            status, page = await api.call("GET", f"/api/conversations/{gid}/messages", tb)
            assert [m["id"] for m in page["messages"]] == [*old, welcome["id"]]

            # Rename and admins; the last admin leaving hands the group on.
            status, renamed = await api.call(
                "PATCH", f"/api/conversations/{gid}", ta, json={"title": "Lunch club"}
            )
            assert status == 200 and renamed["title"] == "Lunch club"
            ev = await d.expect("members", eid=renamed["eid"])
            assert ev["action"] == "rename" and ev["title"] == "Lunch club"
            status, promoted = await api.call(
                "POST", f"/api/conversations/{gid}/admins", ta, json={"members": [dave]}
            )
            assert status == 200 and promoted["admins"] == sorted([alice, dave])
            status, left = await api.call("DELETE", f"/api/conversations/{gid}/members/{alice}", ta)
            assert status == 200 and alice not in left["members"]
            ev = await d.expect("members", eid=left["eid"])
            assert ev["action"] == "leave" and ev["admins"] == [dave]
            status, listed = await api.call("GET", "/api/conversations", td)
            [conv] = [c for c in listed["conversations"] if c["id"] == gid]
            assert conv["title"] == "Lunch club" and conv["admins"] == [dave]
            status, body = await api.call("DELETE", f"/api/conversations/{gid}/admins/{dave}", td)
            assert status == 400  # the only admin
