#!/usr/bin/env python3
"""Micro-benchmarks behind some choices in docs/performance.md.

    .venv/bin/python loadtest/microbench.py [--n 50000]

Each figure is microseconds per operation, the best of three runs of ``--n``
operations, on this machine, in this process:

* WebSocket framing: receiving one small masked client frame, and building
  one server frame, with wsproto (what trio-websocket drives) and with
  chatd.net.websocket;
* a trio cancel scope around an await, against the bare await (a scope per
  socket read is what chatd's reader used to pay);
* JSON: one server frame encoded and one client frame parsed, with the
  standard library and with orjson.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatd.net import websocket as wsp

ACK = json.dumps({"type": "ack", "ids": ["01HZZZZZZZZZZZZZZZZZZZZZZZ"]})
MESSAGE = {
    "type": "message",
    "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
    "conversation": "dm:alice:bob",
    "seq": 123,
    "from": "alice",
    "body": "the quick brown fox jumps over the lazy dog",
    "ts": 1_700_000_000_000,
}


def best(n: int, fn: Callable[[], None]) -> float:
    """µs per operation: the best of three runs of ``fn`` (which does n)."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return min(runs)


def framing(n: int) -> dict[str, float]:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/ws")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    frame = client.send(TextMessage(data=ACK))
    reader = wsp.FrameReader(70_000)
    payload = ACK.encode()

    def wsproto_receive() -> None:
        for _ in range(n):
            server.receive_data(frame)
            for _event in server.events():
                pass

    def own_receive() -> None:
        for _ in range(n):
            reader.feed(frame)

    def wsproto_send() -> None:
        for _ in range(n):
            server.send(TextMessage(data=ACK))

    def own_send() -> None:
        for _ in range(n):
            wsp.text_frame(payload)

    return {
        "receive: wsproto": best(n, wsproto_receive),
        "receive: chatd.net.websocket": best(n, own_receive),
        "send: wsproto": best(n, wsproto_send),
        "send: chatd.net.websocket": best(n, own_send),
    }


def cancel_scopes(n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    async def bare() -> None:
        for _ in range(n):
            await trio.lowlevel.checkpoint()

    async def scoped() -> None:
        for _ in range(n):
            with trio.CancelScope(deadline=math.inf):
                await trio.lowlevel.checkpoint()

    out["await (a scheduler step)"] = best(n, lambda: trio.run(bare))
    out["await inside a new cancel scope"] = best(n, lambda: trio.run(scoped))
    return out


def json_codecs(n: int) -> dict[str, float]:
    def std_encode() -> None:
        for _ in range(n):
            json.dumps(MESSAGE, separators=(",", ":"), ensure_ascii=False).encode()

    def orjson_encode() -> None:
        for _ in range(n):
            orjson.dumps(MESSAGE)

    def std_parse() -> None:
        for _ in range(n):
            json.loads(ACK)

    def orjson_parse() -> None:
        for _ in range(n):
            orjson.loads(ACK)

    return {
        "encode a frame: json": best(n, std_encode),
        "encode a frame: orjson": best(n, orjson_encode),
        "parse a frame: json": best(n, std_parse),
        "parse a frame: orjson": best(n, orjson_parse),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    args = parser.parse_args()
    print("| operation | µs |\n|---|---:|")
    for part in (framing, cancel_scopes, json_codecs):
        for name, us in part(args.n).items():
            print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
