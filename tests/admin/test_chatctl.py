"""Every chatctl command against a real redis-server and the SQLite store of
a real ``chatd serve``, with data made by that chatd over its own API and
WebSockets: tables, ``--json`` parsed, exit codes and error messages.

Tests run in file order on one deployment: read-only commands first, then
the ones that change things, each on users of its own.
"""

from __future__ import annotations

import json

import pytest
import trio

from harness.client import Api, connect
from harness.e2e_client import AsyncE2E, E2EDevice
from harness.procs import free_port
from tests.admin.conftest import Deployment, ctl

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def world(deployment: Deployment) -> dict:
    """alice sends 4 to bob (bob acks 2, sees 1, leaves 1), 3 to carol and 1
    to erin (both offline); bob writes once in a group with alice and carol;
    alice never acks anything. dave does nothing."""

    async def make() -> dict:
        api = Api(deployment.chatd.http_url)
        tokens = {u: await api.user(u, PASSWORD) for u in ("alice", "bob", "carol", "dave", "erin")}
        status, group = await api.call(
            "POST", "/api/conversations", tokens["alice"], json={"members": ["bob", "carol"]}
        )
        assert status == 201
        ws = deployment.chatd.ws_url
        async with connect(ws, "alice") as a, connect(ws, "bob") as b:
            await a.auth(tokens["alice"])
            await b.auth(tokens["bob"])
            to_bob = []
            for i in range(4):
                cid = await a.send(f"hello bob {i}", to="bob")
                to_bob.append((await a.expect("sent", cid=cid))["id"])
            for i in range(3):
                cid = await a.send(f"hi carol {i}", to="carol")
                await a.expect("sent", cid=cid)
            cid = await a.send("hi erin", to="erin")
            await a.expect("sent", cid=cid)
            cid = await b.send("morning team", conversation=group["id"])
            await b.expect("sent", cid=cid)
            await a.expect("message", body="morning team")
            for mid in to_bob:
                await b.expect("message", id=mid)
            await b.ack(to_bob[:2])
            await b.seen(to_bob[2:3])
            for _ in range(4):  # delivered x3, seen x1
                await a.expect("receipt")
        await api.aclose()
        return {"tokens": tokens, "group": group["id"], "to_bob": to_bob}

    return trio.run(make)


def ok(result, code: int = 0):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    return result


def as_json(result):
    return json.loads(ok(result).stdout)


# -- read-only -----------------------------------------------------------------------------


def test_users_list(deployment, world):
    result = ok(ctl(deployment.env, "users", "list"))
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["USER", "STATUS", "CREATED", "LAST", "SEEN", "ONLINE", "ON"]
    assert [line.split()[0] for line in lines[1:6]] == ["alice", "bob", "carol", "dave", "erin"]
    assert lines[-1] == "5 users"
    users = as_json(ctl(deployment.env, "users", "list", "--json"))
    assert [(u["username"], u["status"], u["online"]) for u in users] == [
        (name, "active", False) for name in ("alice", "bob", "carol", "dave", "erin")
    ]
    assert users[0]["last_seen"] is not None and users[3]["last_seen"] is None
    # --json works before the command too.
    assert as_json(ctl(deployment.env, "--json", "users", "list")) == users


def test_users_show(deployment, world):
    alice = as_json(ctl(deployment.env, "users", "show", "Alice", "--json"))
    assert alice["username"] == "alice" and alice["status"] == "active"
    assert alice["owed"] == {"messages": 1, "receipts": 4, "queue_entries": 5}
    assert alice["presence"]["online"] is False and alice["presence"]["nodes"] == []
    convs = {c["id"]: c for c in alice["conversations"]}
    assert set(convs) == {"dm:alice:bob", "dm:alice:carol", "dm:alice:erin", world["group"]}
    assert convs["dm:alice:bob"]["last_seq"] == 4 and convs[world["group"]]["unread"] == 1
    bob = as_json(ctl(deployment.env, "users", "show", "bob", "--json"))
    assert bob["owed"] == {"messages": 1, "receipts": 0, "queue_entries": 1}
    text = ok(ctl(deployment.env, "users", "show", "bob")).stdout
    assert "owed to them  1 message, 0 receipts (store)" in text
    assert "Redis queue   1 entry" in text and "dm:alice:bob" in text


