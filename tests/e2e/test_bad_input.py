"""Every bad-input class of the contract gets its defined answer, the
connection keeps working where the contract says so, and nothing already
stored is lost or altered."""

import json

import pytest
import trio

from harness.client import connect

pytestmark = pytest.mark.e2e


async def pair(api, names):
    alice, bob = names("alice"), names("bob")
    return alice, bob, await api.user(alice), await api.user(bob)


async def test_malformed_frames_get_errors_and_the_connection_stays(server, api, names):
    alice, bob, ta, _ = await pair(api, names)
    async with connect(server.ws_url, alice) as a:
        await a.auth(ta)
        cases = [
            ("not json", "bad_request"),
            ("[1,2,3]", "bad_request"),
            ('"just a string"', "bad_request"),
            (json.dumps({"no": "type"}), "bad_request"),
            (json.dumps({"type": "launch"}), "bad_request"),
            (json.dumps({"type": "send", "cid": "c", "to": "x"}), "bad_request"),
            (json.dumps({"type": "send", "cid": 5, "to": bob, "body": "x"}), "bad_request"),
            (json.dumps({"type": "ack", "ids": "nope"}), "bad_request"),
            (json.dumps({"type": "seen"}), "bad_request"),
            (json.dumps({"type": "auth", "token": ta}), "bad_request"),  # already authenticated
            (b'{"type": "ping"}', "bad_request"),  # binary frame
        ]
        for raw, code in cases:
            await a.send_json(raw)
            err = await a.expect("error")
            assert err["code"] == code, (raw, err)
            assert err["message"]
        # Still usable.
        await a.send_json({"type": "ping"})
        await a.expect("pong")
        cid = await a.send("still here", to=bob)
        await a.expect("sent", cid=cid)


async def test_oversize_frame_and_body(server, api, names):
    alice, bob, ta, tb = await pair(api, names)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        await a.auth(ta)
        await b.auth(tb)
        big = json.dumps({"type": "send", "cid": "big", "to": bob, "body": "x" * 70_000})
        await a.send_json(big)
        err = await a.expect("error")
        assert err["code"] == "too_large"
        await a.send_json({"type": "send", "cid": "long", "to": bob, "body": "y" * 4001})
        err = await a.expect("error", cid="long")
        assert err["code"] == "too_large"
        cid = await a.send("z" * 4000, to=bob)  # exactly at the limit is fine
        sent = await a.expect("sent", cid=cid)
        msg = await b.expect("message", id=sent["id"])
        assert len(msg["body"]) == 4000
        # The refused ones, sent before it on the same path, were not delivered.
        await b.quiet("message", before=msg)
        # Any size is refused the same way, without buffering it, and the
        # connection stays usable: here 5 MiB, far past trio-websocket's own
        # 1 MiB limit (where it would close with 1009).
        await a.send_json("x" * (5 * 1024 * 1024))
        assert (await a.expect("error"))["code"] == "too_large"
        await a.send_json(b"\x00" * (2 * 1024 * 1024))  # binary, oversize
        assert (await a.expect("error"))["code"] == "too_large"
        await a.send_json({"type": "ping"})
        await a.expect("pong")
        assert a.closed is None


async def test_frames_before_auth_are_refused_but_connection_stays(server, api, names):
    alice, _, ta, _ = await pair(api, names)
    async with connect(server.ws_url, alice) as a:
        await a.send_json({"type": "ping"})
        err = await a.expect("error")
        assert err["code"] == "unauthorized"
        await a.send_json({"type": "send", "cid": "c", "to": "bob", "body": "x"})
        assert (await a.expect("error"))["code"] == "unauthorized"
        await a.send_json("garbage")
        assert (await a.expect("error"))["code"] == "bad_request"
        await a.auth(ta)
        await a.send_json({"type": "ping"})
        await a.expect("pong")


@pytest.mark.parametrize(
    "token",
    [
        None,
        "",
        12,
        "not-a-jwt",
        # A well-formed token signed with another secret.
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImlhdCI6MTcwMDAwMDAwMCwi"
        "ZXhwIjo0MTAwMDAwMDAwLCJpc3MiOiJjaGF0ZCJ9.qH0xVg0nkrkP1t0s6wTlh6f2Yy2wYkQ8oQ8Cj3Ckq9Y",
    ],
)
async def test_bad_token_closes_4001(server, token):
    """A forged, malformed or missing token: unauthorized, then 4001."""
    async with connect(server.ws_url) as a:
        frame = {"type": "auth"} if token is None else {"type": "auth", "token": token}
        await a.send_json(frame)
        err = await a.expect("error")
        assert err["code"] == "unauthorized"
        code, _ = await a.expect_closed()
        assert code == 4001


