"""Closed-loop throughput with full receipts between many pairs on one chatd.

Each pair is two users on their own WebSockets: the sender keeps a window of
messages in flight; the recipient acks each message and marks it seen; the
sender acks both receipts. A message counts as done when its seen receipt
is back. Reports done messages/s and latency percentiles, all measured on
this process's clock.

    python loadtest/pairs.py --pairs 50 --seconds 20            # starts its own chatd
    python loadtest/pairs.py --http http://h:8080 --ws ws://h:8081/ws ...

It starts chatd with ``--rate 0`` (no per-connection rate limit) on a fresh
data dir unless ``--http``/``--ws`` point at a running one, and checks at
the end that every ``sent`` message reached its recipient exactly once per
connection (missing / duplicate counts; non-zero missing fails the run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.client import Api
from harness.procs import ChatdProcess
from loadtest.bench import cpu_model


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


class Stats:
    def __init__(self) -> None:
        self.sent: list[float] = []
        self.delivered: list[float] = []
        self.receipt_delivered: list[float] = []
        self.receipt_seen: list[float] = []
        self.done = 0
        self.missing = 0
        self.duplicates = 0
        self.errors: dict[str, int] = {}


async def run_pair(
    i: int,
    api: Api,
    ws_url: str,
    timing: dict,
    window: int,
    stats: Stats,
    counting: trio.Event,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    tag = secrets.token_hex(3)
    alice, bob = f"pa{i}x{tag}", f"pb{i}x{tag}"
    ta, tb = await api.user(alice, "bench-password"), await api.user(bob, "bench-password")
    sent_at: dict[str, float] = {}  # cid -> t0
    by_id: dict[str, float] = {}  # id -> t0
    received: dict[str, int] = {}
    expected: set[str] = set()
    free = trio.Semaphore(window)
    n = 0

    async with open_websocket_url(ws_url) as wa, open_websocket_url(ws_url) as wb:
        for ws, token in ((wa, ta), (wb, tb)):
            await ws.send_message(json.dumps({"type": "auth", "token": token}))
            assert json.loads(await ws.get_message())["type"] == "ready"
        task_status.started()  # registered, logged in, both sockets ready

        async def sender_reader() -> None:
            while True:
                f = json.loads(await wa.get_message())
                now = time.perf_counter()
                if f["type"] == "sent":
                    t0 = sent_at.pop(f["cid"], None)
                    if t0 is not None:
                        by_id[f["id"]] = t0
                        expected.add(f["id"])
                        if counting.is_set():
                            stats.sent.append(now - t0)
                elif f["type"] == "receipt":
                    t0 = by_id.get(f["id"])
                    await wa.send_message(json.dumps({"type": "ack", "receipts": [f["rid"]]}))
                    if t0 is None:
                        continue
                    if f["status"] == "delivered":
                        if counting.is_set():
                            stats.receipt_delivered.append(now - t0)
                    else:
                        by_id.pop(f["id"], None)
                        if counting.is_set():
                            stats.receipt_seen.append(now - t0)
                            stats.done += 1
                        free.release()
                elif f["type"] == "error":
                    stats.errors[f["code"]] = stats.errors.get(f["code"], 0) + 1
                    if "cid" in f and sent_at.pop(f["cid"], None) is not None:
                        free.release()

        async def recipient_reader() -> None:
            while True:
                f = json.loads(await wb.get_message())
                if f["type"] != "message":
                    continue
                received[f["id"]] = received.get(f["id"], 0) + 1
                t0 = by_id.get(f["id"])
                if t0 is not None and counting.is_set():
                    stats.delivered.append(time.perf_counter() - t0)
                await wb.send_message(json.dumps({"type": "seen", "ids": [f["id"]]}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender_reader)
            nursery.start_soon(recipient_reader)
            while time.perf_counter() < timing["stop_at"]:
                await free.acquire()
                n += 1
                cid = f"{i}-{n}"
                sent_at[cid] = time.perf_counter()
                await wa.send_message(
                    json.dumps({"type": "send", "cid": cid, "to": bob, "body": f"message {n} " * 4})
                )
            # Let what is in flight finish, then stop reading.
            with trio.move_on_after(10):
                for _ in range(window):  # every slot back: nothing in flight
                    await free.acquire()
            nursery.cancel_scope.cancel()
    stats.missing += len(expected - set(received))
    stats.duplicates += sum(c - 1 for c in received.values() if c > 1)


async def main(args: argparse.Namespace) -> int:
    proc = None
    http, ws = args.http, args.ws
    if not http:
        data = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
        proc = ChatdProcess(data, args=["--rate", "0", "--log-level", "warning"]).start()
        http, ws = proc.http_url, proc.ws_url
    api = Api(http)
    stats = Stats()
    counting = trio.Event()
    try:
        # Setting up (argon2 for every registration and login) is not load:
        # the clock starts once every pair is connected.
        timing = {"stop_at": float("inf")}
        async with trio.open_nursery() as nursery:
            for i in range(args.pairs):
                await nursery.start(run_pair, i, api, ws, timing, args.window, stats, counting)
            stop_at = time.perf_counter() + args.warmup + args.seconds
            timing["stop_at"] = stop_at
            await trio.sleep(args.warmup)
            counting.set()
            t_count = time.perf_counter()
        elapsed = min(time.perf_counter(), stop_at) - t_count
    finally:
        await api.aclose()
        if proc is not None:
            proc.stop()

    ms = 1000.0
    result = {
        "pairs": args.pairs,
        "window": args.window,
        "seconds": round(elapsed, 1),
        "messages_per_s": round(stats.done / elapsed, 1),
        "send_to_sent_ms": {p: round(pct(stats.sent, p) * ms, 2) for p in (50, 99)},
        "send_to_delivered_ms": {p: round(pct(stats.delivered, p) * ms, 2) for p in (50, 99)},
        "send_to_delivered_receipt_ms": {
            p: round(pct(stats.receipt_delivered, p) * ms, 2) for p in (50, 99)
        },
        "send_to_seen_receipt_ms": {p: round(pct(stats.receipt_seen, p) * ms, 2) for p in (50, 99)},
        "missing": stats.missing,
        "duplicates": stats.duplicates,
        "errors": stats.errors,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
    }
    print(json.dumps(result, indent=2))
    if stats.sent:
        print(
            f"mean send->seen receipt {statistics.mean(stats.receipt_seen) * ms:.1f} ms",
            file=sys.stderr,
        )
    return 1 if stats.missing else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--window", type=int, default=4, help="messages in flight per pair")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--http", default="")
    parser.add_argument("--ws", default="")
    sys.exit(trio.run(main, parser.parse_args()))