def test_queue_list_and_show(deployment, world):
    queues = as_json(ctl(deployment.env, "queue", "list", "--json"))
    assert [(q["user"], q["entries"]) for q in queues] == [
        ("alice", 5),
        ("carol", 4),
        ("bob", 1),
        ("erin", 1),
    ]
    assert all(q["oldest_queued_at"] for q in queues)
    text = ok(ctl(deployment.env, "queue", "list")).stdout
    assert text.splitlines()[0].split() == ["USER", "ENTRIES", "OLDEST", "QUEUED"]
    assert text.splitlines()[-1] == "4 users, 11 entries"

    carol = as_json(ctl(deployment.env, "queue", "show", "carol", "--json"))
    assert [(e["kind"], e["sender"]) for e in carol] == [("message", "alice")] * 3 + [
        ("message", "bob")
    ]
    assert all("body" not in e for e in carol)  # never without --decrypt
    shown = ok(ctl(deployment.env, "queue", "show", "carol"))
    assert "hi carol" not in shown.stdout and "dm:alice:carol" in shown.stdout
    alice = as_json(ctl(deployment.env, "queue", "show", "alice", "--json"))
    receipts = [e for e in alice if e["kind"] == "receipt"]
    assert sorted(e["status"] for e in receipts) == ["delivered"] * 3 + ["seen"]
    assert {e["sender"] for e in receipts} == {"bob"}


def test_queue_show_decrypt(deployment, world):
    result = ok(ctl(deployment.env, "queue", "show", "carol", "--decrypt", "--json"))
    assert "decrypting bodies with the keyring from" in result.stderr
    assert [e["body"] for e in json.loads(result.stdout)] == [
        "hi carol 0",
        "hi carol 1",
        "hi carol 2",
        "morning team",
    ]
    table = ok(ctl(deployment.env, "queue", "show", "carol", "--decrypt", "--limit", "1"))
    assert "hi carol 0" in table.stdout and "hi carol 1" not in table.stdout
    no_keys = {**deployment.env, "CHATD_KEY_FILE": str(deployment.chatd.data_dir / "nope.json")}
    result = ok(ctl(no_keys, "queue", "show", "carol", "--decrypt"), 2)
    assert "--decrypt needs the keyring" in result.stderr and "Traceback" not in result.output


def test_stats(deployment, world):
    st = as_json(ctl(deployment.env, "stats", "--json"))
    assert st["users"] == {"total": 5, "disabled": 0, "deleted": 0}
    assert st["conversations"] == 4
    assert st["messages"]["stored"] == 9 and st["messages"]["in_window"] == 9
    assert st["owed"] == {"messages": 7, "receipts": 4}
    assert st["delivered"]["in_window"] == 3 and st["seen"]["in_window"] == 1
    assert st["keys"] == {"k1": 9}
    assert st["queues"]["users"] == 4 and st["queues"]["entries"] == 11
    assert st["nodes"] == {"solo": 0}
    assert st["redis"]["mode"] == "standalone" and st["redis"]["sharded_pubsub"] is True
    text = ok(ctl(deployment.env, "stats")).stdout
    assert "messages        9 stored; 9 in the last 300 s (1.8/min)" in text


def test_keys_list(deployment, world):
    found = as_json(ctl(deployment.env, "keys", "list", "--json"))
    assert found["keys"] == [{"key": "k1", "active": True, "messages": 9, "in_keyring": True}]
    assert found["source"].endswith("keys.json")


# -- errors --------------------------------------------------------------------------------


def test_unknown_user_is_exit_1(deployment, world):
    for args in (
        ("users", "show", "nobody"),
        ("users", "disable", "nobody"),
        ("users", "delete", "nobody", "--yes"),
        ("queue", "requeue", "nobody"),
        ("users", "show", "NOT A NAME!"),
    ):
        result = ok(ctl(deployment.env, *args), 1)
        assert result.stderr.startswith("chatctl: no user"), args
        assert "Traceback" not in result.output


