"""End to end against a real `chatd serve`: the core flows of the wire contract."""

import pytest

from harness.client import connect

pytestmark = pytest.mark.e2e


async def test_send_deliver_seen_roundtrip(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        ready = await a.auth(ta)
        assert ready["user"] == alice and ready["node"]
        await b.auth(tb)

        cid = await a.send("hello bob", to=bob)
        sent = await a.expect("sent", cid=cid)
        assert sent["conversation"] == f"dm:{min(alice, bob)}:{max(alice, bob)}"
        assert sent["seq"] == 1

        msg = await b.expect("message", id=sent["id"])
        assert msg["body"] == "hello bob" and msg["from"] == alice
        assert msg["seq"] == 1 and msg["conversation"] == sent["conversation"]

        await b.ack([msg["id"]])
        delivered = await a.expect("receipt", id=sent["id"], status="delivered")
        assert delivered["by"] == bob
        await b.seen([msg["id"]])
        seen = await a.expect("receipt", id=sent["id"], status="seen")
        assert seen["by"] == bob and seen["rid"] != delivered["rid"]
        await a.ack(receipts=[delivered["rid"], seen["rid"]])

        status, body = await api.call(
            "GET", f"/api/conversations/{sent['conversation']}/messages", ta
        )
        assert status == 200
        [stored] = body["messages"]
        assert stored["delivered_to"] == [bob] and stored["seen_by"] == [bob]
        assert stored["body"] == "hello bob"


async def test_offline_recipient_gets_backlog_in_order(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        sent = []
        for i in range(5):
            cid = await a.send(f"m{i}", to=bob)
            sent.append(await a.expect("sent", cid=cid))
    async with connect(server.ws_url, bob) as b:
        await b.auth(tb)
        got = [await b.expect("message") for _ in range(5)]
        assert [m["body"] for m in got] == [f"m{i}" for i in range(5)]
        assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
        assert [m["id"] for m in got] == [s["id"] for s in sent]
        await b.ack([m["id"] for m in got])
        await b.sync()  # the ack is written
    # Acked: the next connection is offered nothing — the first message it
    # gets is one sent after it connected (live frames wait for the backlog,
    # so anything re-offered would have come before it).
    async with connect(server.ws_url, bob) as b, connect(server.ws_url, alice) as a:
        await b.auth(tb)
        await a.auth(ta)
        cid = await a.send("fresh", to=bob)
        fresh = await a.expect("sent", cid=cid)
        await b.quiet("message", before=await b.expect("message", id=fresh["id"]))


async def test_receipt_waits_for_offline_sender(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        cid = await a.send("are you there", to=bob)
        sent = await a.expect("sent", cid=cid)
    async with connect(server.ws_url, bob) as b:
        await b.auth(tb)
        msg = await b.expect("message", id=sent["id"])
        await b.seen([msg["id"]])
        await b.sync()  # the mark is written
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        d = await a.expect("receipt", id=sent["id"], status="delivered")
        s = await a.expect("receipt", id=sent["id"], status="seen")
        await a.ack(receipts=[s["rid"]])  # seen supersedes delivered
        await a.sync()  # the ack is written
        assert d["by"] == s["by"] == bob
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        await a.auth(ta)
        # Nothing acked came back: the first receipt is for a new message (a
        # live one, so anything of the backlog would have come before it).
        cid = await a.send("and now?", to=bob)
        fresh = await a.expect("sent", cid=cid)
        await b.auth(tb)
        await b.ack([(await b.expect("message", id=fresh["id"]))["id"]])
        await a.quiet("receipt", before=await a.expect("receipt", id=fresh["id"]))
