"""End to end against a real `chatd serve`: replies, reactions, edits and
deletions (the frames of docs/protocol.md, "Replies, reactions, edits,
deletions")."""

import pytest
import trio

from harness.client import ChatClient, connect
from harness.procs import ChatdProcess

pytestmark = pytest.mark.e2e


def dm(a: str, b: str) -> str:
    return f"dm:{min(a, b)}:{max(a, b)}"


async def sent_message(sender: ChatClient, body: str, **kw) -> dict:
    cid = await sender.send(body, **kw)
    return await sender.expect("sent", cid=cid)


async def test_reply_react_edit_delete_live(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with (
        connect(server.ws_url, alice) as a,
        connect(server.ws_url, alice) as a2,
        connect(server.ws_url, bob) as b,
    ):
        await a.auth(ta)
        await a2.auth(ta)
        await b.auth(tb)
        first = await sent_message(a, "lunch at noon?", to=bob)
        await b.expect("message", id=first["id"])

        # A reply names the message it answers, on every copy.
        reply = await sent_message(b, "sure", to=alice, reply_to=first["id"])
        got = await a.expect("message", id=reply["id"])
        assert got["reply_to"] == first["id"]

        # A reaction: applied for the actor, an event for the others.
        cid = await b.act("react", first["id"], emoji="👍")
        applied = await b.expect("applied", cid=cid)
        assert applied["action"] == "react" and applied["id"] == first["id"]
        assert applied["eseq"] == 1 and applied["conversation"] == first["conversation"]
        for device in (a, a2):
            ev = await device.expect("reaction", eid=applied["eid"])
            assert (ev["emoji"], ev["on"], ev["by"], ev["eseq"]) == ("👍", True, bob, 1)
        await a.ack(events=[applied["eid"]])

        # An edit by the sender: the new body reaches the others and the
        # sender's other device; the sender's device gets applied.
        cid = await a.act("edit", first["id"], body="lunch at one?")
        applied = await a.expect("applied", cid=cid)
        assert applied["action"] == "edit" and applied["eseq"] == 2
        ev = await b.expect("edited", eid=applied["eid"])
        assert ev["body"] == "lunch at one?" and ev["id"] == first["id"] and ev["by"] == alice
        await a2.expect("edited", eid=applied["eid"])
        await a.quiet("edited")  # the editing device got `applied` alone
        await b.ack(events=[ev["eid"]])

        # History: the latest body, the edit time, the reactions, the reply,
        # and the cid only for the sender.
        status, body = await api.call("GET", f"/api/conversations/{dm(alice, bob)}/messages", ta)
        assert status == 200
        m1, m2 = body["messages"]
        assert m1["body"] == "lunch at one?" and m1["edited_ts"] >= m1["ts"]
        assert m1["reactions"] == [{"emoji": "👍", "count": 1, "mine": False, "users": [bob]}]
        assert m1["cid"] == first["cid"] and m2["cid"] is None
        assert m2["reply_to"] == first["id"]
        status, body = await api.call("GET", f"/api/conversations/{dm(alice, bob)}/messages", tb)
        m1, m2 = body["messages"]
        assert m1["reactions"][0]["mine"] is True and m1["cid"] is None
        assert m2["cid"] == reply["cid"]

        # Delete for everyone: a tombstone that keeps the seq.
        cid = await a.act("delete", first["id"])
        applied = await a.expect("applied", cid=cid)
        ev = await b.expect("deleted", eid=applied["eid"])
        assert ev["id"] == first["id"] and ev["eseq"] == 3
        status, body = await api.call("GET", f"/api/conversations/{dm(alice, bob)}/messages", tb)
        tomb, m2 = body["messages"]
        assert tomb["deleted"] is True and tomb["body"] is None and tomb["seq"] == 1
        assert tomb["reactions"] == [] and m2["reply_to"] == first["id"]


async def test_refused_requests_change_nothing(server, api, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    async with (
        connect(server.ws_url, alice) as a,
        connect(server.ws_url, bob) as b,
        connect(server.ws_url, carol) as c,
    ):
        await a.auth(ta)
        await b.auth(tb)
        await c.auth(tc)
        msg = await sent_message(a, "original", to=bob)
        private = await sent_message(a, "for carol only", to=carol)

        async def refused(client: ChatClient, type: str, id: str, code: str, **kw) -> None:
            cid = await client.act(type, id, **kw)
            error = await client.expect("error", cid=cid)
            assert error["code"] == code, error

        await refused(b, "edit", msg["id"], "forbidden", body="hacked")
        await refused(b, "delete", msg["id"], "forbidden")
        await refused(b, "react", "01NOSUCHMESSAGE00000000000", "not_found", emoji="👍")
        # Someone else's conversation: as if the message did not exist.
        await refused(b, "react", private["id"], "not_found", emoji="👍")
        await refused(b, "delete", private["id"], "not_found")
        await refused(b, "react", msg["id"], "bad_request", emoji="thumbs up")
        await refused(a, "edit", msg["id"], "too_large", body="x" * 4001)
        await refused(a, "edit", msg["id"], "bad_request", body="   ")
        # A reply to a message of another conversation.
        cid = await b.send("re", to=alice, reply_to=private["id"])
        assert (await b.expect("error", cid=cid))["code"] == "not_found"

        # Each refusal was answered: whatever it routed is in, by a round trip.
        await a.quiet("reaction")
        await c.quiet("reaction")
        status, body = await api.call("GET", f"/api/conversations/{dm(alice, bob)}/messages", ta)
        [stored] = body["messages"]
        assert stored["body"] == "original" and stored["edited_ts"] is None
        assert stored["reactions"] == [] and "deleted" not in stored
        # Positive control: the same requests from the right user work, and
        # their events reach alice and carol.
        cid = await a.act("edit", msg["id"], body="fixed")
        assert (await a.expect("applied", cid=cid))["eseq"] == 1
        cid = await b.act("react", msg["id"], emoji="👍")
        ok = await b.expect("applied", cid=cid)
        await a.expect("reaction", eid=ok["eid"], by=bob)
        cid = await a.act("react", private["id"], emoji="👍")
        ok = await a.expect("applied", cid=cid)
        await c.expect("reaction", eid=ok["eid"], by=alice)


async def test_requests_are_idempotent_by_cid(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        await a.auth(ta)
        await b.auth(tb)
        msg = await sent_message(a, "hi", to=bob)
        await b.act("react", msg["id"], cid="r-1", emoji="🎉")
        first = await b.expect("applied", cid="r-1")
        await a.expect("reaction", eid=first["eid"])
        await b.act("react", msg["id"], cid="r-1", emoji="🎉")
        again = await b.expect("applied", cid="r-1")
        assert again == first
        await a.quiet("reaction")  # answered again, routed nothing again


async def test_events_owed_to_an_offline_member_come_in_eseq_order(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(server.ws_url, bob) as b, connect(server.ws_url, alice) as a:
        await b.auth(tb)
        await a.auth(ta)
        kept = await sent_message(a, "keep me", to=bob)
        gone = await sent_message(a, "delete me", to=bob)
        await b.expect("message", id=kept["id"])
        await b.expect("message", id=gone["id"])
        await b.ack([kept["id"], gone["id"]])
    # bob is offline now.
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        eids = []
        for frame in (
            {"type": "react", "id": kept["id"], "emoji": "👍"},
            {"type": "edit", "id": kept["id"], "body": "kept, edited"},
            {"type": "edit", "id": gone["id"], "body": "about to go"},
            {"type": "delete", "id": gone["id"]},
        ):
            fields = {k: v for k, v in frame.items() if k not in ("type", "id")}
            cid = await a.act(frame["type"], frame["id"], **fields)
            eids.append((await a.expect("applied", cid=cid))["eid"])
    async with connect(server.ws_url, bob) as b:
        await b.auth(tb)
        react = await b.expect("reaction")
        edited = await b.expect("edited")
        deleted = await b.expect("deleted")
        # The edit of the deleted message is no longer owed: its body is erased.
        assert [react["eseq"], edited["eseq"], deleted["eseq"]] == [1, 2, 4]
        assert edited["body"] == "kept, edited" and deleted["id"] == gone["id"]
        # The backlog's events come in eseq order: eseq 3 would precede eseq 4.
        await b.quiet("edited", before=deleted)
        arrived = [f["eseq"] for f in b.frames if f["type"] in ("reaction", "edited", "deleted")]
        assert arrived == sorted(arrived)
        await b.ack(events=[react["eid"], edited["eid"], deleted["eid"]])
        await b.sync()  # the ack is written
    async with connect(server.ws_url, bob) as b, connect(server.ws_url, alice) as a:
        await b.auth(tb)
        await a.auth(ta)
        # Acked: nothing comes again. The first event bob gets is a new one.
        cid = await a.act("react", kept["id"], emoji="🎉")
        new = await a.expect("applied", cid=cid)
        first = await b.expect("reaction")
        assert first["eid"] == new["eid"] and first["eseq"] == 5
        # Live frames wait for the backlog: any re-offered event came before it.
        assert [f["type"] for f in b.frames if f["type"] in ("edited", "deleted")] == []


async def test_the_edit_window(tmp_path, names):
    from harness.client import Api

    proc = ChatdProcess(tmp_path, args=["--edit-window", "1"])
    proc.start()
    api = Api(proc.http_url)
    try:
        alice, bob = names("alice"), names("bob")
        ta = await api.user(alice)
        await api.user(bob)
        async with connect(proc.ws_url, alice) as a:
            await a.auth(ta)
            msg = await sent_message(a, "typo", to=bob)
            cid = await a.act("edit", msg["id"], body="fixed in time")
            await a.expect("applied", cid=cid)
            await trio.sleep(1.2)
            cid = await a.act("edit", msg["id"], body="too late")
            error = await a.expect("error", cid=cid)
            assert error["code"] == "forbidden" and "too old" in error["message"]
    finally:
        await api.aclose()
        assert proc.stop() == 0