def test_redis_down_is_exit_3(deployment, world):
    env = {**deployment.env, "CHATD_REDIS_URL": f"redis://127.0.0.1:{free_port()}"}
    for args in (("queue", "list"), ("presence",), ("nodes",), ("users", "show", "alice")):
        result = ok(ctl(env, *args), 3)
        assert result.stderr.startswith("chatctl: Redis unavailable:"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_no_broker_configured(deployment, world):
    env = {"CHATD_DATA_DIR": deployment.env["CHATD_DATA_DIR"]}
    for args in (("queue", "list"), ("presence",), ("nodes",), ("queue", "purge", "x", "--yes")):
        result = ok(ctl(env, *args), 2)
        assert "needs the Redis broker: set --redis-url" in result.stderr, args
    # Commands that only read the store still work, and say what they cannot see.
    text = ok(ctl(env, "users", "show", "bob")).stdout
    assert "online        unknown (no Redis configured)" in text
    assert as_json(ctl(env, "users", "list", "--json"))[0]["online"] is None


def test_store_missing_and_bad_config(deployment, tmp_path):
    result = ok(ctl({"CHATD_DATA_DIR": str(tmp_path / "empty")}, "users", "list"), 2)
    assert "no chatd store in" in result.stderr
    assert not (tmp_path / "empty").exists()  # chatctl never creates a store
    result = ok(ctl({**deployment.env, "CHATD_BROKR": "x"}, "users", "list"), 2)
    assert "unknown setting(s) in the environment: CHATD_BROKR" in result.stderr
    result = ok(ctl(deployment.env, "--store", "nosuch", "users", "list"), 2)
    assert "unknown store 'nosuch'" in result.stderr
    # Flags work as chatd serve's do.
    flags = ["--data-dir", deployment.env["CHATD_DATA_DIR"], "--redis-url", deployment.redis.url]
    assert len(as_json(ctl({}, *flags, "users", "list", "--json"))) >= 5


# -- changes -------------------------------------------------------------------------------


async def _login(deployment, user: str, password: str = PASSWORD) -> int:
    api = Api(deployment.chatd.http_url)
    try:
        status, _ = await api.call(
            "POST", "/api/login", json={"username": user, "password": password}
        )
        return status
    finally:
        await api.aclose()


async def test_users_create(deployment, world):
    env = deployment.env
    result = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "create", "Frank", "--password-stdin", input="s3cret-pass\n")
    )
    assert ok(result).stdout.strip() == "created user frank"
    assert await _login(deployment, "frank", "s3cret-pass") == 200
    again = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "create", "frank", "--password-stdin", input="another-pw\n")
    )
    assert ok(again, 4).stderr.strip() == "chatctl: username 'frank' is taken"
    bad = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "create", "x!", "--password-stdin", input="long-enough\n")
    )
    assert ok(bad, 2).stderr.startswith("chatctl: username")
    short = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "create", "gina", "--password-stdin", input="short\n")
    )
    assert "password must be 8-1024 characters" in ok(short, 2).stderr
    prompted = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "create", "gina", "--json", input="a-good-pw\na-good-pw\n")
    )
    assert json.loads(_json_tail(ok(prompted)))["username"] == "gina"


def _json_tail(result) -> str:
    """The JSON object at the end of stdout (after click's prompts)."""
    out = result.stdout
    return out[out.index("{") :]


async def test_users_disable_and_enable(deployment, world):
    env = deployment.env
    token = world["tokens"]["dave"]
    result = await trio.to_thread.run_sync(lambda: ctl(env, "users", "disable", "dave"))
    assert "disabled dave: logins and new connections are refused" in ok(result).stdout
    assert await _login(deployment, "dave") == 401
    # A token issued before is refused at its next use.
    async with connect(deployment.chatd.ws_url, "dave") as d:
        await d.send_json({"type": "auth", "token": token})
        assert (await d.expect("error"))["code"] == "unauthorized"
        assert (await d.expect_closed())[0] == 4001
    shown = await trio.to_thread.run_sync(lambda: ctl(env, "users", "show", "dave", "--json"))
    assert as_json(shown)["status"] == "disabled"
    result = await trio.to_thread.run_sync(lambda: ctl(env, "users", "enable", "dave", "--json"))
    assert as_json(result) == {"username": "dave", "status": "active", "online_on": []}
    assert await _login(deployment, "dave") == 200


