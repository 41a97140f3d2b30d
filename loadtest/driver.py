"""The benchmark's lean load driver: one asyncio process, aiohttp WebSockets.

``loadtest/bench.py`` (the coordinator) starts several of these with the
load venv's python and talks to each over stdin/stdout, one JSON object a
line. A driver speaks either chatd's wire contract (``--impl chatd``) or the
same frames as Socket.IO events (``--impl sio``, the reference in
``loadtest/reference/``): Engine.IO v4 over a WebSocket, written out by hand
(``42["send",{…}]``) so both sides cost the driver the same.

Modes:

``load``: connect its share of the pairs, print ``{"ready": …}``, wait for
``go`` on stdin, then send **open-loop**: message *k* is due at
``start + k / rate`` whatever the replies (a late driver sends at once and
the latency still counts from the due time). The recipient acks each message
at once and marks it seen at once; the sender acks both receipts. After
``--seconds`` it stops sending, waits up to ``--drain`` seconds for what is
in flight, and prints one result line: latency samples (ms) and the
zero-loss report from :class:`harness.loss.LossChecker`.

``idle``: open connections (authenticated, then silent) on command —
``{"open": n}`` — and answer ``{"open": total}``; ``{"close": true}`` ends it.

Latencies, all on this host's monotonic clock:
delivery = the send's due time → the recipient's ``message``;
seen round trip = the recipient's ``seen`` → the sender's ``seen`` receipt;
also send → ``sent`` and send → ``delivered`` receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness.loss import LossChecker  # noqa: E402  (standard library only)

T_MARK = " ~t="
BODY = "the quick brown fox jumps over the lazy dog"


def now() -> float:
    return time.monotonic()


class Conn:
    """One device, chatd or Socket.IO framing over an aiohttp WebSocket."""

    def __init__(self, impl: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.impl = impl
        self.ws = ws

    @classmethod
    async def open(cls, impl: str, session, url: str, token: str) -> Conn:
        if impl == "sio":
            url = url + ("&" if "?" in url else "?") + "EIO=4&transport=websocket"
        ws = await session.ws_connect(url, max_msg_size=0, compress=0, autoping=True)
        conn = cls(impl, ws)
        if impl == "sio":
            opened = await ws.receive_str()
            if not opened.startswith("0"):
                raise RuntimeError(f"engine.io open expected, got {opened[:80]}")
            await ws.send_str("40" + json.dumps({"token": token}))
        else:
            await conn.send({"type": "auth", "token": token})
        while True:
            frame = await conn.recv()
            if frame is None:
                raise RuntimeError("closed during auth")
            if frame.get("type") == "ready":
                return conn
            if frame.get("type") in ("error", "connect_error"):
                raise RuntimeError(f"auth refused: {frame}")

    async def send(self, frame: dict) -> None:
        if self.impl == "sio":
            await self.ws.send_str("42" + json.dumps([frame["type"], frame]))
        else:
            await self.ws.send_str(json.dumps(frame))

    async def recv(self) -> dict | None:
        """The next frame, or None once the socket closed."""
        while True:
            msg = await self.ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return None
                continue
            text = msg.data
            if self.impl != "sio":
                return json.loads(text)
            if text.startswith("42"):
                return json.loads(text[2:])[1]
            if text == "2":  # engine.io ping
                await self.ws.send_str("3")
            elif text.startswith("40"):
                continue  # namespace connected; 'ready' follows
            elif text.startswith("44"):
                return {"type": "connect_error", "detail": text[2:]}
            elif text.startswith("41") or text.startswith("1"):
                return None


class Pair:
    def __init__(self, a: str, ta: str, b: str, tb: str) -> None:
        self.a, self.ta, self.b, self.tb = a, ta, b, tb
        self.ca: Conn | None = None
        self.cb: Conn | None = None


class Load:
    def __init__(self, args: argparse.Namespace, pairs: list[Pair]) -> None:
        self.args = args
        self.pairs = pairs
        self.checker = LossChecker()
        self.pending: dict[str, tuple[float, str]] = {}  # cid -> (due, recipient)
        self.due_of: dict[str, float] = {}  # id -> due
        self.seen_at: dict[str, float] = {}  # id -> when the recipient sent 'seen'
        self.owed_receipts: set[tuple[str, str]] = set()
        self.lat = {"sent": [], "delivered": [], "delivered_receipt": [], "seen_rtt": []}
        self.errors: dict[str, int] = {}
        self.scheduled = 0
        self.counted_from = 0.0
        self.counted_to = 0.0
        self.delivered_in_window = 0
        self.lag_max = 0.0
        self.worst: dict[int, float] = {}  # second of the window -> worst delivery

    def counting(self, due: float) -> bool:
        return self.counted_from <= due < self.counted_to

    async def sender_reader(self, p: Pair) -> None:
        conn = p.ca
        assert conn is not None
        while (f := await conn.recv()) is not None:
            t = now()
            kind = f.get("type")
            if kind == "sent":
                entry = self.pending.pop(f["cid"], None)
                if entry is None:
                    continue
                due, recipient = entry
                self.checker.sent(f["id"], [recipient])
                self.due_of[f["id"]] = due
                self.owed_receipts.add((f["id"], "delivered"))
                self.owed_receipts.add((f["id"], "seen"))
                if self.counting(due):
                    self.lat["sent"].append(t - due)
            elif kind == "receipt":
                await conn.send({"type": "ack", "receipts": [f["rid"]]})
                key = (f["id"], f["status"])
                if key not in self.owed_receipts:
                    continue
                self.owed_receipts.discard(key)
                due = self.due_of.get(f["id"])
                if f["status"] == "delivered":
                    if due is not None and self.counting(due):
                        self.lat["delivered_receipt"].append(t - due)
                else:
                    ts = self.seen_at.pop(f["id"], None)
                    if ts is not None and due is not None and self.counting(due):
                        self.lat["seen_rtt"].append(t - ts)
                    self.due_of.pop(f["id"], None)
            elif kind == "error":
                code = f.get("code", "?")
                self.errors[code] = self.errors.get(code, 0) + 1
                self.pending.pop(f.get("cid", ""), None)

    async def recipient_reader(self, p: Pair) -> None:
        conn = p.cb
        assert conn is not None
        name = p.b
        while (f := await conn.recv()) is not None:
            if f.get("type") != "message" or f.get("from") == name:
                continue
            t = now()
            self.checker.received(name, name, f)
            body = f["body"]
            due = float(body[body.rfind(T_MARK) + len(T_MARK) :])
            if self.counting(due):
                self.lat["delivered"].append(t - due)
                second = int(due - self.counted_from)
                self.worst[second] = max(self.worst.get(second, 0.0), t - due)
                if t < self.counted_to:
                    self.delivered_in_window += 1
            await conn.send({"type": "ack", "ids": [f["id"]]})
            self.seen_at[f["id"]] = now()
            await conn.send({"type": "seen", "ids": [f["id"]]})

    async def send_loop(self, start: float, rate: float, seconds: float) -> None:
        interval = 1.0 / rate
        cycle = itertools.cycle(self.pairs)
        k = 0
        while True:
            due = start + k * interval
            if due >= start + seconds:
                return
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.lag_max = max(self.lag_max, -delay)
            p = next(cycle)
            k += 1
            self.scheduled += 1
            cid = f"{p.a}-{k}-{int(start)}"
            self.pending[cid] = (due, p.b)
            assert p.ca is not None
            await p.ca.send(
                {"type": "send", "cid": cid, "to": p.b, "body": f"{BODY}{T_MARK}{due:.6f}"}
            )

    def outstanding(self) -> int:
        return len(self.pending) + len(self.checker.report().missing) + len(self.owed_receipts)


async def run_load(args: argparse.Namespace, data: list) -> None:
    pairs = [Pair(*row) for row in data[args.index :: args.of]]
    load = Load(args, pairs)
    connector = aiohttp.TCPConnector(limit=0, local_addr=(args.src, 0) if args.src else None)
    async with aiohttp.ClientSession(connector=connector) as session:
        sem = asyncio.Semaphore(50)

        async def connect(p: Pair) -> None:
            async with sem:
                p.ca = await Conn.open(args.impl, session, args.url, p.ta)
                p.cb = await Conn.open(args.impl, session, args.url, p.tb)

        await asyncio.gather(*(connect(p) for p in pairs))
        readers = [asyncio.create_task(load.sender_reader(p)) for p in pairs]
        readers += [asyncio.create_task(load.recipient_reader(p)) for p in pairs]
        emit({"ready": len(pairs)})
        cmd = json.loads(await asyncio.to_thread(sys.stdin.readline))
        start = float(cmd["start"])
        load.counted_from = start + args.warmup
        load.counted_to = start + args.seconds
        await asyncio.sleep(max(0.0, start - now()))
        await load.send_loop(start, args.rate, args.seconds)
        deadline = now() + args.drain
        while now() < deadline and load.outstanding():  # noqa: ASYNC110 - polling on purpose
            await asyncio.sleep(0.1)
        report = load.checker.report()
        for task in readers:
            task.cancel()
        for p in pairs:
            for c in (p.ca, p.cb):
                if c is not None:
                    await c.ws.close()
    emit(
        {
            "result": {
                "scheduled": load.scheduled,
                "window": args.seconds - args.warmup,
                "delivered_in_window": load.delivered_in_window,
                "lat_ms": {k: [round(v * 1000, 3) for v in vs] for k, vs in load.lat.items()},
                "loss": {
                    "sent": report.sent,
                    "expected": report.expected_deliveries,
                    "delivered": report.delivered,
                    "missing": len(report.missing),
                    "duplicates": report.duplicates,
                    "out_of_order": report.out_of_order,
                },
                "unconfirmed_sends": len(load.pending),
                "receipts_missing": len(load.owed_receipts),
                "errors": load.errors,
                "lag_max_ms": round(load.lag_max * 1000, 1),
                "worst_by_second_ms": {k: round(v * 1000, 1) for k, v in load.worst.items()},
            }
        }
    )


async def run_idle(args: argparse.Namespace, data: list) -> None:
    tokens = [t for row in data for t in (row[1], row[3])]
    conns: list[Conn] = []
    readers: list[asyncio.Task] = []
    connector = aiohttp.TCPConnector(limit=0, local_addr=(args.src, 0) if args.src else None)

    async def keep(conn: Conn) -> None:
        while await conn.recv() is not None:
            pass

    async with aiohttp.ClientSession(connector=connector) as session:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                conn = await Conn.open(args.impl, session, args.url, tokens[i % len(tokens)])
            conns.append(conn)
            readers.append(asyncio.create_task(keep(conn)))

        while True:
            cmd = json.loads(await asyncio.to_thread(sys.stdin.readline) or '{"close": true}')
            if cmd.get("close"):
                break
            base = len(conns) + args.index * 7
            await asyncio.gather(*(one(base + i) for i in range(int(cmd["open"]))))
            emit({"open": len(conns)})
        for task in readers:
            task.cancel()
        for conn in conns:
            await conn.ws.close()
    emit({"closed": len(conns)})


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark driver (started by bench.py)")
    parser.add_argument("mode", choices=["load", "idle"])
    parser.add_argument("--impl", choices=["chatd", "sio"], default="chatd")
    parser.add_argument("--url", required=True, help="ws://host:port/ws")
    parser.add_argument("--users", required=True, help="JSON: [[a, token_a, b, token_b], …]")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s from this driver")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--src", default="", help="source address, e.g. 127.0.0.3")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    data = json.loads(Path(args.users).read_text())
    asyncio.run(run_load(args, data) if args.mode == "load" else run_idle(args, data))


if __name__ == "__main__":
    main()
