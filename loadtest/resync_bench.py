"""Resync storms: how long re-offering everything owed takes, and what it
costs the store, with many connected users.

A resync happens when a node's live delivery from Redis broke (a lost
subscription, Redis losing its data): the node re-reads from the store what
is owed to every local user and offers it again. With 10,000 users that is
10,000 backlogs. This benchmark builds one node in this process — the real
service, a real SQLite store, the real Redis broker on a throwaway
``redis-server`` — with ``--users`` connected users (in-process connections:
no sockets, so only the resync is measured), each owed ``--owed`` messages,
then for each ``--concurrency`` setting calls the node's resync (as after
a lost subscription: each backlog reads the user's Redis queue and the
store's pages) and measures:

* **seconds until every owed item was re-offered** to its connection;
* **store reads**: backlog page reads (``owed_messages``, ``owed_events``, ``owed_receipts``)
  per second, and the most in flight at once (the store's read pool has 4
  connections: more wait in line);
* **event-loop lag** meanwhile (a task that sleeps 5 ms and records how late
  it wakes): what live traffic on the node would feel.

Usage::

    python loadtest/resync_bench.py [--users 10000] [--owed 1]
                                    [--concurrency 1,8,32,256] [--json out.json]

Before this change a node re-read its users one at a time (concurrency 1)
and every node of a deployment started at once; ``--resync-concurrency``
(default 8) and ``--resync-jitter`` (default 1 s: a random pause first, so
nodes that lost Redis together spread out) are the knobs measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatd.auth import Passwords, Tokens
from chatd.broker.redis import RedisBroker
from chatd.core.frames import Send
from chatd.core.model import User
from chatd.core.session import Outbound
from chatd.crypto import Keyring
from chatd.service import ChatService
from chatd.store.sqlite import SqliteStore
from harness.redis_server import RedisServer


class Tally:
    """Connections still waiting for their owed items."""

    def __init__(self) -> None:
        self.waiting = 0
        self.done = trio.Event()


class Conn:
    """An in-process connection: counts what is offered."""

    def __init__(self, conn_id: str, user: str, tally: Tally | None = None) -> None:
        self.id = conn_id
        self.user = user
        self.offered = 0
        self.wanted = 0
        self.tally = tally

    def offer(self, item: Outbound) -> None:
        self.offered += 1
        if self.tally is not None and self.offered == self.wanted:
            self.tally.waiting -= 1
            if self.tally.waiting == 0:
                self.tally.done.set()

    def reply(self, item: Outbound) -> None:
        pass

    def close_soon(self, code: int, reason: str) -> None:
        pass

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass


class CountingStore:
    """The store, with its backlog reads counted (calls, most in flight)."""

    READS = ("owed_messages", "owed_events", "owed_receipts")

    def __init__(self, inner: SqliteStore) -> None:
        self._inner = inner
        self.reads = 0
        self.in_flight = 0
        self.peak = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self.READS:
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                return await attr(*args, **kwargs)
            finally:
                self.in_flight -= 1

        return counted

    def reset(self) -> None:
        self.reads = self.peak = 0


async def lag_probe(samples: list[float], period: float = 0.005) -> None:
    while True:
        start = trio.current_time()
        await trio.sleep(period)
        samples.append(max(0.0, trio.current_time() - start - period))


async def bench(opts: argparse.Namespace) -> dict[str, Any]:
    users = [f"u{i:05d}" for i in range(opts.users)]
    results: list[dict[str, Any]] = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        inner = SqliteStore.open(Path(tmp))
        store = CountingStore(inner)
        async with RedisBroker.from_url(server.url) as broker:
            svc = ChatService(
                store=store,  # type: ignore[arg-type]
                broker=broker,
                keyring=Keyring({"k1": os.urandom(32)}, "k1"),
                tokens=Tokens("x" * 32, 3600),
                passwords=Passwords(),
                node="n1",
                resync_jitter=0.0,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                t = time.perf_counter()
                now = int(time.time() * 1000)
                for user in users:
                    await inner.create_user(User(user, "x", now))
                # Each user is owed --owed messages from the next user.
                senders = [Conn(f"s-{u}", u) for u in users]
                for k in range(opts.owed):
                    for i, sender in enumerate(senders):
                        await svc.send(sender, Send(f"c{k}-{i}", "hi", to=users[i - 1]))
                        if i % 500 == 0:
                            await svc.flush()
                    await svc.flush()
                tally = Tally()
                conns = [Conn(f"c-{u}", u, tally) for u in users]
                for conn in conns:
                    await svc.attach(conn)
                setup = time.perf_counter() - t
                print(f"set-up: {len(users)} users attached, {setup:.1f} s", file=sys.stderr)
                expected = opts.owed
                for concurrency in opts.concurrency:
                    svc.resync_concurrency = concurrency
                    tally.waiting, tally.done = len(conns), trio.Event()
                    for conn in conns:
                        conn.offered, conn.wanted = 0, expected
                    store.reset()
                    lags: list[float] = []
                    async with trio.open_nursery() as probe:
                        probe.start_soon(lag_probe, lags)
                        start = trio.current_time()
                        # What the resync loop runs, awaited here so that the
                        # counts below include every user's last page read.
                        failed = await svc.reoffer(svc.hub.users())
                        took = trio.current_time() - start
                        if failed or not tally.done.is_set():
                            raise SystemExit(f"resync incomplete: {len(failed)} users failed")
                        probe.cancel_scope.cancel()
                    lags.sort()
                    row = {
                        "concurrency": concurrency,
                        "users": len(users),
                        "seconds_to_reoffer_all": round(took, 2),
                        "store_reads": store.reads,
                        "store_reads_per_s": round(store.reads / took),
                        "store_reads_in_flight_max": store.peak,
                        "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 1),
                        "loop_lag_max_ms": round(lags[-1] * 1000, 1),
                    }
                    print(json.dumps(row), file=sys.stderr)
                    results.append(row)
                svc.stop()
                await svc.stopped.wait()
            await inner.aclose()
    return {
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
        "owed_per_user": opts.owed,
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| concurrency | users | s to re-offer all | store reads/s | reads in flight (max) |"
        " loop lag p99 / max (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['concurrency']} | {r['users']:,} | {r['seconds_to_reoffer_all']} |"
            f" {r['store_reads_per_s']:,} | {r['store_reads_in_flight_max']} |"
            f" {r['loop_lag_p99_ms']} / {r['loop_lag_max_ms']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--owed", type=int, default=1, help="owed messages per user")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32, 256],
        help="resync concurrency settings to compare (comma-separated)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    opts = parser.parse_args()
    report = trio.run(bench, opts)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(
        f"\n{report['machine']['nproc']} CPUs, Python {report['machine']['python']};"
        f" load at start {report['machine']['loadavg_at_start'][0]:.2f}; one run per setting"
    )


if __name__ == "__main__":
    main()
