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

End-to-end rooms (``--e2e-share``, half of them by default) report the same
four under the same names with `` (e2e)`` appended, beside the plain ones:
their users register an end-to-end device, each sender seals an epoch key
to the room's devices before its first message, sends ``e2e`` objects, and
the recipients open their shares and decrypt (``harness.e2e_client``,
the same bytes as the web client) before they ack and mark seen.

Zero-loss accounting reuses :class:`harness.loss.LossChecker` (plain
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
from typing import Any

import gevent
import websocket
from gevent.event import Event
from gevent.queue import Queue
from locust import HttpUser, events, task
from locust.env import Environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# loss.py and chatd/__init__.py import nothing but the standard library;
# the end-to-end client needs cryptography (in loadtest/requirements.txt).
from harness.e2e_client import (  # noqa: E402
    E2EDevice,
    Request,
    new_epoch_steps,
    read_steps,
    register_steps,
    reseal_steps,
    run_steps,
)
from harness.e2e_crypto import DecryptError  # noqa: E402
from harness.loss import LossChecker  # noqa: E402

log = logging.getLogger("chatd.locust")

SEND_SENT = "send→sent"
SEND_DELIVERED = "send→delivered"
SEND_RECEIPT = "send→delivered receipt"
SEEN_RECEIPT = "seen→seen receipt"
REQUEST_NAMES = (SEND_SENT, SEND_DELIVERED, SEND_RECEIPT, SEEN_RECEIPT)
E2E = " (e2e)"
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
    g.add_argument(
        "--e2e-share", type=float, default=0.5, help="the share of rooms that are end-to-end"
    )


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
    #: End-to-end: every message an ``e2e`` object (pairs then send to
    #: their conversation's id, made before the first message).
    e2e: bool = False

    def others(self, user: str) -> list[str]:
        return [m.username for m in self.members if m.username != user]


class Ledger:
    """Everything this process sent and received, for the zero-loss report."""

    def __init__(self) -> None:
        self.checker = LossChecker()
        self.rooms: list[Room] = []
        self.sizes = itertools.cycle([2])
        self.e2e_share = 0.5
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
            # Every room whose running share of e2e falls short is e2e:
            # 0.5 makes every other one.
            e2e_so_far = sum(1 for r in self.rooms if r.e2e)
            room = Room(next(self.sizes), e2e=e2e_so_far < self.e2e_share * (len(self.rooms) + 1))
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
        LEDGER.e2e_share = opts.e2e_share


# -- one WebSocket ----------------------------------------------------------------------


class WsClient:
    """A device: one websocket-client connection with a reader and a writer
    greenlet. It reconnects and re-sends unconfirmed frames with their cid.

    The greenlets are not the Locust user's: they outlive a stopped user so
    what is in flight can still arrive while the run drains.
    """

    def __init__(self, user: ChatUser, url: str, token: str) -> None:
        self.user = user
        self.e2e: E2EDevice = user.e2e
        self.name = user.username
        self.url = url
        self.token = token
        self.out: Queue = Queue()
        self.pending: dict[str, tuple[float, dict, list[str]]] = {}  # cid -> (t0, frame, to)
        self.sent_at: dict[str, float] = {}  # message id -> t0 (for receipts)
        self.sealed: set[str] = set()  # ids of this client's end-to-end messages
        self.texts: dict[str, str] = {}  # cid -> plaintext of an unconfirmed e2e send
        self.ready = Event()
        self.closed = False
        self.connections = 0
        self.ws: websocket.WebSocket | None = None
        self._reader = gevent.spawn(self._run)
        LEDGER.clients.append(self)

    # the reader owns the connection; the writer drains `out` onto it
    def _connect(self) -> websocket.WebSocket:
        ws = websocket.create_connection(self.url, timeout=30)
        ws.send(json.dumps({"type": "auth", "token": self.token, "device": self.e2e.device}))
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
        body = f"{text}{_T_MARK}{t0:.6f}"
        frame: dict = {"type": "send", "cid": cid, "body": body}
        if conversation is not None and conversation in self.e2e.epochs:
            del frame["body"]
            frame["e2e"] = self.e2e.encrypt(conversation, body)
            self.texts[cid] = body
        if conversation is not None:
            frame["conversation"] = conversation
        else:
            frame["to"] = to
        self.pending[cid] = (t0, frame, recipients)
        self.send_json(frame)

    def _name(self, name: str, e2e: bool) -> str:
        return name + E2E if e2e else name

    def _body(self, f: dict) -> str:
        """The text of a message frame: decrypted when it is end-to-end
        (fetching the shares and device lists it needs); "" if it cannot be."""
        if "e2e" not in f:
            return f.get("body", "")
        try:
            return self.user.read_e2e(f)
        except DecryptError as exc:
            LEDGER.errors[f"decrypt: {exc.reason}"] = (
                LEDGER.errors.get(f"decrypt: {exc.reason}", 0) + 1
            )
            return ""

    def _handle(self, f: dict, conn: str) -> None:
        kind = f.get("type")
        t = now()
        if kind == "sent":
            entry = self.pending.pop(f["cid"], None)
            if entry is None:
                return  # a retried send answered twice
            t0, frame, recipients = entry
            e2e = "e2e" in frame
            if e2e:
                self.sealed.add(f["id"])
                self.texts.pop(f["cid"], None)
            LEDGER.fire(self._name(SEND_SENT, e2e), t - t0)
            LEDGER.checker.sent(f["id"], recipients)
            self.sent_at[f["id"]] = t0
            for member in recipients:
                LEDGER.owed_receipts.add((f["id"], member, "delivered"))
                LEDGER.owed_receipts.add((f["id"], member, "seen"))
        elif kind == "message":
            if f["from"] == self.name:
                return  # our own message on another device: never owed
            LEDGER.checker.received(self.name, conn, f)
            body = self._body(f)
            t = now()  # after decrypting: the latency a person sees
            mark = body.rfind(_T_MARK)
            if mark >= 0:
                sent = float(body[mark + len(_T_MARK) :])
                LEDGER.fire(self._name(SEND_DELIVERED, "e2e" in f), t - sent)
            self.send_json({"type": "ack", "ids": [f["id"]]})
            LEDGER.pending_seen += 1
            gevent.spawn_later(random.uniform(*self.user.seen_delay), self._seen, f["id"])
        elif kind == "receipt":
            self.send_json({"type": "ack", "receipts": [f["rid"]]})
            key = (f["id"], f["by"], f["status"])
            if key not in LEDGER.owed_receipts:
                return  # again after a reconnect, or a message from before this run
            LEDGER.owed_receipts.discard(key)
            e2e = f["id"] in self.sealed
            if f["status"] == "delivered":
                t0 = self.sent_at.get(f["id"])
                if t0 is not None:
                    LEDGER.fire(self._name(SEND_RECEIPT, e2e), t - t0)
            else:
                ts = LEDGER.seen_at.pop((f["id"], f["by"]), None)
                if ts is not None:
                    LEDGER.fire(self._name(SEEN_RECEIPT, e2e), t - ts)
        elif kind == "error":
            code = f.get("code", "?")
            LEDGER.errors[code] = LEDGER.errors.get(code, 0) + 1
            if f.get("reason") == "e2e_stale" and f.get("cid") in self.pending:
                # The room's devices changed: a new epoch, the same cid.
                gevent.spawn(self.user.resend_sealed, f["cid"])
                return
            entry = self.pending.pop(f.get("cid", ""), None)
            if entry is not None:
                name = self._name(SEND_SENT, "e2e" in entry[1])
                LEDGER.fire(name, t - entry[0], RuntimeError(f"error {code}"))

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
        self.auth = {"Authorization": f"Bearer {token}"}
        self.e2e = E2EDevice(self.username)
        run_steps(register_steps(self.e2e), self._http)
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
        if room.size == 2 and room.e2e:
            # Made before the first message, so that both ends can fetch
            # each other's devices (only contacts may).
            resp = self.client.post(
                "/api/conversations",
                json={"to": room.others(self.username)[0]},
                headers=self.auth,
                name="/api/conversations",
            )
            resp.raise_for_status()
            room.conversation = resp.json()["id"]
        elif room.size > 2:
            resp = self.client.post(
                "/api/conversations",
                json={
                    "members": room.others(self.username),
                    "title": "locust group",
                    "e2e": room.e2e,
                },
                headers=self.auth,
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
        if room.e2e and room.conversation not in self.e2e.epochs:
            self.new_epoch()
        if room.conversation:
            self.ws.send_message(text, others, conversation=room.conversation)
        else:
            self.ws.send_message(text, others, to=others[0])

    # -- end-to-end: harness.e2e_client's procedures, their calls made here -----------

    def _http(self, request: Request) -> tuple[int, Any]:
        """One call of an end-to-end procedure, through this user's session
        (in Locust's stats under the route's name); an error status raises."""
        resp = self.client.request(
            request.method,
            request.path,
            json=request.json,
            headers=self.auth,
            name=request.name,
        )
        resp.raise_for_status()
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, resp.text

    def _members(self) -> list[str]:
        return [self.username, *self.room.others(self.username)]

    def new_epoch(self) -> None:
        """A new epoch for the room, sealed to every device in it, uploaded."""
        conv = self.room.conversation
        assert conv is not None
        run_steps(new_epoch_steps(self.e2e, conv, self._members()), self._http)

    def resend_sealed(self, cid: str) -> None:
        """After ``e2e_stale``: a new epoch, and the message again, same cid."""
        entry = self.ws.pending.get(cid)
        if entry is None:
            return
        t0, frame, recipients = entry
        steps = reseal_steps(self.e2e, frame, self.ws.texts[cid], self._members())
        frame = run_steps(steps, self._http)
        self.ws.pending[cid] = (t0, frame, recipients)
        self.ws.send_json(frame)

    def read_e2e(self, f: dict) -> str:
        """Decrypt a message frame (fetching this device's share of its
        epoch and the sender's devices when they are new)."""
        return run_steps(read_steps(self.e2e, f), self._http)


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
