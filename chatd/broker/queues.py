"""Owed queues and routing on Redis: route, fan-out, queued, settle.

Owns each user's owed queue (``q``: key → payload, ``qo``: key → arrival
time in µs; names from :mod:`chatd.broker.keys`), the ROUTE script that
queues and publishes in one step, the local hand-off to this node's
connections, and the admin calls ``queues``, ``enqueue`` and ``purge``
(scripts ROUTE, QUEUED, SETTLE, ENQUEUE, PURGE).

Guarantees (docs/redis.md, *The scripts*):

* An owed item is never delivered live without being queued: ROUTE queues
  and publishes in one atomic script; ``route`` hands items to this node's
  own connections itself, without a round trip, and only after the script.
* An item routed twice keeps its first payload and place; the queue keeps
  the arrival order, at most ``queue_limit`` entries (oldest dropped; the
  store re-supplies them) and expires ``queue_ttl`` after its last write.
* Entries leave only through ``settle`` (and trimming, and ``purge``);
  reading them (``queued``) removes nothing.
* ``route`` costs one round trip per server for the whole batch; the
  ``_nowait`` forms never raise (see :meth:`chatd.broker.link.Link.fire`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from chatd.broker import resp
from chatd.broker.keys import Keys
from chatd.broker.link import Link
from chatd.broker.local import Local
from chatd.broker.scripts import SCRIPTS, Call
from chatd.ports import Deliver, QueueEntry, QueueInfo, Routed

log = logging.getLogger("chatd.broker.redis")


def arrival_ms(score: Any) -> int | None:
    """A queue score as milliseconds since the epoch; None for the small
    arrival numbers that queues written by an older chatd hold."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return int(value // 1000) if value >= 1e14 else None


class Queues:
    """The owed queues and routing for one broker instance."""

    def __init__(
        self,
        link: Link,
        keys: Keys,
        local: Local,
        *,
        queue_limit: int,
        queue_ttl: int,
        chunk: int,
    ) -> None:
        self.link = link
        self.keys = keys
        self.local = local
        self.queue_limit = queue_limit
        self.queue_ttl = queue_ttl
        #: Users per round trip for ``queues``.
        self.chunk = chunk

    def _queue(self, user: str) -> list[str]:
        return [self.keys.user_key(user, "q"), self.keys.user_key(user, "qo")]

    # -- routing -----------------------------------------------------------------------------

    async def route(self, items: Sequence[Routed]) -> None:
        await self.link.ready()  # sharded pub/sub or not: the server says
        calls = self.route_calls(items)
        if calls:
            await self.link.scripts("route", calls)
            self.deliver_locally(items)

    def route_nowait(self, items: Sequence[Routed]) -> None:
        calls = self.route_calls(items)
        if calls:
            self.link.fire("route", calls)
            self.deliver_locally(items)

    def route_calls(self, items: Sequence[Routed]) -> list[Call]:
        """One ROUTE script per user of ``items``."""
        by_user: dict[str, list[resp.Arg]] = {}
        publish = self.link.publish()
        for item in items:
            args = by_user.get(item.user)
            if args is None:
                args = by_user[item.user] = [
                    self.keys.user_channel(item.user),
                    self.queue_limit,
                    self.queue_ttl,
                    item.user,
                    self.local.skip,
                    publish,
                ]
            args += [item.key, item.payload, "1" if item.queued else "0", item.exclude or ""]
        return [
            (
                SCRIPTS["route"],
                [
                    self.keys.user_key(u, "conns"),
                    self.keys.user_key(u, "q"),
                    self.keys.user_key(u, "qo"),
                ],
                args,
            )
            for u, args in by_user.items()
        ]

    def deliver_locally(self, items: Sequence[Routed]) -> None:
        """Connections of these users on this node get the items at once; the
        scripts publish them only to the other nodes."""
        local: list[tuple[Deliver, Routed]] = []
        for item in items:
            for inc in set(self.local.by_user.get(item.user, {}).values()):
                node = self.local.nodes.get(inc)
                if node is not None:
                    local.append((node[0], item))
        for deliver, item in local:
            try:
                deliver(item)
            except Exception:
                log.exception("deliver failed", extra={"user": item.user, "key": item.key})

    # -- the owed queue ----------------------------------------------------------------------

    async def queued(self, user: str) -> list[QueueEntry]:
        [flat] = await self.link.scripts("queued", [(SCRIPTS["queued"], self._queue(user), [])])
        return [
            QueueEntry(str(flat[i]), str(flat[i + 1]), arrival_ms(flat[i + 2]))
            for i in range(0, len(flat) - 2, 3)
        ]

    async def settle(self, user: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        await self.link.scripts("settle", [(SCRIPTS["settle"], self._queue(user), list(keys))])

    def settle_nowait(self, user: str, keys: Sequence[str]) -> None:
        if keys:
            self.link.fire("settle", [(SCRIPTS["settle"], self._queue(user), list(keys))])

    # -- administration ----------------------------------------------------------------------

    async def queues(self) -> list[QueueInfo]:
        users = [
            u
            for k in await self.link.scan("queues", self.keys.user_pattern("qo"))
            if (u := self.keys.user_of(k, "qo")) is not None
        ]
        out: list[QueueInfo] = []
        for start in range(0, len(users), self.chunk):
            chunk = users[start : start + self.chunk]

            commands: list[resp.Command] = []
            for user in chunk:
                key = self.keys.user_key(user, "qo")
                commands.append(("ZCARD", key))
                commands.append(("ZRANGE", key, 0, 0, "WITHSCORES"))
            replies = await self.link.commands("queues", commands)
            for i, user in enumerate(chunk):
                count, first = int(replies[2 * i]), replies[2 * i + 1]
                if count:
                    oldest = arrival_ms(first[1]) if first else None
                    out.append(QueueInfo(user, count, oldest))
        return out

    async def enqueue(self, user: str, items: Sequence[QueueEntry]) -> int:
        if not items:
            return 0
        args: list[resp.Arg] = [self.queue_limit, self.queue_ttl]
        for item in items:
            args += [item.key, item.payload]
        call: Call = (SCRIPTS["enqueue"], self._queue(user), args)
        [added] = await self.link.scripts("enqueue", [call])
        return int(added)

    async def purge(self, user: str) -> int:
        call: Call = (SCRIPTS["purge"], self._queue(user), [])
        [count] = await self.link.scripts("purge", [call])
        return int(count)
