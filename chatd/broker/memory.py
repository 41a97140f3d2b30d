"""The embedded broker: presence and owed queues in this process's memory.

For one ``chatd`` process. Routing hands items straight to the node's
``deliver`` callback, so a routed item reaches local connections before
:meth:`route` returns. Everything here dies with the process; the store
re-supplies what was owed (see the Store port's guarantees).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import trio

from chatd.core.model import Presence
from chatd.core.ratelimit import fill_and_take
from chatd.ports import (
    Broker,
    Deliver,
    Gone,
    NodeInfo,
    QueueEntry,
    QueueInfo,
    Resync,
    Rotation,
    Routed,
    Taken,
)

log = logging.getLogger("chatd.broker.memory")

DEFAULT_QUEUE_LIMIT = 10_000


class MemoryBroker:
    def __init__(self, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        self.queue_limit = queue_limit
        # user -> {key: (payload, queued at ms)}, oldest first
        self._owed: dict[str, OrderedDict[str, tuple[str, int]]] = {}
        self._conns: dict[str, dict[str, str]] = {}  # user -> {conn: node}
        self._last_seen: dict[str, int] = {}
        self._nodes: dict[str, Deliver] = {}
        self._started: dict[str, int] = {}
        self._revoked: dict[str, int] = {}  # token id -> until (ms)
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, at s)
        #: refresh family -> (user, digest, access token id, until ms)
        self._families: dict[str, tuple[str, str, str, int]] = {}

    async def run(
        self,
        node: str,
        deliver: Deliver,
        resync: Resync,
        *,
        gone: Gone | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Delivery never breaks inside one process, and no other node can die
        # with connections here: ``resync`` and ``gone`` are never called.
        if node in self._nodes:
            raise RuntimeError(f"node '{node}' is already running on this broker")
        self._nodes[node] = deliver
        self._started[node] = _now_ms()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            del self._nodes[node]
            del self._started[node]

    def _queue(self, user: str, key: str, payload: str, now: int) -> bool:
        queue = self._owed.setdefault(user, OrderedDict())
        if key in queue:
            return False
        queue[key] = (payload, now)
        while len(queue) > self.queue_limit:
            queue.popitem(last=False)
        return True

    async def route(self, items: Sequence[Routed]) -> None:
        self.route_nowait(items)
        await trio.lowlevel.checkpoint()

    def route_nowait(self, items: Sequence[Routed]) -> None:
        now = _now_ms()
        for item in items:
            if item.queued:
                self._queue(item.user, item.key, item.payload, now)
            nodes = set(self._conns.get(item.user, {}).values())
            for node in nodes:
                deliver = self._nodes.get(node)
                if deliver is None:
                    continue
                try:
                    deliver(item)
                except Exception:
                    log.exception("deliver failed", extra={"user": item.user, "key": item.key})

    async def queued(self, user: str) -> list[QueueEntry]:
        await trio.lowlevel.checkpoint()
        return [QueueEntry(k, p, ts) for k, (p, ts) in self._owed.get(user, {}).items()]

    async def settle(self, user: str, keys: Sequence[str]) -> None:
        self.settle_nowait(user, keys)
        await trio.lowlevel.checkpoint()

    def settle_nowait(self, user: str, keys: Sequence[str]) -> None:
        queue = self._owed.get(user)
        if queue is not None:
            for key in keys:
                queue.pop(key, None)
            if not queue:
                del self._owed[user]

    async def attach(self, user: str, node: str, conn: str) -> bool:
        conns = self._conns.setdefault(user, {})
        first = not conns
        conns[conn] = node
        await trio.lowlevel.checkpoint()
        return first

    async def detach(self, user: str, node: str, conn: str, ts: int) -> bool:
        conns = self._conns.get(user)
        last = False
        if conns is not None and conns.pop(conn, None) is not None and not conns:
            del self._conns[user]
            self._last_seen[user] = ts
            last = True
        await trio.lowlevel.checkpoint()
        return last

    async def devices(self, user: str) -> int:
        await trio.lowlevel.checkpoint()
        return len(self._conns.get(user, {}))

    async def revoke(self, token_id: str, until_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        now = _now_ms()
        for old in [t for t, until in self._revoked.items() if until <= now]:
            del self._revoked[old]
        if until_ms > now:
            self._revoked[token_id] = until_ms

    async def refresh_begin(
        self, family: str, user: str, digest: str, token_id: str, until_ms: int
    ) -> None:
        await trio.lowlevel.checkpoint()
        now = _now_ms()
        for old in [f for f, v in self._families.items() if v[3] <= now]:
            del self._families[old]
        self._families[family] = (user, digest, token_id, until_ms)

    async def refresh_rotate(
        self, family: str, digest: str, new_digest: str, new_token_id: str, until_ms: int
    ) -> Rotation:
        await trio.lowlevel.checkpoint()
        found = self._families.get(family)
        if found is None or found[3] <= _now_ms():
            self._families.pop(family, None)
            return Rotation("unknown")
        user, current, token_id, _ = found
        if current != digest:
            del self._families[family]
            return Rotation("reused", user, token_id)
        self._families[family] = (user, new_digest, new_token_id, until_ms)
        return Rotation("rotated", user, token_id)

    async def refresh_end(self, family: str) -> None:
        await trio.lowlevel.checkpoint()
        self._families.pop(family, None)

    async def take(self, bucket: str, want: int, rate: float, burst: int) -> Taken:
        await trio.lowlevel.checkpoint()
        if rate <= 0:
            return Taken(want, 0.0)
        now = time.monotonic()
        if len(self._buckets) > 100_000:  # full buckets need no memory: forget them
            self._buckets = {
                k: (t, at) for k, (t, at) in self._buckets.items() if t + (now - at) * rate < burst
            }
        tokens, at = self._buckets.get(bucket, (float(burst), now))
        tokens, granted, wait = fill_and_take(tokens, now - at, want, rate, burst)
        self._buckets[bucket] = (tokens, now)
        return Taken(granted, wait)

    async def is_revoked(self, token_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        return self._revoked.get(token_id, 0) > _now_ms()

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]:
        await trio.lowlevel.checkpoint()
        out = {}
        for user in users:
            nodes = tuple(sorted(set(self._conns.get(user, {}).values())))
            out[user] = Presence(
                online=bool(nodes), nodes=nodes, last_seen=self._last_seen.get(user)
            )
        return out

    # -- administration ----------------------------------------------------------

    async def queues(self) -> list[QueueInfo]:
        await trio.lowlevel.checkpoint()
        return [
            QueueInfo(user, len(q), next(iter(q.values()))[1])
            for user, q in sorted(self._owed.items())
            if q
        ]

    async def enqueue(self, user: str, items: Sequence[QueueEntry]) -> int:
        now = _now_ms()
        added = sum(self._queue(user, o.key, o.payload, now) for o in items)
        if not self._owed.get(user):
            self._owed.pop(user, None)
        await trio.lowlevel.checkpoint()
        return added

    async def purge(self, user: str) -> int:
        await trio.lowlevel.checkpoint()
        return len(self._owed.pop(user, {}))

    async def nodes(self) -> list[NodeInfo]:
        await trio.lowlevel.checkpoint()
        out = []
        for node in sorted(self._nodes):
            users = [u for u, conns in self._conns.items() if node in conns.values()]
            count = sum(list(c.values()).count(node) for c in self._conns.values())
            out.append(NodeInfo(node, node, count, len(users), 0, self._started.get(node)))
        return out

    async def online_users(self) -> dict[str, Presence]:
        return await self.presence(sorted(self._conns))

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> MemoryBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: Checked by the type checker (``make lint``): the class satisfies the port.
_IS_A_BROKER: type[Broker] = MemoryBroker
