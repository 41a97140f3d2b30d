"""Does a login storm starve message traffic?

Starts a ``chatd serve`` (SQLite), registers ``--pairs`` pairs of users who
chat at ``--rate`` messages per second in total, and measures delivery
latency (send → the recipient's ``message``) for ``--seconds`` without and
then with a storm of ``--logins`` correct logins per second from many
addresses (each login hashes a password with argon2; ``X-Forwarded-For``
with ``--trusted-proxies 127.0.0.1`` makes them come from a different
address each). The question of issue 14: delivery p99 with the storm
within twice its value without.

Usage::

    python loadtest/login_storm.py [--pairs 20] [--rate 100] [--logins 50]
        [--seconds 15] [--chatd-args "..."] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.client import Api, connect
from harness.procs import ChatdProcess

PASSWORD = "correct horse"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * q))] * 1000, 1)


async def chat(
    ws_url: str, pairs: list[tuple[str, str, str, str]], rate: float, seconds: float
) -> list[float]:
    """Each pair: a sends to b at rate/len(pairs); latencies of b's messages."""
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        for _a_name, a_token, b_name, b_token in pairs:
            nursery.start_soon(
                _pair, ws_url, a_token, b_name, b_token, rate / len(pairs), seconds, latencies
            )
    return latencies


async def _pair(ws_url, a_token, b_name, b_token, rate, seconds, latencies) -> None:
    async with connect(ws_url, "a") as a, connect(ws_url, "b") as b:
        await a.auth(a_token)
        await b.auth(b_token)
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                seen = 0
                while True:
                    frames = b.frames
                    now = time.time()
                    for f in frames[seen:]:
                        if f.get("type") == "message":
                            latencies.append(now - float(f["body"]))
                            await b.ack([f["id"]])
                    seen = len(frames)
                    await trio.sleep(0.002)

            nursery.start_soon(receive)
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                await a.send(f"{time.time():.6f}", to=b_name)
                await trio.sleep(random.expovariate(rate))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()


async def storm(
    http_url: str, users: list[str], per_second: float, seconds: float
) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with (
        httpx.AsyncClient(base_url=http_url, timeout=30) as client,
        trio.open_nursery() as nursery,
    ):

        async def one(i: int) -> None:
            xff = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
            try:
                resp = await client.post(
                    "/api/login",
                    json={"username": users[i % len(users)], "password": PASSWORD},
                    headers={"X-Forwarded-For": xff},
                )
                outcome = str(resp.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            counts[outcome] = counts.get(outcome, 0) + 1

        end = trio.current_time() + seconds
        i = 0
        while trio.current_time() < end:
            nursery.start_soon(one, i)
            i += 1
            await trio.sleep(1 / per_second)
    return counts


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="chatd-storm-"))
    args = ["--log-level", "warning", "--rate", "0", "--trusted-proxies", "127.0.0.1"]
    proc = ChatdProcess(work / "data", args=[*args, *shlex.split(opts.chatd_args)]).start()
    api = Api(proc.http_url)
    try:
        tag = os.urandom(3).hex()
        pairs = []
        for i in range(opts.pairs):
            a, b = f"pa{i}x{tag}", f"pb{i}x{tag}"
            pairs.append((a, await api.user(a, PASSWORD), b, await api.user(b, PASSWORD)))
        stormers = [f"st{i}x{tag}" for i in range(20)]
        for name in stormers:
            assert (await api.register(name, PASSWORD))[0] == 201
        quiet = await chat(proc.ws_url, pairs, opts.rate, opts.seconds)
        results: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            box: dict[str, Any] = {}

            async def storming() -> None:
                box["logins"] = await storm(proc.http_url, stormers, opts.logins, opts.seconds)

            nursery.start_soon(storming)
            stormy = await chat(proc.ws_url, pairs, opts.rate, opts.seconds)
        results = {
            "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
            "chatd_args": opts.chatd_args,
            "pairs": opts.pairs,
            "rate": opts.rate,
            "logins_per_s": opts.logins,
            "seconds": opts.seconds,
            "without_storm": {
                "delivered": len(quiet),
                "p50_ms": percentile(quiet, 0.5),
                "p99_ms": percentile(quiet, 0.99),
            },
            "with_storm": {
                "delivered": len(stormy),
                "p50_ms": percentile(stormy, 0.5),
                "p99_ms": percentile(stormy, 0.99),
            },
            "login_answers": box.get("logins"),
        }
        q, s = results["without_storm"]["p99_ms"], results["with_storm"]["p99_ms"]
        results["p99_ratio"] = round(s / q, 2) if q and s else None
        return results
    finally:
        await api.aclose()
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second, all pairs")
    parser.add_argument("--logins", type=float, default=50.0, help="logins per second in the storm")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--chatd-args", default="")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    report = trio.run(run, opts)
    text = json.dumps(report, indent=2)
    if opts.json:
        opts.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
