"""The embedded broker: presence and owed queues in this process's memory.

For one ``chatd`` process. Routing hands items straight to the node's
``deliver`` callback, so a routed item reaches local connections before
:meth:`route` returns. Everything here dies with the process; the store
re-supplies what was owed (see the Store port's guarantees).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import trio

from chatd.core.model import Presence
from chatd.ports import Deliver, Inbound, Owed, Resync, Routed

DEFAULT_QUEUE_LIMIT = 10_000


class MemoryBroker:
    def __init__(self, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        self.queue_limit = queue_limit
        self._owed: dict[str, OrderedDict[str, str]] = {}
        self._conns: dict[str, dict[str, str]] = {}  # user -> {conn: node}
        self._last_seen: dict[str, int] = {}
        self._nodes: dict[str, Deliver] = {}

    async def run(
        self,
        node: str,
        deliver: Deliver,
        resync: Resync,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Delivery never breaks inside one process: ``resync`` is never called.
        if node in self._nodes:
            raise RuntimeError(f"node '{node}' is already running on this broker")
        self._nodes[node] = deliver
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            del self._nodes[node]

    async def route(self, items: Sequence[Routed]) -> None:
        for item in items:
            if item.owed:
                queue = self._owed.setdefault(item.user, OrderedDict())
                if item.key not in queue:
                    queue[item.key] = item.payload
                    while len(queue) > self.queue_limit:
                        queue.popitem(last=False)
            nodes = set(self._conns.get(item.user, {}).values())
            for node in nodes:
                deliver = self._nodes.get(node)
                if deliver is not None:
                    deliver(Inbound(item.user, item.key, item.payload, item.owed, item.exclude))
        await trio.lowlevel.checkpoint()

    async def owed(self, user: str) -> list[Owed]:
        await trio.lowlevel.checkpoint()
        return [Owed(k, p) for k, p in self._owed.get(user, {}).items()]

    async def settle(self, user: str, keys: Sequence[str]) -> None:
        queue = self._owed.get(user)
        if queue is not None:
            for key in keys:
                queue.pop(key, None)
            if not queue:
                del self._owed[user]
        await trio.lowlevel.checkpoint()

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

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]:
        await trio.lowlevel.checkpoint()
        out = {}
        for user in users:
            nodes = tuple(sorted(set(self._conns.get(user, {}).values())))
            out[user] = Presence(
                online=bool(nodes), nodes=nodes, last_seen=self._last_seen.get(user)
            )
        return out

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