async def test_token_of_unknown_user_closes_4001(tmp_path):
    """A token that verifies but names no user (e.g. a deleted one)."""
    import jwt

    from harness.procs import ChatdProcess

    secret = "s" * 40
    proc = ChatdProcess(tmp_path, env={"JWT_SECRET": secret}).start()
    try:
        token = jwt.encode(
            {"sub": "ghost", "iat": 1, "exp": 2**33, "iss": "chatd"}, secret, algorithm="HS256"
        )
        async with connect(proc.ws_url) as a:
            await a.send_json({"type": "auth", "token": token})
            assert (await a.expect("error"))["code"] == "unauthorized"
            assert (await a.expect_closed())[0] == 4001
    finally:
        assert proc.stop() == 0


async def test_unknown_users_and_foreign_conversations(server, api, names):
    alice, bob, ta, tb = await pair(api, names)
    carol = names("carol")
    tc = await api.user(carol)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, carol) as c:
        await a.auth(ta)
        await c.auth(tc)
        cid = await a.send("hi", to=bob)
        sent = await a.expect("sent", cid=cid)

        cid = await a.send("hello?", to=names("nobody"))
        assert (await a.expect("error", cid=cid))["code"] == "not_found"
        cid = await a.send("me", to=alice)
        assert (await a.expect("error", cid=cid))["code"] == "bad_request"
        # carol writes into alice and bob's conversation: forbidden.
        cid = await c.send("let me in", conversation=sent["conversation"])
        assert (await c.expect("error", cid=cid))["code"] == "forbidden"
        cid = await c.send("nope", conversation="g:01NOSUCHGROUP")
        assert (await c.expect("error", cid=cid))["code"] == "not_found"
        await c.send_json({"type": "typing", "conversation": sent["conversation"]})
        assert (await c.expect("error"))["code"] == "forbidden"
        # carol acks or marks seen a message that is not hers: not_found, no receipt.
        await c.seen([sent["id"]])
        err = await c.expect("error")
        assert err["code"] == "not_found" and err["ids"] == [sent["id"]]
        await a.quiet("receipt")  # her refused mark routed nothing before the round trip
        # Her HTTP view of it is refused too.
        status, body = await api.call(
            "GET", f"/api/conversations/{sent['conversation']}/messages", tc
        )
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, body = await api.call("GET", f"/api/users/{alice}", tc)
        assert status == 404
    # Nothing stored was altered: bob still owes one unread message.
    status, body = await api.call("GET", "/api/conversations", tb)
    [conv] = body["conversations"]
    assert conv["unread"] == 1 and conv["last_seq"] == 1
    status, body = await api.call("GET", f"/api/conversations/{conv['id']}/messages", tb)
    assert [m["body"] for m in body["messages"]] == ["hi"]
    assert body["messages"][0]["seen_by"] == []


async def test_sender_is_always_the_authenticated_user(server, api, names):
    alice, bob, ta, tb = await pair(api, names)
    async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
        await a.auth(ta)
        await b.auth(tb)
        await a.send_json(
            {"type": "send", "cid": "spoof", "to": bob, "body": "hi", "from": bob, "sender": bob}
        )
        sent = await a.expect("sent", cid="spoof")
        msg = await b.expect("message", id=sent["id"])
        assert msg["from"] == alice


async def test_rate_limited(tmp_path, names):
    from harness.client import Api
    from harness.procs import ChatdProcess

    proc = ChatdProcess(tmp_path, args=["--rate", "1", "--burst", "3"]).start()
    api = Api(proc.http_url)
    try:
        alice, bob = names("alice"), names("bob")
        ta = await api.user(alice)
        await api.user(bob)
        async with connect(proc.ws_url, alice) as a:
            await a.auth(ta)
            cids = [await a.send(f"m{i}", to=bob) for i in range(6)]
            results = {}
            for cid in cids:
                with trio.fail_after(5):
                    while cid not in results:
                        for f in a.frames:
                            if f.get("cid") == cid:
                                results[cid] = f["type"] if f["type"] == "sent" else f["code"]
                        await trio.sleep(0.02)
            assert list(results.values()).count("sent") >= 3
            assert "rate_limited" in results.values()
    finally:
        await api.aclose()
        assert proc.stop() == 0


async def test_auth_deadline_closes_4001(server):
    """The contract's 10 s: a connection that never authenticates is closed."""
    async with connect(server.ws_url) as a:
        with trio.fail_after(12):
            code, _ = await a.expect_closed(timeout=12)
        assert code == 4001
        assert a.frames[-1]["code"] == "unauthorized"


async def test_unknown_ws_path_is_refused(server):
    from trio_websocket import ConnectionRejected, open_websocket_url

    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(server.ws_url.replace("/ws", "/other")):
            pass
    assert info.value.status_code == 404


