"""Key rotation while messages keep flowing through a live chatd: rotate,
the running chatd picks the new key up from its key file, re-encrypt while
sends continue, then every message still opens, history is unchanged, and
the old key can be retired. Plus the keyring and re-encryption pieces on
their own."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from admin import ops
from chatd import crypto
from chatd.ports import Reseal
from chatd.store.sqlite import SqliteStore
from chatd.testing.store_contract import users
from harness.client import Api, connect
from tests.admin.conftest import Deployment, ctl, ctl_process, until

pytestmark = pytest.mark.e2e


def active_key_of(url: str) -> str | None:
    text = httpx.get(url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "chatd_active_key_info":
            return next((s.labels["key"] for s in family.samples if s.value == 1), None)
    return None


async def key_counts(env: dict[str, str]) -> dict[str, int]:
    result = await trio.to_thread.run_sync(lambda: ctl(env, "keys", "list", "--json"))
    assert result.exit_code == 0, result.stderr
    return {k["key"]: k["messages"] for k in json.loads(result.stdout)["keys"]}


async def test_rotate_reencrypt_retire_while_messages_flow(deployment: Deployment):
    env = deployment.env
    chatd = deployment.chatd
    api = Api(chatd.http_url)
    ta, tb = await api.user("alice"), await api.user("bob")
    sent: list[tuple[str, str]] = []
    stop = trio.Event()

    async with connect(chatd.ws_url, "alice") as a, connect(chatd.ws_url, "bob") as b:
        await a.auth(ta)
        await b.auth(tb)

        async def traffic() -> None:
            i = 0
            while not stop.is_set():
                body = f"message {i} before, during and after the rotation"
                cid = await a.send(body, to="bob")
                sent.append(((await a.expect("sent", cid=cid))["id"], body))
                i += 1
                await trio.sleep(0.04)  # under the default 30 sends/s

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            await trio.sleep(0.5)
            refused = await trio.to_thread.run_sync(lambda: ctl(env, "keys", "retire", "k1"))
            assert refused.exit_code == 4 and "is the active key" in refused.stderr

            rotated = await trio.to_thread.run_sync(
                lambda: ctl_process(env, "keys", "rotate", "--kid", "k2")
            )
            assert rotated.returncode == 0, rotated.stderr
            assert "new active key k2" in rotated.stdout
            key_file = json.loads((chatd.data_dir / "keys.json").read_text())
            assert key_file["active"] == "k2" and set(key_file["keys"]) == {"k1", "k2"}
            # The running chatd follows its key file without a restart.
            await until(lambda: active_key_of(chatd.http_url) == "k2", timeout=5)
            n_before = len(sent)
            await until(lambda: len(sent) >= n_before + 5, timeout=5, step=0.05)
            counts = await key_counts(env)
            assert counts["k1"] > 0 and counts["k2"] > 0
            busy = await trio.to_thread.run_sync(lambda: ctl(env, "keys", "retire", "k1"))
            assert busy.exit_code == 4 and "still sealed with 'k1'" in busy.stderr

            done = await trio.to_thread.run_sync(
                lambda: ctl_process(env, "keys", "reencrypt", "--batch", "20", "--json")
            )
            assert done.returncode == 0, (done.stdout, done.stderr)
            report = json.loads(done.stdout)
            assert report["active"] == "k2" and report["remaining"] == {}
            assert report["resealed"] >= counts["k1"] and report["failed"] == 0
            assert "re-encrypting to k2" in done.stderr  # the progress bar
            await trio.sleep(0.3)  # a few more sends after it
            stop.set()

        # Everything bob got live opened, with either key.
        def received() -> dict[str, str]:
            return {f["id"]: f["body"] for f in b.seen_frames("message")}

        await until(lambda: len(received()) >= len(sent), timeout=5, step=0.05)
        assert received() == dict(sent)

    assert await key_counts(env) == {"k1": 0, "k2": len(sent)}
    again = await trio.to_thread.run_sync(lambda: ctl(env, "keys", "reencrypt", "--json"))
    assert json.loads(again.stdout)["resealed"] == 0  # nothing left: a second run is a no-op
    retired = await trio.to_thread.run_sync(lambda: ctl(env, "keys", "retire", "k1"))
    assert retired.exit_code == 0, retired.stderr
    assert "retired k1" in retired.stdout
    assert set(json.loads((chatd.data_dir / "keys.json").read_text())["keys"]) == {"k2"}

    # History through the HTTP API equals what was sent: every body still opens.
    history: list[dict] = []
    before = None
    while True:
        query = f"?limit=200&before={before}" if before else "?limit=200"
        status, body = await api.call("GET", f"/api/conversations/dm:alice:bob/messages{query}", ta)
        assert status == 200
        history = body["messages"] + history
        if len(body["messages"]) < 200:
            break
        before = body["messages"][0]["seq"]
    assert [(m["id"], m["body"]) for m in history] == sent
    assert [m["seq"] for m in history] == list(range(1, len(sent) + 1))

    # And the retired key is gone from the running chatd without harm.
    async with connect(chatd.ws_url, "alice") as a, connect(chatd.ws_url, "bob") as b:
        await a.auth(ta)
        await b.auth(tb)
        cid = await a.send("after the retirement", to="bob")
        mid = (await a.expect("sent", cid=cid))["id"]
        assert (await b.expect("message", id=mid))["body"] == "after the retirement"
    await api.aclose()
    assert "cannot open" not in chatd.logs()


# -- the pieces ----------------------------------------------------------------------------


async def test_reencrypt_is_resumable_and_skips_bodies_changed_meanwhile(tmp_path):
    store = SqliteStore.open(tmp_path)
    old = crypto.Keyring({"k1": os.urandom(32)}, "k1")
    ring = old.with_new_key("k2")
    await users(store, "alice", "bob")
    dm = await store.ensure_dm("alice", "bob", 1)
    from chatd.core.ids import UlidFactory
    from chatd.core.model import NewMessage

    ids = UlidFactory()
    batch = []
    for i in range(30):
        mid = ids.new()
        body = old.seal(f"body {i}", mid, dm.id)
        batch.append(NewMessage(mid, dm.id, "alice", mid, i, body, ("bob",)))
    await store.append(batch)

    class Interrupted(Exception):
        pass

    seen = []

    def stop_after_ten(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        await ops.reencrypt(store, ring, batch=10, progress=stop_after_ten)
    assert await store.count_by_key() == {"k1": 20, "k2": 10}

    class Racing:
        """Another writer re-seals the first message of the first batch just
        before our compare-and-set (a second chatctl run, say)."""

        def __init__(self) -> None:
            self.theirs: tuple[str, object] | None = None

        def __getattr__(self, name: str):
            return getattr(store, name)

        async def reseal(self, items):
            if self.theirs is None and items:
                first = items[0]
                m = (await store.get_messages([first.message_id]))[0]
                body = ring.seal(ring.open(m.body, m.id, m.conversation), m.id, m.conversation)
                assert await store.reseal([Reseal(m.id, first.expected, body)]) == [True]
                self.theirs = (m.id, body)
            return await store.reseal(items)

    racing = Racing()
    done = await ops.reencrypt(racing, ring, batch=7, progress=lambda n: None, pause=0)
    assert done["resealed"] == 19 and done["skipped"] == 1 and done["remaining"] == {}
    assert await store.count_by_key() == {"k2": 30}
    for msg in await store.history(dm.id, None, 100):
        assert ring.open(msg.body, msg.id, msg.conversation) == f"body {msg.ts}"
    assert racing.theirs is not None
    their_id, their_body = racing.theirs
    [kept] = await store.get_messages([their_id])
    assert kept.body == their_body  # the other writer's body was not overwritten
    await store.aclose()


def test_live_keyring_follows_its_file(tmp_path, caplog):
    path = tmp_path / "keys.json"
    ring = crypto.Keyring({"k1": os.urandom(32)}, "k1")
    crypto.write_key_file(path, ring)
    live = crypto.LiveKeyring(crypto.load_key_file(path), path)
    assert live.refresh() is False  # unchanged: one stat, no read
    sealed_k1 = live.seal("old", "m1", "c")
    rotated = ring.with_new_key("k2")
    crypto.write_key_file(path, rotated)
    # Another replica sealed with k2 first: opening it picks the file up at once.
    assert live.open(rotated.seal("new", "m2", "c"), "m2", "c") == "new"
    assert live.active == "k2" and live.reloads == 1
    assert live.open(sealed_k1, "m1", "c") == "old"
    # A broken file is logged and the keys in use are kept.
    path.write_text("{not json")
    assert live.refresh() is False and live.active == "k2"
    assert "key file changed but cannot be used" in caplog.text
    crypto.write_key_file(path, rotated.without("k1"))
    assert live.refresh() is True and sorted(live.keys) == ["k2"]
    # CHATD_ACTIVE_KEY wins over the file's choice.
    pinned = crypto.LiveKeyring(crypto.load_key_file(path), path, active_override="k2")
    crypto.write_key_file(path, crypto.load_key_file(path).with_new_key("k3"))
    assert pinned.refresh() is True and pinned.active == "k2" and "k3" in pinned.keys
    # Keys from CHATD_KEYS never change.
    fixed = crypto.LiveKeyring(ring)
    assert fixed.refresh() is False


def test_rotate_and_retire_with_keys_from_the_environment(deployment: Deployment):
    ring = crypto.Keyring({"k1": os.urandom(32)}, "k1")
    env = {**deployment.env, "CHATD_KEYS": crypto.keys_env_value(ring)}
    before = (deployment.chatd.data_dir / "keys.json").read_text()
    result = ctl(env, "keys", "rotate", "--kid", "k9")
    assert result.exit_code == 0, result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    new = crypto.parse_keys_env(lines["CHATD_KEYS"], lines["CHATD_ACTIVE_KEY"])
    assert new.active == "k9" and new.keys["k1"] == ring.keys["k1"] and len(new.keys) == 2
    assert "nothing was written" in result.stderr
    assert (deployment.chatd.data_dir / "keys.json").read_text() == before
    retire_env = {**env, "CHATD_KEYS": lines["CHATD_KEYS"]}
    retired = ctl(retire_env, "keys", "retire", "k1", "--json")
    assert retired.exit_code == 0, retired.stderr
    assert list(crypto.parse_keys_env(json.loads(retired.stdout)["CHATD_KEYS"], None).keys) == [
        "k9"
    ]
    assert ctl(env, "keys", "retire", "nope").exit_code == 1
