"""Idempotent resend, several devices of one user, groups, typing, presence,
history paging: against a real chatd process."""

import pytest

from harness.client import connect

pytestmark = pytest.mark.e2e


async def test_idempotent_resend(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        await a.auth(ta)
        await b.auth(tb)
        await a.send("once", to=bob, cid="same-cid")
        first = await a.expect("sent", cid="same-cid")
        await a.send("once", to=bob, cid="same-cid")
        second = await a.expect("sent", cid="same-cid")
        assert (second["id"], second["seq"], second["ts"]) == (
            first["id"],
            first["seq"],
            first["ts"],
        )
        msg = await b.expect("message", id=first["id"])
        assert msg["seq"] == 1
        # A later message on the same path: the resend delivered no second copy before it.
        marker = await a.expect("sent", cid=await a.send("after", to=bob))
        await b.quiet("message", before=await b.expect("message", id=marker["id"]))
    # Even from a new connection (a retry after reconnect).
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        await a.send("once", to=bob, cid="same-cid")
        third = await a.expect("sent", cid="same-cid")
        assert third["id"] == first["id"]
    status, body = await api.call("GET", f"/api/conversations/{first['conversation']}/messages", ta)
    assert [m["id"] for m in body["messages"]] == [first["id"], marker["id"]]


async def test_two_devices_of_one_user(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with (
        connect(server.ws_url, "alice-phone") as a1,
        connect(server.ws_url, "alice-laptop") as a2,
        connect(server.ws_url, "bob-phone") as b1,
        connect(server.ws_url, "bob-laptop") as b2,
    ):
        for c, t in ((a1, ta), (a2, ta), (b1, tb), (b2, tb)):
            await c.auth(t)
        cid = await a1.send("to both of your devices", to=bob)
        sent = await a1.expect("sent", cid=cid)
        # Every device of the recipient gets it live.
        m1 = await b1.expect("message", id=sent["id"])
        m2 = await b2.expect("message", id=sent["id"])
        assert m1 == m2
        # The sender's other device sees what was sent (never owed).
        echo = await a2.expect("message", id=sent["id"])
        assert echo["from"] == alice and echo["body"] == "to both of your devices"
        # Not echoed to the sending device. The control, and the barrier: what
        # the other device sends next is echoed to it.
        cid = await a2.send("from the laptop", to=bob)
        other = await a2.expect("sent", cid=cid)
        await a1.quiet("message", before=await a1.expect("message", id=other["id"]))
        # One device acks: delivered; both sender devices get the receipt.
        await b2.ack([sent["id"], other["id"]])
        await a1.expect("receipt", id=sent["id"], status="delivered")
        r = await a2.expect("receipt", id=sent["id"], status="delivered")
        r2 = await a2.expect("receipt", id=other["id"], status="delivered")
        await a2.ack(receipts=[r["rid"], r2["rid"]])
    # Acked by one device: not owed to bob any more, on any device; the
    # receipt acked by one of alice's devices is not owed to her either. The
    # first frames the new devices get are about a message sent afterwards.
    async with (
        connect(server.ws_url, "bob-tablet") as b3,
        connect(server.ws_url, "alice-new") as a3,
    ):
        await b3.auth(tb)
        await a3.auth(ta)
        # Live frames wait for a connection's backlog: anything re-offered
        # would come before these live ones.
        cid = await a3.send("later", to=bob)
        later = await a3.expect("sent", cid=cid)
        await b3.quiet("message", before=await b3.expect("message", id=later["id"]))
        await b3.ack([later["id"]])
        await a3.quiet(
            "receipt", before=await a3.expect("receipt", id=later["id"], status="delivered")
        )


async def test_unacked_message_is_offered_again(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        await a.auth(ta)
        await b.auth(tb)
        cid = await a.send("ack me", to=bob)
        sent = await a.expect("sent", cid=cid)
        await b.expect("message", id=sent["id"])  # received, but never acked
    async with connect(server.ws_url, bob) as b:
        await b.auth(tb)
        again = await b.expect("message", id=sent["id"])
        assert again["body"] == "ack me"


async def test_group_of_three_with_per_member_receipts(server, api, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    status, group = await api.call(
        "POST", "/api/conversations", ta, json={"members": [bob, carol.upper()], "title": "trio"}
    )
    assert status == 201, group
    assert group["members"] == sorted([alice, bob, carol]) and group["title"] == "trio"
    gid = group["id"]
    async with (
        connect(server.ws_url, alice) as a,
        connect(server.ws_url, bob) as b,
        connect(server.ws_url, carol) as c,
    ):
        for cl, t in ((a, ta), (b, tb), (c, tc)):
            await cl.auth(t)
        cid = await a.send("hello group", conversation=gid)
        sent = await a.expect("sent", cid=cid)
        mb = await b.expect("message", id=sent["id"])
        mc = await c.expect("message", id=sent["id"])
        assert mb["conversation"] == mc["conversation"] == gid
        await b.seen([sent["id"]])
        got = [await a.expect("receipt", id=sent["id"]) for _ in range(2)]
        assert {(r["by"], r["status"]) for r in got} == {(bob, "delivered"), (bob, "seen")}
        await c.ack([sent["id"]])
        r = await a.expect("receipt", id=sent["id"], by=carol)
        assert r["status"] == "delivered"
        await a.quiet("receipt")  # no more receipts than those three
        # Members reply; typing reaches the others, not the typist.
        await c.send_json({"type": "typing", "conversation": gid})
        t1 = await a.expect("typing")
        t2 = await b.expect("typing")
        assert t1 == t2 == {"type": "typing", "conversation": gid, "from": carol}
        # The control, and the barrier: alice's typing, sent after, reaches carol.
        await a.send_json({"type": "typing", "conversation": gid})
        t3 = await c.expect("typing", where=lambda f: f["from"] == alice)
        await c.quiet("typing", before=t3)
    status, body = await api.call("GET", f"/api/conversations/{gid}/messages", tc)
    [m] = body["messages"]
    assert m["delivered_to"] == sorted([bob, carol]) and m["seen_by"] == [bob]


async def test_presence_and_last_seen(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        cid = await a.send("hi", to=bob)  # makes them share a conversation
        conv = (await a.expect("sent", cid=cid))["conversation"]
        status, info = await api.call("GET", f"/api/users/{bob}", ta)
        assert status == 200 and info == {"username": bob, "online": False, "last_seen": None}
        async with connect(server.ws_url, bob) as b:
            await b.auth(tb)
            p = await a.expect("presence", user=bob)
            assert p["online"] is True
            status, info = await api.call("GET", f"/api/users/{bob}", ta)
            assert info["online"] is True
            async with connect(server.ws_url, bob) as b2:
                await b2.auth(tb)
                # A second device changes nothing. Its `ready` comes after its
                # presence was settled (and announced, had it been the first):
                # its typing, routed to alice after that, is the barrier.
                await b2.send_json({"type": "typing", "conversation": conv})
                typing = await a.expect("typing", where=lambda f: f["from"] == bob)
                await a.quiet("presence", before=typing)
        p = await a.expect("presence", user=bob)
        assert p["online"] is False and isinstance(p["last_seen"], int)
        status, info = await api.call("GET", f"/api/users/{bob}", ta)
        assert info["online"] is False and info["last_seen"] == p["last_seen"]
        # Nor did the second device's leaving: bob coming back is the barrier;
        # alice heard exactly one offline before his next online.
        async with connect(server.ws_url, bob) as b3:
            await b3.auth(tb)
            back = await a.expect("presence", user=bob, online=True)
        await a.quiet("presence", before=back)


async def test_history_pagination(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        for i in range(12):
            cid = await a.send(f"n{i}", to=bob)
            sent = await a.expect("sent", cid=cid)
    conv = sent["conversation"]
    path = f"/api/conversations/{conv}/messages"
    status, body = await api.call("GET", path, tb, params={"limit": 5})
    assert status == 200 and [m["seq"] for m in body["messages"]] == [8, 9, 10, 11, 12]
    status, body = await api.call("GET", path, tb, params={"limit": 5, "before": 8})
    assert [m["body"] for m in body["messages"]] == ["n2", "n3", "n4", "n5", "n6"]
    status, body = await api.call("GET", path, tb, params={"before": 3})
    assert [m["seq"] for m in body["messages"]] == [1, 2]
    assert all(m["from"] == alice and m["id"] and m["ts"] for m in body["messages"])
    for params in ({"limit": 0}, {"limit": 201}, {"limit": "x"}, {"before": 0}):
        status, body = await api.call("GET", path, tb, params=params)
        assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await api.call("GET", "/api/conversations/g:01NOPE/messages", tb)
    assert status == 404
    status, body = await api.call("GET", path)
    assert status == 401
    status, body = await api.call("GET", "/api/conversations", tb)
    [c] = body["conversations"]
    assert c["id"] == conv and c["last_seq"] == 12 and c["unread"] == 12
    assert c["members"] == sorted([alice, bob]) and c["last_message"]["body"] == "n11"
