"""Tokens that expire (before and during a connection), a store that is
down, and a replica's drain leaving presence clean."""

import time

import jwt
import pytest
import trio

from harness.client import Api, connect
from harness.procs import ChatdProcess, shared_secrets

pytestmark = pytest.mark.e2e

SECRET = "test-secret-" + "x" * 30


def token_for(user: str, ttl: float) -> str:
    now = time.time()
    return jwt.encode(
        {"sub": user, "iat": int(now), "exp": int(now + ttl), "iss": "chatd"},
        SECRET,
        algorithm="HS256",
    )


@pytest.fixture
def server(tmp_path):
    proc = ChatdProcess(tmp_path, env={"JWT_SECRET": SECRET}).start()
    yield proc
    assert proc.stop() == 0


async def test_expired_token_is_refused_4001(server, names):
    api = Api(server.http_url)
    alice = names("alice")
    await api.user(alice)
    await api.aclose()
    async with connect(server.ws_url, alice) as a:
        await a.send_json({"type": "auth", "token": token_for(alice, -5)})
        err = await a.expect("error")
        assert err["code"] == "unauthorized" and "expired" in err["message"]
        assert (await a.expect_closed())[0] == 4001


async def test_token_expiring_on_an_open_connection(server, names):
    api = Api(server.http_url)
    alice, bob = names("alice"), names("bob")
    await api.user(alice)
    await api.user(bob)
    status, _ = await api.call("GET", "/api/conversations", token_for(alice, -1))
    assert status == 401  # the HTTP API refuses it too
    await api.aclose()
    async with connect(server.ws_url, alice) as a:
        await a.auth(token_for(alice, 2))
        cid = await a.send("before it expires", to=bob)
        await a.expect("sent", cid=cid)
        err = await a.expect("error", timeout=5)
        assert err["code"] == "unauthorized" and err["message"] == "token expired"
        assert (await a.expect_closed())[0] == 4001


async def test_store_outage_answers_unavailable(tmp_path, names):
    """MongoDB unreachable: readiness says so, requests answer 503
    `unavailable` quickly, and nothing claims to be stored."""
    proc = ChatdProcess(
        tmp_path,
        args=[
            "--store",
            "mongo",
            "--mongo-uri",
            "mongodb://127.0.0.1:1/chatd?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
        ],
        env=shared_secrets(tmp_path),
    ).start()
    api = Api(proc.http_url)
    try:
        status, body = await api.call("GET", "/healthz")
        assert status == 200  # the process serves
        status, body = await api.call("GET", "/readyz")
        assert status == 503 and body["checks"]["store"] != "ok"
        assert body["checks"]["broker"] == "ok"
        started = time.monotonic()
        status, body = await api.register(names("alice"))
        assert status == 503 and body["error"]["code"] == "unavailable"
        status, body = await api.call(
            "POST", "/api/login", json={"username": "alice", "password": "whatever1"}
        )
        assert status == 503
        assert time.monotonic() - started < 5
        async with connect(proc.ws_url) as a:
            await a.send_json({"type": "auth", "token": "eyJ.x.y"})
            assert (await a.expect("error"))["code"] == "unauthorized"
    finally:
        await api.aclose()
        assert proc.stop() == 0


async def test_drain_leaves_presence_clean(tmp_path, names):
    from harness.cluster import Cluster

    cluster = Cluster(tmp_path, replicas=2, with_nginx=False).start()
    api = Api(cluster.nodes[1].http_url)
    try:
        alice, bob = names("alice"), names("bob")
        ta, tb = await api.user(alice), await api.user(bob)
        async with connect(cluster.nodes[1].ws_url, alice) as a:
            await a.auth(ta)
            cid = await a.send("hi", to=bob)
            await a.expect("sent", cid=cid)
            async with connect(cluster.nodes[0].ws_url, bob) as b:
                await b.auth(tb)
                assert (await a.expect("presence", user=bob))["online"] is True
                # r1 drains: bob's socket closes with 1001 and he is offline at
                # once (not after the dead-node timeout).
                await trio.to_thread.run_sync(cluster.stop, 0)
                assert (await b.expect_closed())[0] == 1001
                p = await a.expect("presence", user=bob, timeout=3)
                assert p["online"] is False
            _, info = await api.call("GET", f"/api/users/{bob}", ta)
            assert info["online"] is False
    finally:
        await api.aclose()
        cluster.close()


async def test_logout_revokes_the_token_and_closes_its_sockets_on_every_replica(tmp_path, names):
    """POST /api/logout: the token's sockets on both replicas close with 4001
    within 2 s, the token is refused everywhere (WebSocket and HTTP) until
    it expires; the user's other device (another token) stays connected.
    Then chatctl disables the user: every socket of theirs closes."""
    from harness.cluster import Cluster
    from tests.admin.conftest import ctl

    cluster = Cluster(tmp_path, replicas=2, with_nginx=False).start()
    api = Api(cluster.nodes[0].http_url)
    try:
        alice = names("alice")
        laptop = await api.user(alice)
        phone = await api.login(alice)
        async with (
            connect(cluster.nodes[0].ws_url, "laptop@r1") as l1,
            connect(cluster.nodes[1].ws_url, "laptop@r2") as l2,
            connect(cluster.nodes[1].ws_url, "phone@r2") as p2,
        ):
            for conn, token in ((l1, laptop), (l2, laptop), (p2, phone)):
                await conn.auth(token)
            status, _ = await api.call("POST", "/api/logout", laptop)
            assert status == 204
            for conn in (l1, l2):
                assert (await conn.expect_closed(timeout=2))[0] == 4001
            # The phone's token is another: still connected, still answered.
            await p2.send_json({"type": "typing", "conversation": "dm:nobody:else"})
            await p2.expect("error")
            for node in cluster.nodes:
                other = Api(node.http_url)
                status, body = await other.call("GET", "/api/conversations", laptop)
                await other.aclose()
                assert status == 401 and "revoked" in body["error"]["message"], body
            async with connect(cluster.nodes[1].ws_url, "laptop again") as again:
                await again.send_json({"type": "auth", "token": laptop})
                assert (await again.expect_closed())[0] == 4001
            status, _ = await api.call("GET", "/api/conversations", phone)
            assert status == 200

            env = {
                "CHATD_REDIS_URL": cluster.redis.url,
                "CHATD_DATA_DIR": str(cluster.data_dir),
                **cluster.secrets,
            }
            result = await trio.to_thread.run_sync(lambda: ctl(env, "users", "disable", alice))
            assert result.exit_code == 0, result.output
            assert (await p2.expect_closed(timeout=2))[0] == 4001
    finally:
        await api.aclose()
        cluster.close()


