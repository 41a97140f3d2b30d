"""REFERENCE IMPLEMENTATION — not chatd, not for production.

The benchmark's yardstick: the same chat workload written the way a
python-socketio application usually is (asyncio, aiohttp, the Socket.IO
``AsyncRedisManager`` for several instances), so ``loadtest/bench.py`` can
run it side by side with chatd and print chatd / reference ratios.

It does the same work per message as chatd, deliberately:

* HTTP ``POST /api/register`` / ``/api/login`` (argon2id with argon2-cffi's
  defaults, JWT HS256), ``GET /healthz``;
* Socket.IO events named after chatd's frames, with the same fields:
  ``send`` → ``sent`` to the sender, ``message`` to the recipient's room (and
  the sender's other devices), ``ack`` / ``seen`` → ``receipt`` to the
  sender's room, receipt acks; on connect, what is still owed (undelivered
  messages, unacked receipts) is sent;
* every message is sealed with AES-256-GCM (fresh nonce, id and conversation
  as associated data) and stored in SQLite before ``sent``, in WAL mode with
  ``synchronous=FULL`` (chatd's setting), one row per message and one receipt
  row per recipient, with the same indexes; writes are group-committed (one
  transaction for everything queued while the previous one ran) in a worker
  thread, as chatd does, so the comparison is about the frameworks and not
  about fsync counts;
* several instances share one SQLite file (``BEGIN IMMEDIATE`` under a busy
  timeout) and fan out through Redis with the Socket.IO Redis manager.

What it leaves out, and chatd does: presence and typing, rate limits, the
owed-queue in Redis (the store is the only record here), slow-consumer
handling, token expiry on open sockets, frame size checks beyond the body.

Run: ``python loadtest/reference/server.py --port 9000 --data-dir D
--secret S [--redis-url redis://…] [--node n1]`` (the load venv's python).
The Socket.IO endpoint is served at ``/ws`` (and ``/ws/``), so the
repository's own NGINX config proxies it unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import jwt
import socketio
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("reference")
MAX_BODY = 4000

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (username TEXT PRIMARY KEY, pw_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, conversation TEXT NOT NULL, seq INTEGER NOT NULL,
    sender TEXT NOT NULL, cid TEXT NOT NULL, ts INTEGER NOT NULL,
    key_id TEXT NOT NULL, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL,
    UNIQUE (conversation, seq), UNIQUE (sender, cid)
);
CREATE TABLE IF NOT EXISTS receipts (
    message_id TEXT NOT NULL, username TEXT NOT NULL, conversation TEXT NOT NULL,
    seq INTEGER NOT NULL, sender TEXT NOT NULL, delivered_ts INTEGER, seen_ts INTEGER,
    d_acked INTEGER NOT NULL DEFAULT 0, s_acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, username)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS owed_messages ON receipts (username, conversation, seq)
    WHERE delivered_ts IS NULL;
CREATE INDEX IF NOT EXISTS owed_receipts ON receipts (sender, message_id, username)
    WHERE (delivered_ts IS NOT NULL AND d_acked = 0) OR (seen_ts IS NOT NULL AND s_acked = 0);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    """Sorts by creation time, like a ULID (ms timestamp, then randomness)."""
    return f"{now_ms():013x}{secrets.token_hex(6)}"


def aad(message_id: str, conversation: str) -> bytes:
    return b"reference/v1\x00" + message_id.encode() + b"\x00" + conversation.encode()


class Store:
    """SQLite with a group-committing writer and pooled readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(SCHEMA)
        self._queue: asyncio.Queue = asyncio.Queue()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    async def read(self, fn, *args):
        return await asyncio.to_thread(lambda: fn(self._conn(), *args))

    # -- group commit ----------------------------------------------------------------

    async def write(self, op: str, *args):
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, args, fut))
        return await fut

    async def writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.to_thread(self._commit, batch)
            except Exception as exc:  # the whole batch fails together
                for _op, _args, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_op, _args, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    def _commit(self, batch) -> list:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = [getattr(self, "_" + op)(conn, *args) for op, args, _fut in batch]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    @staticmethod
    def _create_user(conn, name: str, pw_hash: str) -> bool:
        try:
            conn.execute("INSERT INTO users VALUES (?, ?)", (name, pw_hash))
            return True
        except sqlite3.IntegrityError:
            return False

    @staticmethod
    def _append(conn, mid, conversation, sender, cid, ts, key_id, nonce, ct, recipients):
        row = conn.execute(
            "SELECT id, seq, ts FROM messages WHERE sender = ? AND cid = ?", (sender, cid)
        ).fetchone()
        if row:
            return row[0], row[1], row[2]
        conn.execute("INSERT OR IGNORE INTO conversations (id) VALUES (?)", (conversation,))
        seq = conn.execute(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
            (conversation,),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mid, conversation, seq, sender, cid, ts, key_id, nonce, ct),
        )
        conn.executemany(
            "INSERT INTO receipts (message_id, username, conversation, seq, sender)"
            " VALUES (?, ?, ?, ?, ?)",
            [(mid, r, conversation, seq, sender) for r in recipients],
        )
        return mid, seq, ts

    @staticmethod
    def _mark(conn, user: str, ids: list[str], seen: bool, ts: int) -> list[tuple]:
        """Receipts that changed: (id, conversation, sender, status)."""
        changed = []
        for mid in ids:
            row = conn.execute(
                "SELECT conversation, sender, delivered_ts, seen_ts FROM receipts"
                " WHERE message_id = ? AND username = ?",
                (mid, user),
            ).fetchone()
            if row is None:
                continue
            conversation, sender, d_ts, s_ts = row
            if d_ts is None:
                conn.execute(
                    "UPDATE receipts SET delivered_ts = ? WHERE message_id = ? AND username = ?",
                    (ts, mid, user),
                )
                changed.append((mid, conversation, sender, "delivered"))
            if seen and s_ts is None:
                conn.execute(
                    "UPDATE receipts SET seen_ts = ? WHERE message_id = ? AND username = ?",
                    (ts, mid, user),
                )
                changed.append((mid, conversation, sender, "seen"))
        return changed

    @staticmethod
    def _ack_receipts(conn, sender: str, rids: list[str]) -> None:
        for rid in rids:
            mid, _, rest = rid.partition("/")
            member, _, status = rest.rpartition("/")
            column = "d_acked" if status == "d" else "s_acked"
            conn.execute(
                f"UPDATE receipts SET {column} = 1"
                " WHERE message_id = ? AND username = ? AND sender = ?",
                (mid, member, sender),
            )


