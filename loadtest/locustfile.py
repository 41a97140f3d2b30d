"""Locust suite: people chatting in pairs and small groups through NGINX.

Run it through ``loadtest/run`` (which starts Redis, the replicas and NGINX,
runs Locust headless and stops everything); by hand::

    build/loadtest-venv/bin/locust -f loadtest/locustfile.py --headless \\
        --host http://127.0.0.1:PORT -u 40 -r 10 -t 30s --csv out/locust --html out/report.html

Each :class:`ChatUser` registers and logs in over the HTTP API (those
requests appear in the stats as ``POST /api/register`` / ``/api/login``),
opens one WebSocket, authenticates, and joins a *room*: users are dealt into
rooms as they arrive, sized by ``--room-sizes`` (default ``2,2,3,4``: two
pairs, then a group of three, then a group of four, repeating); the user who
completes a group room creates the group conversation. Once everyone in its
room is connected a user sends a message every ``--chat-wait`` seconds to its
room. Whoever receives a message acks it at once (delivered) and marks it
seen after a human-like pause (``--seen-delay``); the sender acks receipts.

Four request types are reported to Locust (type ``WS``), all measured on
this host's monotonic clock, never from server timestamps:

* ``send→sent``: the ``send`` frame until the sender's ``sent``;
* ``send→delivered``: the ``send`` until the recipient's ``message`` (the
  send time travels in the body, so this holds across Locust processes on
  one host);
* ``send→delivered receipt``: the ``send`` until the sender's ``delivered``
  receipt from that recipient;
* ``seen→seen receipt``: the recipient's ``seen`` until the sender's
  ``seen`` receipt (a room lives in one process, so both ends share a clock).

Zero-loss accounting reuses :class:`chatd.testing.loss.LossChecker` (plain
bookkeeping, no trio). When the test stops, the users stop sending, the
sockets stay open until everything in flight has arrived (``--drain``
seconds at most), then the report (missing / duplicate / out-of-order, and
receipts that never came) is printed and written to ``--loss-file``; any
missing message or receipt makes Locust exit non-zero.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import websocket
from gevent.event import Event
from gevent.queue import Queue
from locust import HttpUser, events, task
from locust.env import Environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# loss.py and chatd/__init__.py import nothing but the standard library.
from chatd.testing.loss import LossChecker  # noqa: E402

log = logging.getLogger("chatd.locust")

SEND_SENT = "send→sent"
SEND_DELIVERED = "send→delivered"
SEND_RECEIPT = "send→delivered receipt"
SEEN_RECEIPT = "seen→seen receipt"
REQUEST_NAMES = (SEND_SENT, SEND_DELIVERED, SEND_RECEIPT, SEEN_RECEIPT)
WS = "WS"
PASSWORD = "locust-password"
_T_MARK = " ~t="


@events.init_command_line_parser.add_listener
def _options(parser, **_kw) -> None:
    g = parser.add_argument_group("chatd")
    g.add_argument("--room-sizes", default="2,2,3,4", help="room sizes dealt in turn")
    g.add_argument("--chat-wait", default="1,3", help="seconds between a user's sends: MIN,MAX")
    g.add_argument("--seen-delay", default="0.3,1.5", help="seconds before 'seen': MIN,MAX")
    g.add_argument("--drain", type=float, default=20.0, help="seconds to wait for in-flight")
    g.add_argument("--loss-file", default="", help="write the zero-loss report here (JSON)")
    g.add_argument("--ws-url", default="", help="WebSocket URL (default: the host's /ws)")


def _pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def now() -> float:
    return time.monotonic()


# -- process-wide bookkeeping ---------------------------------------------------------


@dataclass
class Room:
    size: int
    members: list[ChatUser] = field(default_factory=list)
    connected: int = 0
    conversation: str | None = None  # a group's id; pairs send with `to`
    ready: Event = field(default_factory=Event)

    def others(self, user: str) -> list[str]:
        return [m.username for m in self.members if m.username != user]


class Ledger:
    """Everything this process sent and received, for the zero-loss report."""

    def __init__(self) -> None:
        self.checker = LossChecker()
        self.rooms: list[Room] = []
        self.sizes = itertools.cycle([2])
        self.stopping = False
        self.clients: list[WsClient] = []
        self.seen_at: dict[tuple[str, str], float] = {}  # (id, seer) -> when 'seen' went out
        self.owed_receipts: set[tuple[str, str, str]] = set()  # (id, member, status)
        self.pending_seen = 0
        self.errors: dict[str, int] = {}
        self.env: Environment | None = None

    def join(self, user: ChatUser) -> tuple[Room, bool]:
        """Deal a user into the open room; True if it completed the room."""
        room = (
            self.rooms[-1]
            if self.rooms and len(self.rooms[-1].members) < self.rooms[-1].size
            else None
        )
        if room is None:
            room = Room(next(self.sizes))
            self.rooms.append(room)
        room.members.append(user)
        return room, len(room.members) == room.size

    def fire(self, name: str, seconds: float, exc: Exception | None = None) -> None:
        assert self.env is not None
        self.env.events.request.fire(
            request_type=WS,
            name=name,
            response_time=seconds * 1000.0,
            response_length=0,
            exception=exc,
            context={},
        )


LEDGER = Ledger()


@events.init.add_listener
def _init(environment: Environment, **_kw) -> None:
    LEDGER.env = environment
    opts = environment.parsed_options
    if opts is not None:
        LEDGER.sizes = itertools.cycle([int(s) for s in opts.room_sizes.split(",") if s])


# -- one WebSocket ----------------------------------------------------------------------


class WsClient:
    """A device: one websocket-client connection with a reader and a writer
    greenlet. It reconnects and re-sends unconfirmed frames with their cid.

    The greenlets are not the Locust user's: they outlive a stopped user so
    what is in flight can still arrive while the run drains.
    """

    def __init__(self, user: ChatUser, url: str, token: str) -> None:
        self.user = user
        self.name = user.username
        self.url = url
        self.token = token
        self.out: Queue = Queue()
        self.pending: dict[str, tuple[float, dict, list[str]]] = {}  # cid -> (t0, frame, to)
        self.sent_at: dict[str, float] = {}  # message id -> t0 (for receipts)
        self.ready = Event()
        self.closed = False
        self.connections = 0
        self.ws: websocket.WebSocket | None = None
        self._reader = gevent.spawn(self._run)
        LEDGER.clients.append(self)

    # the reader owns the connection; the writer drains `out` onto it
    def _connect(self) -> websocket.WebSocket:
        ws = websocket.create_connection(self.url, timeout=30)
        ws.send(json.dumps({"type": "auth", "token": self.token}))
        while True:
            frame = json.loads(ws.recv())
            if frame.get("type") == "ready":
                return ws
            if frame.get("type") == "error":
                raise RuntimeError(f"{self.name}: auth refused: {frame}")

    def _run(self) -> None:
        backoff = 0.1
        while not self.closed:
            try:
                ws = self._connect()
            except Exception as exc:
                log.warning("%s: connect failed: %r", self.name, exc)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self.connections += 1
            conn = f"{self.name}#{self.connections}"
            self.ws = ws
            writer = gevent.spawn(self._write, ws)
            for _t0, frame, _to in list(self.pending.values()):  # retry with the same cid
                self.out.put(frame)
            self.ready.set()
            try:
                while True:
                    raw = ws.recv()
                    if not raw:
                        break
                    self._handle(json.loads(raw), conn)
            except Exception as exc:
                if not self.closed:
                    log.warning("%s: connection lost: %r", self.name, exc)
            finally:
                self.ready.clear()
                self.ws = None
                writer.kill(block=False)
                try:
                    ws.close()
                except Exception:
                    pass

    def _write(self, ws: websocket.WebSocket) -> None:
        while True:
            frame = self.out.get()
            ws.send(json.dumps(frame))

    def send_json(self, frame: dict) -> None:
        self.out.put(frame)

    def close(self) -> None:
        self.closed = True
        ws = self.ws
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        self._reader.kill(block=False)

    # -- frames -------------------------------------------------------------------

    def send_message(self, text: str, recipients: list[str], *, to=None, conversation=None):
        t0 = now()
        cid = f"{self.name}-{secrets.token_hex(4)}"
        frame: dict = {"type": "send", "cid": cid, "body": f"{text}{_T_MARK}{t0:.6f}"}
        if conversation is not None:
            frame["conversation"] = conversation
        else:
            frame["to"] = to
        self.pending[cid] = (t0, frame, recipients)
        self.send_json(frame)

    def _handle(self, f: dict, conn: str) -> None:
        kind = f.get("type")
        t = now()
        if kind == "sent":
            entry = self.pending.pop(f["cid"], None)
            if entry is None:
                return  # a retried send answered twice
            t0, _frame, recipients = entry
            LEDGER.fire(SEND_SENT, t - t0)
            LEDGER.checker.sent(f["id"], recipients)
            self.sent_at[f["id"]] = t0
            for member in recipients:
                LEDGER.owed_receipts.add((f["id"], member, "delivered"))
                LEDGER.owed_receipts.add((f["id"], member, "seen"))
        elif kind == "message":
            if f["from"] == self.name:
                return  # our own message on another device: never owed
            LEDGER.checker.received(self.name, conn, f)
            body = f.get("body", "")
            mark = body.rfind(_T_MARK)
            if mark >= 0:
                LEDGER.fire(SEND_DELIVERED, t - float(body[mark + len(_T_MARK) :]))
            self.send_json({"type": "ack", "ids": [f["id"]]})
            LEDGER.pending_seen += 1
            gevent.spawn_later(random.uniform(*self.user.seen_delay), self._seen, f["id"])
        elif kind == "receipt":
            self.send_json({"type": "ack", "receipts": [f["rid"]]})
            key = (f["id"], f["by"], f["status"])
            if key not in LEDGER.owed_receipts:
                return  # again after a reconnect, or a message from before this run
            LEDGER.owed_receipts.discard(key)
            if f["status"] == "delivered":
                t0 = self.sent_at.get(f["id"])
                if t0 is not None:
                    LEDGER.fire(SEND_RECEIPT, t - t0)
            else:
                ts = LEDGER.seen_at.pop((f["id"], f["by"]), None)
                if ts is not None:
                    LEDGER.fire(SEEN_RECEIPT, t - ts)
        elif kind == "error":
            code = f.get("code", "?")
            LEDGER.errors[code] = LEDGER.errors.get(code, 0) + 1
            entry = self.pending.pop(f.get("cid", ""), None)
            if entry is not None:
                LEDGER.fire(SEND_SENT, t - entry[0], RuntimeError(f"error {code}"))

    def _seen(self, mid: str) -> None:
        LEDGER.pending_seen -= 1
        LEDGER.seen_at[(mid, self.name)] = now()
        self.send_json({"type": "seen", "ids": [mid]})


# -- the Locust user --------------------------------------------------------------------

_numbers = itertools.count(1)
_run_tag = secrets.token_hex(3)


class ChatUser(HttpUser):
    """Registers, logs in, connects, joins a room and chats in it."""

    def wait_time(self) -> float:
        return random.uniform(*self.chat_wait)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.chat_wait = _pair(opts.chat_wait) if opts else (1.0, 3.0)
        self.seen_delay = _pair(opts.seen_delay) if opts else (0.3, 1.5)
        self.username = f"lc{_run_tag}x{os.getpid() % 1000}x{next(_numbers)}"
        self.client.post(
            "/api/register",
            json={"username": self.username, "password": PASSWORD},
            name="/api/register",
        ).raise_for_status()
        resp = self.client.post(
            "/api/login",
            json={"username": self.username, "password": PASSWORD},
            name="/api/login",
        )
        resp.raise_for_status()
        token = resp.json()["token"]
        url = (opts.ws_url if opts else "") or self.host.replace("http", "ws", 1).rstrip(
            "/"
        ) + "/ws"
        self.ws = WsClient(self, url, token)
        if not self.ws.ready.wait(30):
            raise RuntimeError(f"{self.username}: no 'ready' within 30 s")
        self.room, complete = LEDGER.join(self)
        self.room.connected += 1
        if complete:
            self._open_room()

    def _open_room(self) -> None:
        room = self.room
        if room.size > 2:
            resp = self.client.post(
                "/api/conversations",
                json={"members": room.others(self.username), "title": "locust group"},
                headers={"Authorization": f"Bearer {self.ws.token}"},
                name="/api/conversations",
            )
            resp.raise_for_status()
            room.conversation = resp.json()["id"]
        room.ready.set()

    @task
    def chat(self) -> None:
        room = self.room
        if not room.ready.is_set() or LEDGER.stopping:
            return
        others = room.others(self.username)
        text = random.choice(("hi", "how are you?", "see you at 8", "ok 👍", "lunch?")) * 3
        if room.conversation:
            self.ws.send_message(text, others, conversation=room.conversation)
        else:
            self.ws.send_message(text, others, to=others[0])


# -- draining and the zero-loss report ---------------------------------------------------


def _outstanding() -> dict[str, int]:
    report = LEDGER.checker.report()
    return {
        "unconfirmed_sends": sum(len(c.pending) for c in LEDGER.clients),
        "missing": len(report.missing),
        "seen_pending": LEDGER.pending_seen,
        "receipts_owed": len(LEDGER.owed_receipts),
    }


@events.test_stop.add_listener
def _drain(environment: Environment, **_kw) -> None:
    LEDGER.stopping = True
    opts = environment.parsed_options
    deadline = now() + (opts.drain if opts else 20.0)
    while now() < deadline and any(_outstanding().values()):
        gevent.sleep(0.2)
    left = _outstanding()
    report = LEDGER.checker.report()
    for client in LEDGER.clients:
        client.close()
    result = {
        "summary": report.summary(),
        "sent": report.sent,
        "expected_deliveries": report.expected_deliveries,
        "delivered": report.delivered,
        "missing": len(report.missing),
        "missing_sample": report.missing[:50],
        "duplicates": report.duplicates,
        "out_of_order": report.out_of_order,
        "unexpected": report.unexpected,
        "receipts_missing": left["receipts_owed"],
        "unconfirmed_sends": left["unconfirmed_sends"],
        "errors": LEDGER.errors,
        "users": len(LEDGER.clients),
        "rooms": sum(1 for r in LEDGER.rooms if r.ready.is_set()),
        "ok": report.ok and not left["receipts_owed"],
    }
    print(
        f"zero-loss: {report.summary()} receipts_missing={left['receipts_owed']}"
        f" unconfirmed_sends={left['unconfirmed_sends']} errors={LEDGER.errors}",
        flush=True,
    )
    if opts is not None and opts.loss_file:
        Path(opts.loss_file).write_text(json.dumps(result, indent=2))
    if not result["ok"]:
        environment.process_exit_code = 3