async def test_users_delete(deployment, world):
    env = deployment.env
    answer_no = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "delete", "erin", input="n\n")
    )
    assert ok(answer_no, 4).stderr.strip().endswith("chatctl: aborted: nothing was changed")
    assert "1 message not yet delivered to them will not be delivered" in answer_no.stderr
    assert "their Redis queue (1 entry) is purged" in answer_no.stderr
    assert await _login(deployment, "erin") == 200
    before = await _history(deployment, world, "dm:alice:erin")
    done = await trio.to_thread.run_sync(
        lambda: ctl(env, "users", "delete", "erin", "--yes", "--json")
    )
    assert as_json(done) == {
        "username": "erin",
        "status": "deleted",
        "messages_dropped": 1,
        "receipts_settled": 0,
        "queue_entries_purged": 1,
    }
    assert await _login(deployment, "erin") == 401
    api = Api(deployment.chatd.http_url)
    try:
        status, body = await api.register("erin", "another password")
        assert status == 409  # the name stays taken
    finally:
        await api.aclose()
    assert await _history(deployment, world, "dm:alice:erin") == before  # alice keeps hers
    shown = as_json(
        await trio.to_thread.run_sync(lambda: ctl(env, "users", "show", "erin", "--json"))
    )
    assert shown["status"] == "deleted" and shown["owed"]["messages"] == 0
    enable = await trio.to_thread.run_sync(lambda: ctl(env, "users", "enable", "erin"))
    assert ok(enable, 4).stderr.strip() == "chatctl: user 'erin' is deleted"


async def _history(deployment, world, conversation: str) -> list:
    api = Api(deployment.chatd.http_url)
    try:
        status, body = await api.call(
            "GET", f"/api/conversations/{conversation}/messages", world["tokens"]["alice"]
        )
        assert status == 200, body
        return body["messages"]
    finally:
        await api.aclose()


def test_queue_purge_and_requeue(deployment, world):
    env = deployment.env
    answer_no = ok(ctl(env, "queue", "purge", "carol", input="n\n"), 4)
    assert "removes 4 entries (4 messages, 0 receipts)" in answer_no.stderr
    assert "They stay owed in the store" in answer_no.stderr
    assert len(as_json(ctl(env, "queue", "show", "carol", "--json"))) == 4
    assert as_json(ctl(env, "queue", "purge", "carol", "--yes", "--json")) == {
        "user": "carol",
        "purged": 4,
    }
    assert as_json(ctl(env, "queue", "show", "carol", "--json")) == []
    assert "carol" not in [q["user"] for q in as_json(ctl(env, "queue", "list", "--json"))]
    assert "nothing to purge" in ok(ctl(env, "queue", "purge", "carol")).stdout
    # The store still owes them: requeue rebuilds the queue from it, in order.
    assert as_json(ctl(env, "queue", "requeue", "carol", "--json")) == {
        "purged": 0,
        "messages": 4,
        "receipts": 0,
    }
    rebuilt = as_json(ctl(env, "queue", "show", "carol", "--decrypt", "--json"))
    assert [e["body"] for e in rebuilt] == [  # by conversation (dm: < g:), then seq
        "hi carol 0",
        "hi carol 1",
        "hi carol 2",
        "morning team",
    ]
    # alice: a message and receipts; a rebuild drops nothing the store owes.
    done = as_json(ctl(env, "queue", "requeue", "alice", "--json"))
    assert done == {"purged": 5, "messages": 1, "receipts": 4}
    text = ok(ctl(env, "queue", "requeue", "bob")).stdout
    assert "1 message and 0 receipts queued (it held 1 entry)" in text


async def test_requeued_items_reach_the_device(deployment, world):
    """carol gets what is owed at her next connect, and her acks settle the
    requeued entries: requeue keys them exactly as routing does (a wrong key
    would leave them in the queue for good)."""
    env = deployment.env

    async def show() -> list:  # chatctl runs its own trio loop: in a thread
        return as_json(await trio.to_thread.run_sync(ctl, env, "queue", "show", "carol", "--json"))

    assert len(await show()) == 4
    async with connect(deployment.chatd.ws_url, "carol") as c:
        await c.auth(world["tokens"]["carol"])
        got = [await c.expect("message") for _ in range(4)]
        await c.ack([m["id"] for m in got])
        await c.send_json({"type": "ping"})
        await c.expect("pong")  # the ack was handled before the ping
    assert [m["body"] for m in got] == ["hi carol 0", "hi carol 1", "hi carol 2", "morning team"]
    assert await show() == []