async def test_a_login_storm_from_one_address_is_refused_not_the_user(tmp_path, names):
    """Wrong passwords from one address: after --login-per-ip attempts, HTTP
    429 rate_limited with Retry-After, before any hashing; the user's correct
    login from another address still works. Behind a trusted proxy the
    address is X-Forwarded-For's; registrations are limited per address too."""
    # Small limits, so that refills (a minute's worth spread over the minute)
    # cannot show up within the test's few seconds.
    args = ["--trusted-proxies", "127.0.0.1", "--login-per-ip", "5", "--register-per-ip", "3"]
    proc = ChatdProcess(tmp_path, args=args).start()
    api = Api(proc.http_url)
    try:
        alice = names("alice")
        assert (await api.register(alice))[0] == 201
        storm = {"X-Forwarded-For": "198.51.100.7"}
        answers = []
        for _ in range(8):
            status, body = await api.call(
                "POST",
                "/api/login",
                json={"username": alice, "password": "not it at all"},
                headers=dict(storm),
            )
            answers.append(status)
        assert answers == [401] * 5 + [429] * 3, answers
        resp = await api.http.post(
            "/api/login", json={"username": alice, "password": "x" * 9}, headers=storm
        )
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        status, body = await api.call(
            "POST",
            "/api/login",
            json={"username": alice, "password": "correct horse"},
            headers={"X-Forwarded-For": "203.0.113.5"},
        )
        assert status == 200 and body["token"]
        statuses = [
            (
                await api.call(
                    "POST",
                    "/api/register",
                    json={"username": names("new"), "password": "correct horse"},
                    headers={"X-Forwarded-For": "192.0.2.44"},
                )
            )[0]
            for _ in range(5)
        ]
        assert statuses == [201] * 3 + [429] * 2, statuses
    finally:
        await api.aclose()
        assert proc.stop() == 0


async def test_login_limits_are_shared_by_the_replicas(tmp_path, names):
    from harness.cluster import Cluster

    cluster = Cluster(
        tmp_path,
        replicas=2,
        with_nginx=False,
        extra_args=["--trusted-proxies", "127.0.0.1", "--login-per-ip", "6"],
    ).start()
    try:
        alice = names("alice")
        apis = [Api(n.http_url) for n in cluster.nodes]
        assert (await apis[0].register(alice))[0] == 201
        wrong = {"username": alice, "password": "not it at all"}
        here = {"X-Forwarded-For": "198.51.100.8"}
        answers = []
        for i in range(8):
            status, _ = await apis[i % 2].call("POST", "/api/login", json=wrong, headers=here)
            answers.append(status)
        assert answers == [401] * 6 + [429, 429], answers
        for api in apis:
            await api.aclose()
    finally:
        cluster.close()


async def test_refresh_tokens_rotate_and_a_reused_one_ends_the_session(tmp_path, names):
    """POST /api/refresh trades a refresh token for a new access token and
    the next refresh token (each works once). Presenting one a second time
    ends the family: the last access token is revoked (its socket closes
    4001) and the newest refresh token stops working too. Logout ends the
    family as well."""
    proc = ChatdProcess(tmp_path).start()
    api = Api(proc.http_url)
    try:
        alice = names("alice")
        assert (await api.register(alice))[0] == 201
        status, login = await api.call(
            "POST", "/api/login", json={"username": alice, "password": "correct horse"}
        )
        assert status == 200 and login["refresh_token"]

        async def refresh(token: str) -> tuple[int, dict]:
            return await api.call("POST", "/api/refresh", json={"refresh_token": token})

        status, first = await refresh(login["refresh_token"])
        assert status == 200 and first["expires_in"] == 3600
        assert first["refresh_token"] != login["refresh_token"] and first["token"] != login["token"]
        assert (await api.call("GET", "/api/conversations", first["token"]))[0] == 200
        status, second = await refresh(first["refresh_token"])
        assert status == 200
        async with connect(proc.ws_url, "the thief's copy") as device:
            await device.auth(second["token"])
            # The first refresh token again: someone kept a copy.
            status, body = await refresh(first["refresh_token"])
            assert status == 401 and "already used" in body["error"]["message"]
            assert (await device.expect_closed(timeout=2))[0] == 4001
        assert (await api.call("GET", "/api/conversations", second["token"]))[0] == 401
        assert (await refresh(second["refresh_token"]))[0] == 401
        # A fresh login, then logout: its refresh token is dead as well.
        status, again = await api.call(
            "POST", "/api/login", json={"username": alice, "password": "correct horse"}
        )
        assert (await api.call("POST", "/api/logout", again["token"]))[0] == 204
        assert (await refresh(again["refresh_token"]))[0] == 401
        for bad in ("", "no-dot", "a.b.c", 42, None):
            assert (await refresh(bad))[0] == 401
    finally:
        await api.aclose()
        assert proc.stop() == 0