async def outcome_of(client, cids: list[str]) -> dict[str, str]:
    """Each send's answer: "sent" or its error code."""
    results: dict[str, str] = {}
    with trio.fail_after(5):
        while len(results) < len(cids):
            for f in client.frames:
                if f.get("cid") in cids and f["cid"] not in results:
                    results[f["cid"]] = f["type"] if f["type"] == "sent" else f["code"]
            await trio.sleep(0.02)
    return results


async def test_the_send_rate_is_per_account_across_devices_and_replicas(tmp_path, names):
    """--rate 1 --burst 3 is the account's: a second device on another
    replica does not get a burst of its own (each connection alone would
    allow 3)."""
    from harness.client import Api
    from harness.cluster import Cluster

    cluster = Cluster(
        tmp_path, replicas=2, with_nginx=False, extra_args=["--rate", "1", "--burst", "3"]
    ).start()
    api = Api(cluster.nodes[0].http_url)
    try:
        alice, bob = names("alice"), names("bob")
        ta = await api.user(alice)
        await api.user(bob)
        async with (
            connect(cluster.nodes[0].ws_url, "alice@r1") as a1,
            connect(cluster.nodes[1].ws_url, "alice@r2") as a2,
        ):
            await a1.auth(ta)
            await a2.auth(ta)
            first = await outcome_of(a1, [await a1.send(f"r1 #{i}", to=bob) for i in range(3)])
            second = await outcome_of(a2, [await a2.send(f"r2 #{i}", to=bob) for i in range(3)])
            assert list(first.values()) == ["sent"] * 3
            # At most one token refilled meanwhile (1/s): the rest is refused.
            assert list(second.values()).count("rate_limited") >= 2, second
            error = next(f for f in a2.frames if f.get("code") == "rate_limited")
            assert "this account" in error["message"] and error["cid"] in second
    finally:
        await api.aclose()
        cluster.close()


async def gets_ready(url: str, token: str) -> bool:
    """Whether a new device's auth is answered `ready` (not an error)."""
    async with connect(url, "probe") as probe:
        await probe.send_json({"type": "auth", "token": token})
        with trio.fail_after(5):
            while not any(f["type"] in ("ready", "error") for f in probe.frames):  # noqa: ASYNC110 - the reader task's frames
                await trio.sleep(0.02)
        return any(f["type"] == "ready" for f in probe.frames)


async def test_sockets_are_capped_per_account_across_replicas(tmp_path, names):
    """--max-sockets-per-user 2: a third device, on another replica, gets
    `rate_limited` and close 4029; once one leaves, a new one gets in."""
    from harness.client import Api
    from harness.cluster import Cluster

    cluster = Cluster(
        tmp_path, replicas=2, with_nginx=False, extra_args=["--max-sockets-per-user", "2"]
    ).start()
    api = Api(cluster.nodes[0].http_url)
    try:
        alice = names("alice")
        token = await api.user(alice)
        r1, r2 = cluster.nodes[0].ws_url, cluster.nodes[1].ws_url
        async with connect(r1, "phone") as phone, connect(r1, "laptop") as laptop:
            await phone.auth(token)
            await laptop.auth(token)
            async with connect(r2, "tablet") as tablet:
                await tablet.send_json({"type": "auth", "token": token})
                error = await tablet.expect("error")
                assert error["code"] == "rate_limited" and "at most 2" in error["message"]
                assert (await tablet.expect_closed())[0] == 4029
            await laptop.ws.aclose()
            await laptop.expect_closed()
            # The laptop's detach is on its way to Redis: a new device gets
            # in within moments.
            with trio.fail_after(5):
                while not await gets_ready(r2, token):  # noqa: ASYNC110 - a new probe each time
                    await trio.sleep(0.2)
    finally:
        await api.aclose()
        cluster.close()


async def test_sockets_are_capped_per_address(tmp_path, names):
    """--max-sockets-per-ip 2: the third socket from one address gets
    `rate_limited` and close 4029 at once, before any auth."""
    from harness.client import Api
    from harness.procs import ChatdProcess

    proc = ChatdProcess(tmp_path, args=["--max-sockets-per-ip", "2"]).start()
    api = Api(proc.http_url)
    try:
        token = await api.user(names("alice"))
        async with connect(proc.ws_url, "one") as one, connect(proc.ws_url, "two") as two:
            await one.auth(token)
            async with connect(proc.ws_url, "three") as three:
                error = await three.expect("error")
                assert error["code"] == "rate_limited" and "this address" in error["message"]
                assert (await three.expect_closed())[0] == 4029
            await two.ws.aclose()
            await two.expect_closed()
            await trio.sleep(0.2)
            async with connect(proc.ws_url, "four") as four:
                await four.auth(token)
    finally:
        await api.aclose()
        assert proc.stop() == 0
