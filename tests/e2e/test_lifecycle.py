"""Restarts, shutdown and what lands on disk, with real processes."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import trio

from harness.client import Api, connect
from harness.procs import ChatdProcess

pytestmark = pytest.mark.e2e


async def test_restart_with_same_data_dir_loses_nothing_owed(tmp_path, names):
    proc = ChatdProcess(tmp_path).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    async with connect(proc.ws_url, alice) as a:
        await a.auth(ta)
        sent = []
        for i in range(3):
            cid = await a.send(f"before restart {i}", to=bob)
            sent.append(await a.expect("sent", cid=cid))
    async with connect(proc.ws_url, bob) as b:
        await b.auth(tb)
        first = await b.expect("message", id=sent[0]["id"])
        await b.seen([first["id"]])  # alice is offline: receipts are owed to her
        await trio.sleep(0.2)
    await api.aclose()
    assert proc.stop() == 0

    proc = ChatdProcess(tmp_path, http_port=proc.http_port, ws_port=proc.ws_port).start()
    api = Api(proc.http_url)
    try:
        # The same token still works: the secret is kept in the data dir.
        async with connect(proc.ws_url, bob) as b:
            await b.auth(tb)
            rest = [await b.expect("message") for _ in range(2)]
            assert [m["id"] for m in rest] == [s["id"] for s in sent[1:]]
            assert rest[0]["body"] == "before restart 1"
        async with connect(proc.ws_url, alice) as a:
            await a.auth(ta)
            got = {(r["id"], r["status"]) for r in [await a.expect("receipt") for _ in range(2)]}
            assert got == {(sent[0]["id"], "delivered"), (sent[0]["id"], "seen")}
    finally:
        await api.aclose()
        assert proc.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_closes_1001_and_exits_0(tmp_path, names, signum):
    proc = ChatdProcess(tmp_path).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, _ = await api.user(alice), await api.user(bob)
    await api.aclose()
    async with connect(proc.ws_url, alice) as a:
        await a.auth(ta)
        first = await a.send("m0", to=bob)
        await a.expect("sent", cid=first)
        # A burst of sends in flight when the signal lands.
        cids = [first] + [await a.send(f"m{i}", to=bob) for i in range(1, 20)]
        proc.proc.send_signal(signum)
        started = time.monotonic()
        code, _ = await a.expect_closed(timeout=10)
        assert code == 1001
    rc = await trio.to_thread.run_sync(proc.proc.wait, 10)
    assert rc == 0
    assert time.monotonic() - started < 8
    # Every send answered with `sent` before the close is in the store.
    answered = {f["cid"]: f for f in a.frames if f["type"] == "sent"}
    proc = ChatdProcess(tmp_path).start()
    api = Api(proc.http_url)
    try:
        assert first in answered
        conv = answered[first]["conversation"]
        status, body = await api.call("GET", f"/api/conversations/{conv}/messages", ta)
        assert status == 200
        stored = {m["id"]: m["body"] for m in body["messages"]}
        assert {f["id"] for f in answered.values()} <= set(stored)
        # Whatever else was stored was one of the sends (no `sent` reached the
        # client for it: it retries with the same cid and gets the original).
        assert set(stored.values()) <= {f"m{i}" for i in range(20)}
        assert set(answered) <= set(cids)
    finally:
        await api.aclose()
        assert proc.stop() == 0


async def test_no_plaintext_at_rest(tmp_path, names):
    secret_words = "purple elephants dance at midnight"
    proc = ChatdProcess(tmp_path).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    try:
        async with connect(proc.ws_url, alice) as a, connect(proc.ws_url, bob) as b:
            await a.auth(ta)
            await b.auth(tb)
            cid = await a.send(secret_words, to=bob)
            sent = await a.expect("sent", cid=cid)
            msg = await b.expect("message", id=sent["id"])
            assert msg["body"] == secret_words
    finally:
        await api.aclose()
        assert proc.stop() == 0
    needle = secret_words.encode()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "chatd.sqlite3" for p in files)
    for path in files:  # database, WAL, logs, key files: nowhere in plaintext
        assert needle not in path.read_bytes(), path
        assert b"purple" not in path.read_bytes(), path
    db = sqlite3.connect(tmp_path / "chatd.sqlite3")
    [(key_id, nonce, ct)] = db.execute(
        "SELECT key_id, nonce, ciphertext FROM messages WHERE id = ?", (sent["id"],)
    ).fetchall()
    assert key_id and len(nonce) == 12 and len(ct) == len(needle) + 16  # GCM tag
    # Passwords are argon2id hashes, never the password.
    for (pw_hash,) in db.execute("SELECT pw_hash FROM users"):
        assert pw_hash.startswith("$argon2id$") and "correct horse" not in pw_hash


@pytest.mark.parametrize(
    "args",
    [["--redis-url", "redis://127.0.0.1:1"], ["--store", "mongo", "--mongo-uri", "mongodb://h/d"]],
    ids=["redis", "mongo"],
)
def test_replicas_without_shared_secrets_refuse_to_start(tmp_path, args):
    """With Redis or MongoDB, generated per-replica secrets would split logins
    and keys: chatd serve exits 2 with one line saying what to set, and
    writes no secret of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    run = subprocess.run(
        [sys.executable, "-m", "chatd", "serve", "--data-dir", str(tmp_path / "d"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatd: with "), run.stderr
    assert "CHATD_JWT_SECRET of at least 32 bytes" in lines[0] and "CHATD_KEYS" in lines[0]
    assert not (tmp_path / "d" / "jwt.secret").exists()
    assert not (tmp_path / "d" / "keys.json").exists()
