"""Fault injection under traffic, shared by the end-to-end tests: users
chatting in pairs through NGINX while something breaks, then the zero-loss
accounting (:class:`~harness.loss.LossChecker`)."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from harness.client import Api
from harness.cluster import Cluster
from harness.loss import LossChecker
from harness.resilient import ResilientClient


@dataclass
class FaultFigures:
    """What a fault did to the traffic: messages in flight when it began
    (sends not yet confirmed, and confirmed ones not yet delivered), the
    longest time after it began during which no message reached anyone, how
    many clients reconnected, and how many deliveries were lost."""

    unconfirmed: int
    undelivered: int
    longest_stall_s: float
    reconnected: int
    lost: int

    def __str__(self) -> str:
        return (
            f"in flight at the fault: {self.unconfirmed} unconfirmed sends,"
            f" {self.undelivered} confirmed but undelivered; longest stall after it:"
            f" {self.longest_stall_s:.2f} s; clients reconnected: {self.reconnected};"
            f" lost: {self.lost}"
        )


class Traffic:
    """Users chatting in pairs through NGINX until stopped."""

    def __init__(self, url: str, users: list[tuple[str, str]], checker: LossChecker) -> None:
        self.clients = [ResilientClient(url, u, t, checker) for u, t in users]
        self.checker = checker
        self.sending = True
        #: Measured around the fault by run_with_fault (see FaultFigures).
        self.figures: FaultFigures | None = None

    async def run(self, nursery: trio.Nursery) -> None:
        for c in self.clients:
            await nursery.start(c.run)
        for i, c in enumerate(self.clients):
            nursery.start_soon(self._chat, c, self.clients[(i + 1) % len(self.clients)].user, i)

    async def _chat(self, client: ResilientClient, peer: str, seed: int) -> None:
        rnd = random.Random(seed)
        n = 0
        while self.sending:
            n += 1
            await client.send(f"{client.user} #{n}", [peer], to=peer)
            await trio.sleep(rnd.uniform(0.02, 0.08))

    async def finish(self, timeout: float = 30.0) -> None:
        """Stop sending, wait until everything sent is confirmed and delivered."""
        self.sending = False
        for c in self.clients:
            await c.wait_all_sent(timeout)
        with trio.move_on_after(timeout):
            while self.checker.report().missing:  # noqa: ASYNC110 - polls other tasks' bookkeeping
                await trio.sleep(0.1)


async def run_with_fault(
    tmp_path: Path,
    names: Callable[[str], str],
    fault: Callable[[Cluster], Awaitable[None]],
    replicas: int = 3,
    pairs: int = 4,
    redis_url: str = "",
) -> Traffic:
    """Users chatting in pairs through NGINX across ``replicas`` chatd
    replicas while ``fault(cluster)`` runs; then every message that got
    ``sent`` must have reached its recipient (the zero-loss checker), nothing
    unexpected arrived, and no send was refused. ``redis_url``: a Redis of
    the caller's (a cluster, sentinels) instead of one started here."""
    cluster = Cluster(tmp_path, replicas=replicas, redis_url=redis_url).start()
    checker = LossChecker()
    api = Api(cluster.url)
    try:
        users = [names("f") for _ in range(pairs * 2)]
        creds = [(u, await api.user(u)) for u in users]
        traffic = Traffic(cluster.ws_url, creds, checker)
        async with trio.open_nursery() as nursery:
            await traffic.run(nursery)
            await trio.sleep(1.0)
            began = time.monotonic()
            unconfirmed = sum(len(c.pending) for c in traffic.clients)
            undelivered = checker.undelivered_at(began)
            await fault(cluster)
            await trio.sleep(1.5)
            await traffic.finish()
            nursery.cancel_scope.cancel()
        report = checker.report()
        traffic.figures = FaultFigures(
            unconfirmed,
            undelivered,
            checker.longest_stall_after(began),
            sum(1 for c in traffic.clients if c.connections > 1),
            len(report.missing),
        )
        print(report.summary(), [c.connections for c in traffic.clients])
        print(traffic.figures)
        assert report.sent > 50, report.summary()
        assert report.ok, f"{report.summary()}; missing {report.missing[:10]}\n{cluster.logs()}"
        # Nothing reached a user it was not sent to; repeats are repeated ids
        # of what was sent (bounded: at most one redelivery each here).
        assert report.unexpected == 0, report.summary()
        assert report.duplicates <= report.sent, report.summary()
        assert not [e for c in traffic.clients for e in c.errors], "no send was refused"
        return traffic
    finally:
        await api.aclose()
        cluster.close()
