"""Reactions, edits and deletions across two replicas behind NGINX on one
real Redis: owed to an offline member until acked, in eseq order, and a
deletion erases the body from the store and from Redis."""

from __future__ import annotations

import base64
import sqlite3

import pytest
import trio

from harness.canary import redis_dump
from harness.client import Api, connect
from harness.cluster import Cluster
from harness.nginx import requires_nginx

pytestmark = [pytest.mark.e2e, requires_nginx()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("events"), replicas=2).start()
    yield c
    assert c.close() == [0, 0], c.logs()


def redis_values(port: int) -> bytes:
    """Every key and value in the test's Redis, as one blob to search."""
    return redis_dump(port)


def stored_body(cluster: Cluster, message_id: str) -> tuple[bytes, bytes]:
    db = sqlite3.connect(cluster.data_dir / "chatd.sqlite3")
    try:
        row = db.execute(
            "SELECT nonce, ciphertext FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
    finally:
        db.close()
    return bytes(row[0]), bytes(row[1])


async def test_offline_member_converges_and_delete_erases(cluster, names):
    api = Api(cluster.url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    await api.aclose()
    # bob has seen and acked the first message, then goes offline.
    async with connect(cluster.nodes[1].ws_url, bob) as b, connect(cluster.ws_url, alice) as a:
        await b.auth(tb)
        await a.auth(ta)
        cid = await a.send("first", to=bob)
        first = await a.expect("sent", cid=cid)
        await b.expect("message", id=first["id"])
        await b.ack([first["id"]])
        await a.expect("receipt", id=first["id"], status="delivered")
    # alice on replica 1 acts while bob is away.
    async with connect(cluster.nodes[0].ws_url, alice) as a:
        await a.auth(ta)
        cid = await a.send("secret plan", to=bob)
        doomed = await a.expect("sent", cid=cid)
        actions = [
            ("react", first["id"], {"emoji": "👍"}),
            ("edit", first["id"], {"body": "first, edited"}),
            ("edit", doomed["id"], {"body": "secret plan, v2"}),
        ]
        applied = []
        for type, id, fields in actions:
            cid = await a.act(type, id, **fields)
            applied.append(await a.expect("applied", cid=cid))
        # Positive control: the doomed message's ciphertexts sit in Redis
        # (bob's queue) and in the store before the deletion.
        nonce, ct = stored_body(cluster, doomed["id"])
        before = redis_values(cluster.redis.port)
        assert ct and base64.b64encode(ct) in before
        assert f'"k":"m","id":"{doomed["id"]}"'.encode() in before
        cid = await a.act("delete", doomed["id"])
        deleted = await a.expect("applied", cid=cid)
    assert stored_body(cluster, doomed["id"]) == (b"", b"")
    # The queue entries go right after the answer (settled without waiting).
    queued = f'"k":"m","id":"{doomed["id"]}"'.encode()
    for _ in range(100):
        values = redis_values(cluster.redis.port)
        if queued not in values:
            break
        await trio.sleep(0.05)
    assert base64.b64encode(ct) not in values
    assert applied[2]["eid"].encode() not in values  # the queued edit of it, too
    # Only the deletion event still names it; the queued message is gone.
    assert f'"k":"m","id":"{doomed["id"]}"'.encode() not in values

    # bob comes back on replica 2 (through NGINX: either one).
    async with connect(cluster.ws_url, bob) as b:
        await b.auth(tb)
        react = await b.expect("reaction")
        edited = await b.expect("edited")
        gone = await b.expect("deleted")
        assert [react["eseq"], edited["eseq"], gone["eseq"]] == [1, 2, 4]
        assert edited["body"] == "first, edited" and gone["id"] == doomed["id"]
        assert gone["eid"] == deleted["eid"]
        # The deleted message itself is not offered.
        assert [f for f in b.frames if f["type"] == "message"] == []
        # bob may not edit or delete alice's message (the store on the
        # other replica's side of NGINX judges it the same way).
        for type, fields in (("edit", {"body": "mine now"}), ("delete", {})):
            cid = await b.act(type, first["id"], **fields)
            assert (await b.expect("error", cid=cid))["code"] == "forbidden"
        await b.ack(events=[react["eid"], edited["eid"], gone["eid"]])
        # Positive control for "nothing more": a new event is the next one.
        async with connect(cluster.nodes[0].ws_url, alice) as a:
            await a.auth(ta)
            cid = await a.act("react", first["id"], emoji="🎉")
            new = await a.expect("applied", cid=cid)
        nxt = await b.expect("reaction", eid=new["eid"])
        assert nxt["eseq"] == 5
    async with connect(cluster.ws_url, bob) as b:
        await b.auth(tb)
        again = await b.expect("reaction")
        assert again["eid"] == new["eid"]  # unacked: owed again; the acked ones are not
        assert [f for f in b.frames if f["type"] in ("edited", "deleted")] == []
