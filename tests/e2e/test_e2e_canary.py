"""The server never sees the plaintext of an end-to-end message (issue 12).

Two replicas behind NGINX on one real Redis. A random canary goes
end-to-end between Python devices across both replicas (one recipient
online, one offline so that it waits in Redis and comes from the backlog),
and another canary goes in a plain conversation. Then everything the server
side holds or emitted is scanned (``harness.canary``): the store with
every body opened by the server's own keyring, the raw database files,
Redis keys with their envelopes opened, ``MONITOR`` for the whole run, the
replicas' logs, NGINX's access and error logs, and every frame the server
sent. The end-to-end canary is nowhere; the plain one is found by the same
scanner (the store, Redis, the frames), and the logs' positive control is
a name the logs do record.
"""

from __future__ import annotations

import secrets

import pytest
import trio

from harness.canary import Scanner, redis_monitor
from harness.client import Api, connect
from harness.cluster import Cluster
from harness.e2e_client import AsyncE2E, E2EDevice
from harness.nginx import requires_nginx

pytestmark = [pytest.mark.e2e, requires_nginx()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("canary"), replicas=2, nginx_access_log=True).start()
    yield c
    assert c.close() == [0, 0], c.logs()


async def _device(api: Api, user: str, token: str) -> AsyncE2E:
    dev = AsyncE2E(E2EDevice(user), lambda method, path, **kw: api.call(method, path, token, **kw))
    await dev.register()
    return dev


async def _wait_for(path, text: bytes) -> None:
    for _ in range(200):
        if path.exists() and text in path.read_bytes():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"{text!r} never showed in {path}")


async def test_an_e2e_canary_is_nowhere_a_plain_one_is_found(cluster, names, tmp_path):
    e2e_canary = "e2e-canary-" + secrets.token_hex(12)
    plain_canary = "plain-canary-" + secrets.token_hex(12)
    # A name the logs record (registration, request paths): the logs'
    # positive control, and proof the scanner reads the right files.
    logged = "pc" + secrets.token_hex(6)
    api = Api(cluster.url)
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    tl = await api.user(logged)
    a1, b1 = await _device(api, alice, ta), await _device(api, bob, tb)
    frames: list[dict] = []
    monitor = tmp_path / "monitor.log"
    with redis_monitor(cluster.redis.port, monitor):
        await _wait_for(monitor, b"OK")
        status, made = await api.call("POST", "/api/conversations", ta, json={"to": bob})
        assert status == 200
        conv = made["id"]
        await a1.new_epoch(conv, [alice, bob])
        # alice on replica 1; bob online on replica 2, then offline.
        async with (
            connect(cluster.nodes[0].ws_url, "a1") as ca,
            connect(cluster.nodes[1].ws_url, "b1") as cb,
            connect(cluster.ws_url, "carol") as cc,
        ):
            await ca.auth_with(ta, device=a1.dev.device)
            await cb.auth_with(tb, device=b1.dev.device)
            await cc.auth(tc)
            e2e = a1.dev.encrypt(conv, f"live {e2e_canary}")
            await ca.send_json({"type": "send", "cid": "k-1", "conversation": conv, "e2e": e2e})
            sent = await ca.expect("sent", cid="k-1")
            got = await cb.expect("message", id=sent["id"])
            assert await b1.read(got) == f"live {e2e_canary}"  # it did go through
            await cb.ack([got["id"]])
            # The plain canary, alice to carol (through NGINX for carol).
            cid = await ca.send(f"plain {plain_canary}", to=carol)
            plain = await ca.expect("sent", cid=cid)
            await cc.expect("message", id=plain["id"])
            frames += ca.frames + cb.frames + cc.frames
        # bob is away: the next one waits in Redis, then comes from the backlog.
        async with connect(cluster.nodes[0].ws_url, "a1") as ca:
            await ca.auth_with(ta, device=a1.dev.device)
            e2e = a1.dev.encrypt(conv, f"queued {e2e_canary}")
            await ca.send_json({"type": "send", "cid": "k-2", "conversation": conv, "e2e": e2e})
            queued = await ca.expect("sent", cid="k-2")
            # Edited end-to-end as well.
            edit = a1.dev.encrypt(conv, f"edited {e2e_canary}", edit_of=queued["id"])
            cid = await ca.act("edit", queued["id"], e2e=edit)
            await ca.expect("applied", cid=cid)
            frames += ca.frames
        async with connect(cluster.ws_url, "b1") as cb:
            await cb.auth_with(tb, device=b1.dev.device)
            got = await cb.expect("message", id=queued["id"])
            # The backlog gives the latest version: the edit's object.
            assert got["edited_ts"] is not None
            assert await b1.read(got) == f"edited {e2e_canary}"
            edited = await cb.expect("edited", id=queued["id"])
            assert await b1.read({**edited, "from": alice}, edit_of=queued["id"]) == (
                f"edited {e2e_canary}"
            )
            frames += cb.frames
        # History through NGINX, and a request path the access log records.
        for token in (ta, tb):
            status, history = await api.call("GET", f"/api/conversations/{conv}/messages", token)
            assert status == 200
            frames.append(history)
        await api.call("GET", f"/api/users/{logged}/devices", tl)
    await api.aclose()

    scan = Scanner.from_key_file(cluster.data_dir / "keys.json")
    scan.sqlite_store(cluster.data_dir / "chatd.sqlite3")
    scan.redis_keys(cluster.redis.port)
    scan.monitor_log(monitor.read_bytes())
    scan.files("chatd logs", [n.log_path for n in cluster.nodes])
    assert cluster.nginx is not None
    scan.files(
        "nginx logs",
        [cluster.nginx.workdir / "access.log", cluster.nginx.workdir / "error.log"],
    )
    scan.frames("frames", frames)

    assert scan.found.where(e2e_canary) == []
    # The positive controls: the same scanner sees a plain body wherever
    # the server keeps or sends one...
    # (carol never acked it: it still waits in her Redis queue)
    assert {"store (opened)", "redis (keys, opened)", "redis (monitor, opened)", "frames"} <= set(
        scan.found.where(plain_canary)
    )
    # ...and reads the logs it should.
    assert {"chatd logs", "nginx logs"} <= set(scan.found.where(logged))
