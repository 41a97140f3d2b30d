"""The Redis broker: presence, owed queues and fan-out shared by many nodes.

Owns :class:`RedisBroker`, the :class:`chatd.ports.Broker` on Redis: its
tuning, its lifetime (``async with``, :meth:`RedisBroker.aclose`) and
:meth:`RedisBroker.run`, which keeps one node's live delivery, heartbeat
and resyncs going. The work is done in rooms of its own:

==================================  ==============================================
:mod:`chatd.broker.keys`            every key and channel name
:mod:`chatd.broker.scripts`         the Lua scripts, loaded from ``lua/*.lua``
:mod:`chatd.broker.link`            topology, connections, awaited calls and calls
                                    sent without waiting (redirections, NOSCRIPT,
                                    resync after a loss)
:mod:`chatd.broker.presence`        attach/detach/presence, heartbeats, re-assert,
                                    dead nodes
:mod:`chatd.broker.queues`          owed queues, route and fan-out, settle
:mod:`chatd.broker.subscriptions`   a node's channels (live delivery)
:mod:`chatd.broker.tokens`          revoked tokens, refresh families, rate buckets
:mod:`chatd.broker.local`           what this instance holds in memory
==================================  ==============================================

docs/redis.md has the key layout, the scripts' logic, the modes, the outage
behaviour and the client measurements; in short:

* **Incarnations.** Each broker instance draws a random token; a node it
  serves is known to Redis as the *incarnation* ``<node>#<token>``. A node
  restarted under the same name is a new incarnation, so the connections of
  the one that died are never mistaken for live ones.
* **Presence.** ``chatd:{u:<user>}:conns`` maps a user's connection ids to
  incarnations. An incarnation is alive while its heartbeat key
  ``chatd:hb:<incarnation>`` exists (TTL ``presence_ttl``, refreshed by
  :meth:`RedisBroker.run` every ``heartbeat_interval``). Reads ignore the
  connections of dead incarnations and remove them, so a node that was
  killed leaves presence within ``presence_ttl`` seconds. The broker keeps
  the connections attached through it and writes them again whenever Redis
  lost them (a restart without persistence, FLUSHALL, an expired
  heartbeat), and every ``reassert_interval`` for good measure.
* **Owed queue.** ``chatd:{u:<user>}:q`` (hash key → payload) and
  ``chatd:{u:<user>}:qo`` (sorted set key → arrival time, µs). Entries leave
  only through :meth:`RedisBroker.settle`; the queue keeps at most
  ``queue_limit`` entries per user (the oldest go first; the store
  re-supplies them) and expires ``queue_ttl`` seconds after its last write.
* **Routing.** :meth:`RedisBroker.route` runs one Lua script per user,
  all sent as one batch (one round trip per shard). The script queues the
  owed items and SPUBLISHes the user's items once to the channel
  ``chatd:{u:<user>}:n:<incarnation>`` of each incarnation holding a
  connection of the user: in the user's slot, so on a cluster it stays on
  the user's shard. :meth:`RedisBroker.run` subscribes, on the right
  shard, to the channel of each user with a connection on its node
  (PUBLISH/SUBSCRIBE where Redis has no sharded pub/sub).
* **Dead nodes.** Each heartbeat also looks for incarnations whose
  heartbeat expired; one survivor claims each and calls ``gone`` for its
  users who are online nowhere else.
* **Outage.** Every method but :meth:`RedisBroker.run` raises
  :class:`~chatd.core.errors.Unavailable` within ``op_timeout`` seconds
  (at once when the server refuses connections). :meth:`RedisBroker.run`
  keeps retrying with capped exponential backoff; once subscribed again it
  re-asserts the heartbeat and the connections, then calls ``resync``.

The client is chatd's own (:mod:`chatd.broker.resp`): one pipelined
connection for commands per server, one for subscriptions. Every command submitted
during a scheduler pass goes out in one write, so all the broker work of a
pass costs one round trip. The connections' tasks run in the broker's
nursery: use the broker as ``async with RedisBroker.from_url(url) as b``
(or pass ``nursery=``). Items for a user with a connection on this node
are handed to it at once, not through Redis. No third-party Redis client is
used, so nothing here patches one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import trio

from chatd.broker import topology
from chatd.broker.delivery import Runner
from chatd.broker.keys import Keys, incarnation_of, node_of
from chatd.broker.link import REDIRECT_LIMIT, UNSENT_LIMIT, Link
from chatd.broker.local import Local
from chatd.broker.presence import PresenceTracker
from chatd.broker.queues import Queues
from chatd.broker.scripts import NAMES, ROUTE_SCRIPT, SCRIPTS, Call
from chatd.broker.tokens import Tokens
from chatd.broker.topology import Mode, Topology
from chatd.core.model import Presence
from chatd.ports import (
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

__all__ = [
    "ATTACH",
    "DAY",
    "DEFAULTS",
    "DETACH",
    "ENQUEUE",
    "PRUNE",
    "PURGE",
    "QUEUED",
    "REDIRECT_LIMIT",
    "ROTATE",
    "ROUTE",
    "ROUTE_SCRIPT",
    "SCRIPTS",
    "SETTLE",
    "TAKE",
    "UNSENT_LIMIT",
    "RedisBroker",
    "node_of",
]

log = logging.getLogger("chatd.broker.redis")

DAY = 86_400

#: Tuning defaults (seconds unless stated); every one is a keyword of
#: :meth:`RedisBroker.from_url`.
DEFAULTS: dict[str, Any] = {
    "prefix": "chatd",
    "queue_limit": 10_000,  # entries per user
    "queue_ttl": 30 * DAY,  # refreshed on every write to the queue
    "last_seen_ttl": 30 * DAY,
    "presence_ttl": 10.0,  # heartbeat key lifetime: how long a dead node lingers
    "heartbeat_interval": 3.0,
    "conns_ttl": DAY,  # a user's connection hash, refreshed by attach and re-assert
    "reassert_interval": 600.0,  # re-write this node's connections even if nothing was lost
    "op_timeout": 2.0,  # hard ceiling per call; the socket timeouts below come first
    "connect_timeout": 0.5,
    "backoff_min": 0.1,
    "backoff_max": 5.0,
    "tombstone_limit": 100_000,  # failed detaches kept for retry
    "reassert_chunk": 500,  # users per round trip when re-asserting
}

#: The scripts' sources, under their names of before chatd/broker/lua/.
ROUTE, QUEUED, ENQUEUE, PURGE, SETTLE, ATTACH, DETACH, PRUNE, TAKE, ROTATE = (
    SCRIPTS[name].source for name in NAMES
)


class RedisBroker:
    """The :class:`chatd.ports.Broker` on Redis; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        mode: str = "auto",
        nursery: trio.Nursery | None = None,
        **tuning: Any,
    ) -> None:
        unknown = set(tuning) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown RedisBroker tuning: {', '.join(sorted(unknown))}")
        opts = {**DEFAULTS, **tuning}
        self.url = url
        self.mode = Mode(mode)
        self.target = topology.parse_url(url)  # raises ValueError for a bad URL
        self.prefix: str = opts["prefix"]
        self.queue_limit = int(opts["queue_limit"])
        self.queue_ttl = max(1, int(opts["queue_ttl"]))
        self.last_seen_ttl = max(1, int(opts["last_seen_ttl"]))
        self.presence_ttl = float(opts["presence_ttl"])
        self.heartbeat_interval = float(opts["heartbeat_interval"])
        self.conns_ttl = max(1, int(opts["conns_ttl"]))
        self.reassert_interval = float(opts["reassert_interval"])
        self.op_timeout = float(opts["op_timeout"])
        self.connect_timeout = float(opts["connect_timeout"])
        self.backoff_min = float(opts["backoff_min"])
        self.backoff_max = float(opts["backoff_max"])
        self.tombstone_limit = int(opts["tombstone_limit"])
        self.reassert_chunk = max(1, int(opts["reassert_chunk"]))
        if self.heartbeat_interval >= self.presence_ttl:
            raise ValueError("heartbeat_interval must be shorter than presence_ttl")
        if self.op_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("need op_timeout > 0 and connect_timeout > 0")

        #: This instance's token: its nodes are the incarnations ``<node>#<token>``.
        self.token = secrets.token_hex(8)
        self._nursery_manager: Any = None
        self._local = Local()
        self._keys = Keys(self.prefix)
        self._link = Link(
            url,
            self.mode,
            self.token,
            op_timeout=self.op_timeout,
            connect_timeout=self.connect_timeout,
            backoff_min=self.backoff_min,
            backoff_max=self.backoff_max,
            resync_all=self._local.resync_all,
        )
        #: Where the connections' tasks run: given, or opened by ``async with``.
        self._link.nursery = nursery
        self._presence = PresenceTracker(
            self._link,
            self._keys,
            self._local,
            token=self.token,
            presence_ttl=self.presence_ttl,
            heartbeat_interval=self.heartbeat_interval,
            conns_ttl=self.conns_ttl,
            last_seen_ttl=self.last_seen_ttl,
            reassert_interval=self.reassert_interval,
            reassert_chunk=self.reassert_chunk,
            tombstone_limit=self.tombstone_limit,
        )
        self._queues = Queues(
            self._link,
            self._keys,
            self._local,
            queue_limit=self.queue_limit,
            queue_ttl=self.queue_ttl,
            chunk=self.reassert_chunk,
        )
        self._tokens = Tokens(self._link, self._keys)
        self._runner = Runner(
            self._link,
            self._keys,
            self._local,
            self._presence,
            heartbeat_interval=self.heartbeat_interval,
            backoff_min=self.backoff_min,
            backoff_max=self.backoff_max,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        mode: str = "auto",
        nursery: trio.Nursery | None = None,
        **tuning: Any,
    ) -> RedisBroker:
        """A broker on the Redis at ``url``: ``redis://``, ``rediss://`` or
        ``unix://`` for one server or any node of a cluster,
        ``redis+sentinel://`` for Sentinel (see :mod:`chatd.broker.topology`).
        ``mode`` is one of :class:`~chatd.broker.topology.Mode` (``auto``:
        a sentinel URL means Sentinel, otherwise ask the server whether it is
        a cluster node). ``tuning`` overrides :data:`DEFAULTS`. Its
        connections run in ``nursery``, or in its own once entered with
        ``async with``. Raises ValueError for a malformed URL or mode."""
        return cls(url, mode=mode, nursery=nursery, **tuning)

    async def __aenter__(self) -> RedisBroker:
        if self._link.nursery is None:
            self._nursery_manager = trio.open_nursery()
            self._link.nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        await self.aclose()
        manager, self._nursery_manager = self._nursery_manager, None
        if manager is None:
            return None
        try:
            return await manager.__aexit__(*exc)  # type: ignore[no-any-return]
        except BaseExceptionGroup as group:
            # The connections' tasks end quietly: a group holding only what
            # the block raised is that exception, which goes on unwrapped.
            if exc[1] is not None and all(e is exc[1] for e in group.exceptions):
                return False
            raise

    # -- names (chatd.broker.keys) -------------------------------------------------------------

    def incarnation(self, node: str) -> str:
        return incarnation_of(node, self.token)

    def user_key(self, user: str, kind: str) -> str:
        return self._keys.user_key(user, kind)

    def user_channel(self, user: str, incarnation: str = "") -> str:
        return self._keys.user_channel(user, incarnation)

    def heartbeat_key(self, incarnation: str) -> str:
        return self._keys.heartbeat_key(incarnation)

    def incarnations_key(self) -> str:
        return self._keys.incarnations_key()

    def users_key(self, incarnation: str) -> str:
        return self._keys.users_key(incarnation)

    # -- where commands go (chatd.broker.link) -------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        """Where commands go, once known (see :mod:`chatd.broker.topology`)."""
        return self._link.topology

    @property
    def sharded(self) -> bool:
        """SPUBLISH/SSUBSCRIBE for live delivery (else PUBLISH/SUBSCRIBE)."""
        return self._link.sharded

    async def describe(self) -> dict[str, Any]:
        """The Redis deployment as this broker sees it (chatctl nodes, stats)."""
        topo = await self._link.ready()
        return {**topo.describe(), "sharded_pubsub": self.sharded}

    async def ping(self) -> None:
        await self._link.ping()

    # -- the owed queue and routing (chatd.broker.queues) --------------------------------------

    async def route(self, items: Sequence[Routed]) -> None:
        await self._queues.route(items)

    def route_nowait(self, items: Sequence[Routed]) -> None:
        self._queues.route_nowait(items)

    def _route_calls(self, items: Sequence[Routed]) -> list[Call]:
        """One ROUTE script per user (loadtest/redis_client_bench.py uses it)."""
        return self._queues.route_calls(items)

    async def queued(self, user: str) -> list[QueueEntry]:
        return await self._queues.queued(user)

    async def settle(self, user: str, keys: Sequence[str]) -> None:
        await self._queues.settle(user, keys)

    def settle_nowait(self, user: str, keys: Sequence[str]) -> None:
        self._queues.settle_nowait(user, keys)

    async def queues(self) -> list[QueueInfo]:
        return await self._queues.queues()

    async def enqueue(self, user: str, items: Sequence[QueueEntry]) -> int:
        return await self._queues.enqueue(user, items)

    async def purge(self, user: str) -> int:
        return await self._queues.purge(user)

    # -- presence (chatd.broker.presence) ------------------------------------------------------

    async def attach(self, user: str, node: str, conn: str) -> bool:
        return await self._presence.attach(user, node, conn)

    async def detach(self, user: str, node: str, conn: str, ts: int) -> bool:
        return await self._presence.detach(user, node, conn, ts)

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]:
        return await self._presence.presence(users)

    async def devices(self, user: str) -> int:
        return await self._presence.devices(user)

    async def nodes(self) -> list[NodeInfo]:
        return await self._presence.nodes()

    async def online_users(self) -> dict[str, Presence]:
        return await self._presence.online_users()

    # -- tokens and rates (chatd.broker.tokens) ------------------------------------------------

    async def revoke(self, token_id: str, until_ms: int) -> None:
        await self._tokens.revoke(token_id, until_ms)

    async def is_revoked(self, token_id: str) -> bool:
        return await self._tokens.is_revoked(token_id)

    async def refresh_begin(
        self, family: str, user: str, digest: str, token_id: str, until_ms: int
    ) -> None:
        await self._tokens.refresh_begin(family, user, digest, token_id, until_ms)

    async def refresh_rotate(
        self, family: str, digest: str, new_digest: str, new_token_id: str, until_ms: int
    ) -> Rotation:
        return await self._tokens.refresh_rotate(family, digest, new_digest, new_token_id, until_ms)

    async def refresh_end(self, family: str) -> None:
        await self._tokens.refresh_end(family)

    async def take(self, bucket: str, want: int, rate: float, burst: int) -> Taken:
        return await self._tokens.take(bucket, want, rate, burst)

    # -- delivery (chatd.broker.delivery) ------------------------------------------------------

    async def run(
        self,
        node: str,
        deliver: Deliver,
        resync: Resync,
        *,
        gone: Gone | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._runner.run(
            node, self.incarnation(node), deliver, resync, gone=gone, task_status=task_status
        )

    async def aclose(self) -> None:
        self._link.closed = True
        self._runner.cancel_all()
        await self._link.close()