class Reference:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node = args.node
        self.secret = args.secret
        args.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(args.data_dir / "reference.db")
        key_file = args.data_dir / "reference.key"
        if not key_file.exists():
            key_file.write_bytes(os.urandom(32))
        self.key = AESGCM(key_file.read_bytes())
        self.hasher = PasswordHasher()
        self.cpu = asyncio.Semaphore(2)  # like chatd's argon2 limiter
        self.users: set[str] = set()  # known to exist (users are never deleted here)
        self.sessions: dict[str, str] = {}  # sid -> username
        manager = socketio.AsyncRedisManager(args.redis_url) if args.redis_url else None
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            client_manager=manager,
            cors_allowed_origins="*",
            max_http_buffer_size=64 * 1024,
        )
        self.app = web.Application()
        self.sio.attach(self.app, socketio_path="ws")
        self.app.router.add_get("/ws", self.sio.eio.handle_request)
        self.app.router.add_post("/api/register", self.register)
        self.app.router.add_post("/api/login", self.login)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.healthz)
        for name in ("connect", "disconnect", "send", "ack", "seen"):
            self.sio.on(name, getattr(self, "on_" + name))
        self.app.on_startup.append(self._start)

    async def _start(self, _app) -> None:
        self._writer = asyncio.get_running_loop().create_task(self.store.writer())

    # -- HTTP ------------------------------------------------------------------------

    @staticmethod
    def error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    async def healthz(self, _request) -> web.Response:
        return web.json_response({"status": "ok", "node": self.node})

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, password = str(body.get("username", "")).lower(), body.get("password")
        if not (3 <= len(name) <= 32) or not isinstance(password, str) or len(password) < 8:
            return self.error(400, "bad_request", "bad username or password")
        async with self.cpu:
            pw_hash = await asyncio.to_thread(self.hasher.hash, password)
        if not await self.store.write("create_user", name, pw_hash):
            return self.error(409, "conflict", "taken")
        return web.json_response({"username": name}, status=201)

    async def login(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, password = str(body.get("username", "")).lower(), str(body.get("password", ""))
        row = await self.store.read(
            lambda c: c.execute("SELECT pw_hash FROM users WHERE username = ?", (name,)).fetchone()
        )
        async with self.cpu:
            try:
                ok = row is not None and await asyncio.to_thread(
                    self.hasher.verify, row[0], password
                )
            except VerificationError:
                ok = False
        if not ok:
            return self.error(401, "unauthorized", "wrong username or password")
        now = int(time.time())
        token = jwt.encode({"sub": name, "iat": now, "exp": now + 3600}, self.secret, "HS256")
        return web.json_response({"token": token, "expires_in": 3600})

    async def user_exists(self, name: str) -> bool:
        if name in self.users:
            return True
        row = await self.store.read(
            lambda c: c.execute("SELECT 1 FROM users WHERE username = ?", (name,)).fetchone()
        )
        if row:
            self.users.add(name)
        return bool(row)

    # -- Socket.IO ---------------------------------------------------------------------

    async def on_connect(self, sid: str, _environ, auth) -> None:
        token = (auth or {}).get("token") if isinstance(auth, dict) else None
        try:
            claims = jwt.decode(token or "", self.secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from None
        user = claims.get("sub")
        if not isinstance(user, str) or not await self.user_exists(user):
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        self.sessions[sid] = user
        await self.sio.enter_room(sid, "u:" + user)
        await self.sio.emit("ready", {"type": "ready", "user": user, "node": self.node}, to=sid)
        await self.backlog(sid, user)

    async def backlog(self, sid: str, user: str) -> None:
        def owed(c):
            messages = c.execute(
                "SELECT m.id, m.conversation, m.seq, m.sender, m.ts, m.key_id, m.nonce,"
                " m.ciphertext FROM receipts r JOIN messages m ON m.id = r.message_id"
                " WHERE r.username = ? AND r.delivered_ts IS NULL ORDER BY r.conversation, r.seq",
                (user,),
            ).fetchall()
            receipts = c.execute(
                "SELECT message_id, username, conversation, delivered_ts, seen_ts, d_acked,"
                " s_acked FROM receipts WHERE sender = ? AND ((delivered_ts IS NOT NULL"
                " AND d_acked = 0) OR (seen_ts IS NOT NULL AND s_acked = 0))",
                (user,),
            ).fetchall()
            return messages, receipts

        messages, receipts = await self.store.read(owed)
        for mid, conv, seq, sender, ts, _kid, nonce, ct in messages:
            body = self.key.decrypt(nonce, ct, aad(mid, conv)).decode()
            frame = {"type": "message", "id": mid, "conversation": conv, "seq": seq}
            frame.update({"from": sender, "body": body, "ts": ts})
            await self.sio.emit("message", frame, to=sid)
        for mid, member, conv, d_ts, s_ts, d_acked, s_acked in receipts:
            if d_ts is not None and not d_acked:
                await self.sio.emit(
                    "receipt", self.receipt(mid, conv, member, "delivered", d_ts), to=sid
                )
            if s_ts is not None and not s_acked:
                await self.sio.emit(
                    "receipt", self.receipt(mid, conv, member, "seen", s_ts), to=sid
                )

    async def on_disconnect(self, sid: str, *_args) -> None:
        self.sessions.pop(sid, None)

    def error_frame(self, sid: str, code: str, message: str, cid=None):
        frame = {"type": "error", "code": code, "message": message}
        if cid is not None:
            frame["cid"] = cid
        return self.sio.emit("error", frame, to=sid)

    async def on_send(self, sid: str, data) -> None:
        user = self.sessions.get(sid)
        if user is None or not isinstance(data, dict):
            return
        cid, to, body = data.get("cid"), data.get("to"), data.get("body")
        if not isinstance(cid, str) or not isinstance(body, str) or len(body) > MAX_BODY:
            await self.error_frame(sid, "bad_request", "bad send", cid)
            return
        if not isinstance(to, str) or to == user or not await self.user_exists(to):
            await self.error_frame(sid, "not_found", "no such user", cid)
            return
        conv = "dm:" + ":".join(sorted((user, to)))
        mid, ts = new_id(), now_ms()
        nonce = os.urandom(12)
        ct = self.key.encrypt(nonce, body.encode(), aad(mid, conv))
        mid, seq, ts = await self.store.write(
            "append", mid, conv, user, cid, ts, "k1", nonce, ct, [to]
        )
        sent = {"type": "sent", "cid": cid, "id": mid, "conversation": conv, "seq": seq, "ts": ts}
        await self.sio.emit("sent", sent, to=sid)
        msg = {"type": "message", "id": mid, "conversation": conv, "seq": seq}
        msg.update({"from": user, "body": body, "ts": ts})
        await self.sio.emit("message", msg, room="u:" + to)
        await self.sio.emit("message", msg, room="u:" + user, skip_sid=sid)

    @staticmethod
    def receipt(mid: str, conv: str, by: str, status: str, ts: int) -> dict:
        rid = f"{mid}/{by}/{status[0]}"
        return {
            "type": "receipt",
            "rid": rid,
            "id": mid,
            "conversation": conv,
            "status": status,
            "by": by,
            "ts": ts,
        }

    async def _mark(self, sid: str, data, seen: bool) -> None:
        user = self.sessions.get(sid)
        if user is None or not isinstance(data, dict):
            return
        ids = [i for i in data.get("ids") or [] if isinstance(i, str)][:1000]
        rids = [r for r in data.get("receipts") or [] if isinstance(r, str)][:1000]
        if ids:
            ts = now_ms()
            for mid, conv, sender, status in await self.store.write("mark", user, ids, seen, ts):
                frame = self.receipt(mid, conv, user, status, ts)
                await self.sio.emit("receipt", frame, room="u:" + sender)
        if rids:
            await self.store.write("ack_receipts", user, rids)

    async def on_ack(self, sid: str, data) -> None:
        await self._mark(sid, data, seen=False)

    async def on_seen(self, sid: str, data) -> None:
        await self._mark(sid, data, seen=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="socket.io reference chat server (benchmark)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--node", default="ref1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ref = Reference(args)
    web.run_app(ref.app, host=args.host, port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