async def test_messages_show_and_delete(deployment):
    env = deployment.env
    api = Api(deployment.chatd.http_url)
    tokens = {u: await api.user(u, PASSWORD) for u in ("mod_f", "mod_g", "mod_h")}
    await api.aclose()
    ws = deployment.chatd.ws_url
    async with connect(ws, "mod_f") as f:
        await f.auth(tokens["mod_f"])
        cid = await f.send("something rude", to="mod_g")  # mod_g is offline: queued
        mid = (await f.expect("sent", cid=cid))["id"]
    shown = as_json(
        await trio.to_thread.run_sync(lambda: ctl(env, "messages", "show", mid, "--json"))
    )
    assert (shown["from"], shown["conversation"], shown["seq"]) == ("mod_f", "dm:mod_f:mod_g", 1)
    assert shown["deleted"] is False and "body" not in shown
    decrypted = as_json(
        await trio.to_thread.run_sync(
            lambda: ctl(env, "messages", "show", mid, "--decrypt", "--json")
        )
    )
    assert decrypted["body"] == "something rude"
    queued = as_json(
        await trio.to_thread.run_sync(lambda: ctl(env, "queue", "show", "mod_g", "--json"))
    )
    assert [e["key"] for e in queued] == [mid]

    answer_no = await trio.to_thread.run_sync(
        lambda: ctl(env, "messages", "delete", mid, input="n\n")
    )
    assert ok(answer_no, 4).stderr.strip().endswith("chatctl: aborted: nothing was changed")
    assert "for everyone" in answer_no.stderr
    async with connect(ws, "mod_f") as f:
        await f.auth(tokens["mod_f"])
        done = await trio.to_thread.run_sync(
            lambda: ctl(env, "messages", "delete", mid, "--yes", "--json")
        )
        info = as_json(done)
        audit = json.loads(done.stderr.strip().splitlines()[-1])
        assert audit["audit"] == "message deleted" and audit["id"] == mid
        assert audit["from"] == "mod_f" and audit["eid"] == info["eid"]
        # mod_f's connected device hears it at once, from the operator.
        ev = await f.expect("deleted", id=mid)
        assert ev["by"] == "@operator" and ev["eid"] == info["eid"]
    queued = as_json(
        await trio.to_thread.run_sync(lambda: ctl(env, "queue", "show", "mod_g", "--json"))
    )
    assert [(e["kind"], e["id"]) for e in queued] == [("deleted", mid)]
    shown = as_json(
        await trio.to_thread.run_sync(lambda: ctl(env, "messages", "show", mid, "--json"))
    )
    assert shown["deleted"] is True and shown["key_id"] is None
    # mod_g connects: no message, the deletion only.
    async with connect(ws, "mod_g") as g:
        await g.auth(tokens["mod_g"])
        ev = await g.expect("deleted", id=mid)
        assert [fr for fr in g.frames if fr["type"] == "message"] == []
    again = await trio.to_thread.run_sync(lambda: ctl(env, "messages", "delete", mid, "--yes"))
    assert "already deleted" in ok(again, 1).stderr
    missing = await trio.to_thread.run_sync(lambda: ctl(env, "messages", "show", "nope"))
    assert ok(missing, 1).stderr.strip() == "chatctl: no message 'nope'"


async def test_an_end_to_end_message_shows_no_text(deployment):
    """Even with the keyring, an operator sees an end-to-end message's
    ciphertext object, never its text (issue 12)."""
    env = deployment.env
    api = Api(deployment.chatd.http_url)
    tokens = {u: await api.user(u, PASSWORD) for u in ("mod_e", "mod_k")}
    dev = AsyncE2E(
        E2EDevice("mod_e"),
        lambda method, path, **kw: api.call(method, path, tokens["mod_e"], **kw),
    )
    await dev.register()
    status, made = await api.call(
        "POST", "/api/conversations", tokens["mod_e"], json={"to": "mod_k"}
    )
    assert status == 200
    await dev.new_epoch(made["id"], ["mod_e", "mod_k"])
    await api.aclose()
    e2e = dev.dev.encrypt(made["id"], "the operator must not read this")
    async with connect(deployment.chatd.ws_url, "mod_e") as e:
        await e.auth_with(tokens["mod_e"], device=dev.dev.device)
        await e.send_json({"type": "send", "cid": "x1", "conversation": made["id"], "e2e": e2e})
        mid = (await e.expect("sent", cid="x1"))["id"]
    run = await trio.to_thread.run_sync(
        lambda: ctl(env, "messages", "show", mid, "--decrypt", "--json")
    )
    shown = as_json(run)
    assert shown["e2e"] == e2e and "body" not in shown
    assert "must not read" not in run.stdout + run.stderr
    queued = await trio.to_thread.run_sync(
        lambda: ctl(env, "queue", "show", "mod_k", "--decrypt", "--json")
    )
    assert as_json(queued)[0]["e2e"] == e2e
