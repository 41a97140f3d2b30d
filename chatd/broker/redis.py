"""The Redis broker: presence, owed queues and fan-out shared by many nodes.

One Redis — a single server, a Redis Cluster, or the master Sentinel names
(:mod:`chatd.broker.topology`) — serves all ``chatd`` processes. Every
script touches one user's hash slot. docs/redis.md has the key layout, the
scripts' logic, the modes, the outage behaviour and the client
measurements; in short:

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
are handed to it at once, not through Redis.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from chatd.broker import resp, topology
from chatd.broker.topology import Mode, Topology, TopologyError
from chatd.core.errors import Unavailable
from chatd.core.model import Presence
from chatd.ports import (
    Deliver,
    Gone,
    Inbound,
    NodeInfo,
    Owed,
    QueueInfo,
    Resync,
    Rotation,
    Routed,
    Taken,
)

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

# -- Lua -----------------------------------------------------------------------------------
#
# Every script touches the keys of one user only (one hash tag, one slot).

_SET_SEEN = """
local function set_seen(key, ts, ttl)
  local cur = redis.call('GET', key)
  if (not cur) or ts > tonumber(cur) then
    redis.call('SET', key, ts, 'EX', ttl)
  end
end
"""

#: Queue helpers. An entry's score in ``qo`` is its arrival time in
#: microseconds (Redis's clock), bumped to stay above the newest entry's, so
#: the order is the arrival order and the oldest entry's age can be read.
#: (Queues written before scores were times hold small arrival numbers; new
#: entries still sort after them.) Scores are formatted as integers: Lua
#: would print a 16-digit number in exponent form and lose digits.
_QUEUE = """
local function next_arrival(qo, top)
  if top == nil then
    local last = redis.call('ZRANGE', qo, -1, -1, 'WITHSCORES')
    top = tonumber(last[2] or '0')
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.max(top + 1, now)
end
local function trim_queue(q, qo, limit, ttl)
  local over = redis.call('ZCARD', qo) - limit
  if over > 0 then
    local gone = redis.call('ZPOPMIN', qo, over)
    for j = 1, #gone, 2 do
      redis.call('HDEL', q, gone[j])
    end
  end
  redis.call('EXPIRE', q, ttl)
  redis.call('EXPIRE', qo, ttl)
end
"""

#: KEYS: conns, q, qo. ARGV: the user's channel prefix, queue limit, queue
#: ttl, user, skip (incarnations that deliver locally, each between spaces),
#: publish command (SPUBLISH, or PUBLISH where Redis has no sharded pub/sub),
#: then per item: key, payload, owed ("1"/"0"), exclude ("" for none).
#: Queues the owed items (once per key, oldest dropped beyond the limit) and
#: publishes the items once to the user's channel of each other incarnation
#: holding a connection of the user. The channels carry the user's hash tag:
#: on a cluster the script and its publishes stay on the user's shard.
#: Returns the number of channels published to.
ROUTE = (
    _QUEUE
    + """
local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local skip = ARGV[5]
local queued = false
local top = nil
for i = 7, #ARGV, 4 do
  if ARGV[i + 2] == '1' then
    if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
      top = next_arrival(KEYS[3], top)
      redis.call('ZADD', KEYS[3], string.format('%.0f', top), ARGV[i])
    end
    queued = true
  end
end
if queued then
  trim_queue(KEYS[2], KEYS[3], limit, ttl)
end
local incs = redis.call('HVALS', KEYS[1])
if #incs == 0 then
  return 0
end
local message = nil
local done = {}
local count = 0
for _, inc in ipairs(incs) do
  if not done[inc] and not string.find(skip, ' ' .. inc .. ' ', 1, true) then
    done[inc] = true
    if message == nil then
      local items = {}
      for i = 7, #ARGV, 4 do
        items[#items + 1] = {ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
      end
      message = cjson.encode({u = ARGV[4], i = items})
    end
    redis.call(ARGV[6], ARGV[1] .. inc, message)
    count = count + 1
  end
end
return count
"""
)

#: KEYS: q, qo. The queue, oldest first, as a flat list key, payload, score, ...
OWED = """
local flat = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #flat, 1000 do
  local chunk = {}
  local scores = {}
  for j = i, math.min(i + 999, #flat), 2 do
    chunk[#chunk + 1] = flat[j]
    scores[#scores + 1] = flat[j + 1]
  end
  local values = redis.call('HMGET', KEYS[1], unpack(chunk))
  for j = 1, #chunk do
    if values[j] then
      out[#out + 1] = chunk[j]
      out[#out + 1] = values[j]
      out[#out + 1] = scores[j]
    end
  end
end
return out
"""

#: KEYS: q, qo. ARGV: queue limit, queue ttl, then key, payload, ...
#: Queues each key not queued yet, in order (as ROUTE does, without
#: publishing). Returns how many keys were new.
ENQUEUE = (
    _QUEUE
    + """
local top = nil
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    top = next_arrival(KEYS[2], top)
    redis.call('ZADD', KEYS[2], string.format('%.0f', top), ARGV[i])
    added = added + 1
  end
end
if added > 0 then
  trim_queue(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]))
end
return added
"""
)

#: KEYS: q, qo. Deletes the queue; returns how many entries it held.
PURGE = """
local n = math.max(redis.call('ZCARD', KEYS[2]), redis.call('HLEN', KEYS[1]))
redis.call('DEL', KEYS[1], KEYS[2])
return n
"""

#: KEYS: q, qo. ARGV: keys to remove.
SETTLE = """
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return 0
"""

#: KEYS: conns. ARGV: conn, incarnation, conns ttl.
#: Adds the connection; returns the hash as it was before (flat field, value).
ATTACH = """
local before = redis.call('HGETALL', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return before
"""

#: KEYS: conns, seen. ARGV: conn, ts, last-seen ttl.
#: {0} if the connection was unknown; otherwise {1, field, value, ...} with the
#: connections left (none: this was the last, and ts became last-seen).
DETACH = (
    _SET_SEEN
    + """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return {0}
end
local rest = redis.call('HGETALL', KEYS[1])
if #rest == 0 then
  set_seen(KEYS[2], tonumber(ARGV[2]), ARGV[3])
end
table.insert(rest, 1, 1)
return rest
"""
)

#: KEYS: conns, seen. ARGV: ts, last-seen ttl, then field, expected value, ...
#: Removes each field still holding the expected value (a connection of a dead
#: incarnation, or one whose detach failed); when that empties the hash and ts
#: is positive, ts becomes last-seen. Returns the connections left.
PRUNE = (
    _SET_SEEN
    + """
local removed = 0
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
local left = redis.call('HLEN', KEYS[1])
local ts = tonumber(ARGV[1])
if removed > 0 and left == 0 and ts > 0 then
  set_seen(KEYS[2], ts, ARGV[2])
end
return left
"""
)


#: KEYS: the bucket. ARGV: want, rate (tokens/s), burst. A token bucket on
#: Redis's clock (the same arithmetic as chatd.core.ratelimit.fill_and_take):
#: refill, take up to ``want`` whole tokens, remember; the key expires once
#: it would be full again. Returns {taken, ms until a token is there}.
TAKE = """
local want = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'n', 'at')
local tokens = tonumber(v[1]) or burst
local at = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local taken = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - taken
redis.call('HSET', KEYS[1], 'n', tostring(tokens), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
local wait = 0
if taken == 0 then
  wait = math.ceil((1 - tokens) / rate * 1000)
end
return {taken, wait}
"""


#: KEYS: the family. ARGV: digest presented, new digest, new access token
#: id, until (ms). Returns {outcome, user, access token id before}.
ROTATE = """
local v = redis.call('HMGET', KEYS[1], 'user', 'digest', 'jti')
if not v[1] then
  return {'unknown', false, false}
end
if v[2] ~= ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {'reused', v[1], v[3]}
end
redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'jti', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return {'rotated', v[1], v[3]}
"""


class _Script:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


SCRIPTS = {
    name: _Script(name, src)
    for name, src in (
        ("route", ROUTE),
        ("owed", OWED),
        ("enqueue", ENQUEUE),
        ("purge", PURGE),
        ("settle", SETTLE),
        ("attach", ATTACH),
        ("detach", DETACH),
        ("prune", PRUNE),
        ("take", TAKE),
        ("rotate", ROTATE),
    )
}

ROUTE_SCRIPT = SCRIPTS["route"]

_Call = tuple[_Script, list[str], list[str | int]]
_NOTHING = object()
#: Calls sent without waiting that may wait for a connection (see _fire).
UNSENT_LIMIT = 10_000
#: Tries of a call that Redis answers with a redirection or "try again".
REDIRECT_LIMIT = 16
#: Error replies that mean "not here / not now": the command did not run.
_RETRY_PREFIXES = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY")


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def node_of(incarnation: str) -> str:
    return incarnation.rpartition("#")[0]


def _evalsha(call: _Call) -> resp.Command:
    script, keys, args = call
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _eval(call: _Call) -> resp.Command:
    """The same script with its source (after Redis lost its script cache)."""
    script, keys, args = call
    return ("EVAL", script.source, len(keys), *keys, *args)


def _noscript(reply: Any) -> bool:
    return isinstance(reply, resp.ReplyError) and str(reply).startswith("NOSCRIPT")


_slot = functools.lru_cache(maxsize=1 << 16)(resp.hash_slot)

#: Commands without a key (any server answers them).
_KEYLESS = frozenset(("PING", "SCAN", "INFO", "CLUSTER", "ROLE", "COMMAND", "SCRIPT", "CLIENT"))


def _command_slot(command: resp.Command) -> int:
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return _slot(str(command[3])) if int(command[2]) else 0
    if name in _KEYLESS or len(command) < 2:
        return 0
    return _slot(str(command[1]))


def _redirection(reply: Any) -> tuple[str, int, resp.Address | None] | None:
    """("MOVED" | "ASK", slot, address) or (prefix, 0, None) for a reply that
    means the command did not run here and may run elsewhere or later; None
    for anything else."""
    if not isinstance(reply, resp.ReplyError):
        return None
    text = str(reply)
    if text.startswith(("MOVED ", "ASK ")):
        kind, slot, where = text.split()[:3]
        host, _, port = where.rpartition(":")
        return kind, int(slot), resp.Address(host=host or "127.0.0.1", port=int(port))
    if text.startswith(_RETRY_PREFIXES):
        return text.split()[0], 0, None
    return None


class _Pending:
    """Scripts sent without waiting that are not on a connection yet."""

    __slots__ = ("ask", "calls", "tries", "what")

    def __init__(
        self, what: str, calls: Sequence[_Call], tries: int = 0, ask: resp.Address | None = None
    ) -> None:
        self.what = what
        self.calls = calls
        self.tries = tries
        self.ask = ask


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
        #: Where the connections' tasks run: given, or opened by ``async with``.
        self._nursery = nursery
        self._nursery_manager: Any = None
        #: Where commands go (made on first use: it asks the server or the sentinels).
        self._topology: Topology | None = None
        self._topology_lock = trio.Lock()
        #: SPUBLISH/SSUBSCRIBE (Redis >= 7.0) for live delivery; PUBLISH/SUBSCRIBE
        #: where the server has no sharded pub/sub (or this is False).
        self._sharded_allowed = True
        self.sharded = True
        self._closed = False
        #: incarnation -> (deliver, resync) of the nodes run() serves here.
        self._nodes: dict[str, tuple[Deliver, Resync]] = {}
        #: incarnation -> its live-delivery subscriptions (while run() is live).
        self._subs: dict[str, _Subscriptions] = {}
        #: user -> {conn: incarnation}: the connections attached through here.
        self._by_user: dict[str, dict[str, str]] = {}
        #: " inc1 inc2 ": the incarnations route() delivers to itself.
        self._skip = " "
        #: Something sent without waiting may be lost: resync once connected.
        self._resync_when_connected = False
        self._flushing = False
        self._drain_lock = trio.Lock()
        #: Scripts sent without waiting while there was no connection for them
        #: (or that Redis redirected): they go out first once there is one
        #: (bounded; beyond, dropped and resynced).
        self._unsent: list[_Pending] = []
        #: The connection whose loss was last reported (see _lost).
        self._failed_conn: object = _NOTHING
        #: (user, conn) -> incarnation, for every connection attached through here.
        self._local: dict[tuple[str, str], str] = {}
        #: (user, conn) -> (incarnation, ts): detaches Redis may not have seen.
        self._tombstones: dict[tuple[str, str], tuple[str, int]] = {}
        #: incarnation -> monotonic time until which its heartbeat key is known fresh.
        self._fresh_until: dict[str, float] = {}
        self._running: dict[str, trio.CancelScope] = {}
        #: incarnation -> when its run() started (ms since the epoch).
        self._started: dict[str, int] = {}

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
        if self._nursery is None:
            self._nursery_manager = trio.open_nursery()
            self._nursery = await self._nursery_manager.__aenter__()
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

    # -- names ---------------------------------------------------------------------------

    def incarnation(self, node: str) -> str:
        return f"{node}#{self.token}"

    def user_key(self, user: str, kind: str) -> str:
        """A per-user key; ``{u:<user>}`` is its Redis Cluster hash tag."""
        return f"{self.prefix}:{{u:{user}}}:{kind}"

    def user_channel(self, user: str, incarnation: str = "") -> str:
        """Where items for ``user`` reach ``incarnation``: in the user's slot,
        so a cluster publishes it on the user's shard only."""
        return f"{self.prefix}:{{u:{user}}}:n:{incarnation}"

    def heartbeat_key(self, incarnation: str) -> str:
        return f"{self.prefix}:hb:{incarnation}"

    def incarnations_key(self) -> str:
        """Every incarnation that ever beat, by its last beat (ms): a
        survivor finds the dead ones here (see _bury)."""
        return f"{self.prefix}:incs"

    def users_key(self, incarnation: str) -> str:
        """The users with a connection through ``incarnation``."""
        return f"{self.prefix}:inc:{incarnation}:users"

    def burial_key(self, incarnation: str) -> str:
        return f"{self.prefix}:buried:{incarnation}"

    # -- where commands go -----------------------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        """Where commands go, once known (see :mod:`chatd.broker.topology`)."""
        return self._topology

    async def describe(self) -> dict[str, Any]:
        """The Redis deployment as this broker sees it (chatctl nodes, stats)."""
        topo = await self._ready()
        return {**topo.describe(), "sharded_pubsub": self.sharded}

    async def _ready(self) -> Topology:
        """The topology, found on first use and looked up again when stale;
        raises Unavailable."""
        topo = self._topology
        if topo is not None and not topo.stale:
            return topo
        async with self._topology_lock:
            try:
                if self._topology is None:
                    if self._closed:
                        raise Unavailable("the redis broker is closed")
                    self._topology = await topology.detect(
                        self.url,
                        self.mode,
                        self._open_commands,
                        connect_timeout=self.connect_timeout,
                    )
                elif self._topology.stale:
                    await self._topology.discover()
            except (TopologyError, resp.ConnectionLost, trio.TooSlowError) as exc:
                raise Unavailable(f"redis unavailable: {exc}") from None
            return self._topology

    async def _connection_for(self, topo: Topology, slot: int) -> resp.Connection:
        try:
            return await topo.connection(slot)
        except (TopologyError, resp.ConnectionLost, trio.TooSlowError) as exc:
            topo.stale = True  # a failover may have moved the slot: look again next time
            raise Unavailable(f"redis unavailable: {exc}") from None

    async def _connection_to(self, topo: Topology, address: resp.Address) -> resp.Connection:
        try:
            return await topo.connection_to(topo.node_address(address))
        except (TopologyError, resp.ConnectionLost, trio.TooSlowError) as exc:
            topo.stale = True
            raise Unavailable(f"redis unavailable: {exc}") from None

    async def _open_commands(self, address: resp.Address) -> resp.Connection:
        return await self._open("commands", address)

    async def _open(
        self, what: str, address: resp.Address, nursery: trio.Nursery | None = None
    ) -> resp.Connection:
        """A new connection to ``address``, logged in, its tasks in ``nursery``
        (default: the broker's). Raises resp.ConnectionLost when the server
        cannot be reached and TopologyError when it refuses us."""
        if self._closed:
            raise TopologyError("the redis broker is closed")
        nursery = nursery or self._nursery
        if nursery is None:
            raise RuntimeError("use the RedisBroker as `async with broker:` (or pass nursery=)")
        conn = await resp.Connection.open(
            address,
            connect_timeout=self.connect_timeout,
            reply_timeout=self.op_timeout,
            name=f"{what}-{self.token}",
        )
        await nursery.start(conn.run)
        hello: list[resp.Command] = []
        if address.password is not None:
            user = [address.username] if address.username else []
            hello.append(("AUTH", *user, address.password))
        if address.db:
            hello.append(("SELECT", address.db))
        hello.append(("CLIENT", "SETNAME", f"chatd-{what}-{self.token}"))
        if what == "commands":
            # Loaded up front, so a script sent without waiting never meets
            # NOSCRIPT (only a SCRIPT FLUSH while connected could cause one;
            # then it is sent again with its source).
            hello += [("SCRIPT", "LOAD", script.source) for script in SCRIPTS.values()]
            hello.append(("COMMAND", "INFO", "SPUBLISH"))
        try:
            with trio.fail_after(self.op_timeout):
                replies = await conn.call(*hello)
        except (resp.ConnectionLost, trio.TooSlowError) as exc:
            conn.close()
            raise resp.ConnectionLost(str(exc)) from None
        for reply in replies:
            if isinstance(reply, resp.ReplyError):
                conn.close()
                raise TopologyError(f"redis refused the connection: {reply}")
        if what == "commands":
            self.sharded = self._sharded_allowed and bool(replies[-1] and replies[-1][0])
        return conn

    # -- commands --------------------------------------------------------------------------

    async def _commands(self, what: str, commands: Sequence[resp.Command]) -> list[Any]:
        """Run ``commands``, each on the server of its key's slot, in one
        round trip per server (all at once); their replies, in order.
        Redirections (MOVED, ASK) and "try again" answers are followed
        within ``op_timeout``. Any failure, an error reply included, is
        Unavailable."""
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        ask: dict[int, resp.Address] = {}
        deadline = trio.current_time() + self.op_timeout
        tries = 0
        while todo:
            topo = await self._ready()
            groups: dict[resp.Connection, list[int]] = {}
            for i in todo:
                if i in ask:
                    conn = await self._connection_to(topo, ask[i])
                else:
                    conn = await self._connection_for(topo, _command_slot(commands[i]))
                groups.setdefault(conn, []).append(i)
            if self._unsent:
                await self._drain()  # what was sent without waiting goes first
            batches = []
            for conn, idx in groups.items():
                batch: list[resp.Command] = []
                for i in idx:
                    if i in ask:
                        batch.append(("ASKING",))
                    batch.append(commands[i])
                batches.append((conn, batch))
            results = await _call_many(batches)
            again: list[int] = []
            asked, ask = ask, {}
            for (conn, idx), result in zip(groups.items(), results, strict=True):
                if isinstance(result, BaseException):
                    topo.lost(conn)
                    raise Unavailable(f"redis unavailable ({what}): {result}")
                got = iter(result)
                for i in idx:
                    if i in asked:
                        next(got)  # ASKING's OK
                    reply = replies[i] = next(got)
                    redirect = _redirection(reply)
                    if redirect is None:
                        continue
                    kind, slot, address = redirect
                    if kind == "MOVED" and address is not None:
                        topo.moved(slot, address)
                    elif kind == "ASK" and address is not None:
                        ask[i] = address
                    else:
                        topo.lost(conn)  # READONLY: a demoted master; look again
                    again.append(i)
            todo = again
            if todo:
                tries += 1
                if tries > REDIRECT_LIMIT or trio.current_time() >= deadline:
                    raise Unavailable(f"redis unavailable ({what}): {replies[todo[0]]}")
                if len(ask) < len(todo):
                    await trio.sleep(0.01 * tries)
        for reply in replies:
            if isinstance(reply, resp.ReplyError) and not _noscript(reply):
                log.error("redis %s failed: %s", what, reply)
                raise Unavailable(f"redis error ({what}): {reply}")
        return replies

    async def _scripts(self, what: str, calls: Sequence[_Call]) -> list[Any]:
        """Run scripts in one round trip per server (a second one only after
        Redis lost its script cache); results in order."""
        if not calls:
            return []
        replies = await self._commands(what, [_evalsha(c) for c in calls])
        missing = [i for i, r in enumerate(replies) if _noscript(r)]
        if missing:
            again = await self._commands(what, [_eval(calls[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    # -- sending without waiting -----------------------------------------------------------

    def _fire(self, what: str, calls: Sequence[_Call]) -> None:
        """Send scripts without waiting for them (see Broker.route_nowait):
        on the connection of each script's slot if it is up and nothing sent
        earlier still waits; otherwise behind what waits."""
        topo = self._topology
        if topo is not None and not self._unsent and not topo.stale:
            if topo.mode is not Mode.CLUSTER:
                conn = topo.connection_now(0)
                if conn is not None:
                    self._submit(conn, what, calls)
                    return
            else:
                groups: dict[resp.Connection, list[_Call]] = {}
                for call in calls:
                    conn = topo.connection_now(_slot(call[1][0]))
                    if conn is None:
                        break
                    groups.setdefault(conn, []).append(call)
                else:
                    for conn, group in groups.items():
                        self._submit(conn, what, group)
                    return
        self._wait(_Pending(what, calls))

    def _wait(self, pending: _Pending) -> None:
        if len(self._unsent) < UNSENT_LIMIT:
            self._unsent.append(pending)
        else:
            self._unsent.clear()
            self._lost(pending.what, "redis away and too much waiting to be sent", None)
        self._start_flush()

    def _submit(
        self,
        conn: resp.Connection,
        what: str,
        calls: Sequence[_Call],
        tries: int = 0,
        asking: bool = False,
    ) -> None:
        def done(result: list[Any] | BaseException) -> None:
            if isinstance(result, BaseException):
                self._lost(what, str(result), conn)
                return
            if asking:
                result = result[1::2]
            missing, again = [], []
            for call, reply in zip(calls, result, strict=True):
                if _noscript(reply):
                    missing.append(call)
                elif (redirect := _redirection(reply)) is not None:
                    again.append((call, redirect))
                elif isinstance(reply, resp.ReplyError):
                    log.error("redis %s failed: %s", what, reply)
            if missing:  # Redis lost its scripts (SCRIPT FLUSH): again, with the source
                try:
                    conn.submit([_eval(c) for c in missing], lambda r: None)
                except resp.ConnectionLost as exc:
                    self._lost(what, str(exc), conn)
            if again:
                self._redirect(conn, what, again, tries)

        commands = [_evalsha(c) for c in calls]
        if asking:
            commands = [c for command in commands for c in (("ASKING",), command)]
        try:
            conn.submit(commands, done)
        except resp.ConnectionLost as exc:
            self._lost(what, str(exc), conn)

    def _redirect(
        self,
        conn: resp.Connection,
        what: str,
        calls: list[tuple[_Call, tuple[str, int, resp.Address | None]]],
        tries: int,
    ) -> None:
        """Scripts Redis did not run there (MOVED, ASK) or then (TRYAGAIN,
        CLUSTERDOWN, READONLY…): send them again, behind what waits."""
        topo = self._topology
        if tries >= REDIRECT_LIMIT or topo is None:
            self._lost(what, f"redirected {tries} times: {calls[0][1][0]}", None)
            return
        for call, (kind, slot, address) in calls:
            if kind == "MOVED" and address is not None:
                topo.moved(slot, address)
                self._wait(_Pending(what, [call], tries + 1))
            elif kind == "ASK" and address is not None:
                self._wait(_Pending(what, [call], tries + 1, ask=address))
            else:
                topo.lost(conn)
                self._wait(_Pending(what, [call], tries + 1))

    def _lost(self, what: str, reason: str, conn: resp.Connection | None) -> None:
        """Work sent without waiting may not have happened: once connected
        again, every node here resyncs from the store. Reported once per
        lost connection."""
        if conn is None or conn is not self._failed_conn:
            log.warning(
                "redis %s not done; resync once redis answers", what, extra={"reason": reason}
            )
        if conn is not None and self._topology is not None:
            self._topology.lost(conn)
        self._failed_conn = conn
        self._resync_when_connected = True
        self._start_flush()

    def _resync_all(self) -> None:
        for _deliver, resync in list(self._nodes.values()):
            resync()

    def _start_flush(self) -> None:
        if not self._flushing and self._nursery is not None and not self._closed:
            self._flushing = True
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        """Send what waits, once Redis answers (with backoff); then resync if
        something sent without waiting was lost."""
        delay = self.backoff_min
        try:
            while not self._closed and (self._unsent or self._resync_when_connected):
                try:
                    if any(p.tries for p in self._unsent):
                        await trio.sleep(0.01 * max(p.tries for p in self._unsent))
                    await self._drain()
                    if not self._unsent and self._resync_when_connected:
                        # Connected again (the drain found a connection for
                        # everything): what was lost is re-offered.
                        topo = await self._ready()
                        await self._connection_for(topo, 0)
                        self._resync_when_connected = False
                        log.info("redis connection back; resync")
                        self._resync_all()
                    delay = self.backoff_min
                except Unavailable:
                    await trio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(self.backoff_max, delay * 2)
        finally:
            self._flushing = False

    async def _drain(self) -> None:
        """Submit every waiting script, in order; raises Unavailable (and
        keeps them) when a connection for one cannot be had."""
        async with self._drain_lock:
            while self._unsent:
                topo = await self._ready()
                # First every connection they need (this may wait, and more
                # may be added meanwhile)...
                targets: list[resp.Connection | list[resp.Connection]] = []
                for pending in list(self._unsent):
                    if pending.ask is not None:
                        targets.append(await self._connection_to(topo, pending.ask))
                    else:
                        targets.append(
                            [
                                await self._connection_for(topo, _slot(c[1][0]))
                                for c in pending.calls
                            ]
                        )
                # ...then all of them submitted without a pause, in order.
                batch, self._unsent = self._unsent[: len(targets)], self._unsent[len(targets) :]
                publish = self._publish()
                for pending, target in zip(batch, targets, strict=True):
                    for script, _keys, args in pending.calls:
                        if script is ROUTE_SCRIPT:
                            args[5] = publish  # built before the server was known
                    if isinstance(target, resp.Connection):
                        self._submit(target, pending.what, pending.calls, pending.tries, True)
                        continue
                    groups: dict[resp.Connection, list[_Call]] = {}
                    for call, conn in zip(pending.calls, target, strict=True):
                        groups.setdefault(conn, []).append(call)
                    for conn, calls in groups.items():
                        self._submit(conn, pending.what, calls, pending.tries)

    # -- the owed queue and routing -----------------------------------------------------------

    async def route(self, items: Sequence[Routed]) -> None:
        await self._ready()  # sharded pub/sub or not: the server says
        calls = self._route_calls(items)
        if calls:
            await self._scripts("route", calls)
            self._deliver_locally(items)

    def route_nowait(self, items: Sequence[Routed]) -> None:
        calls = self._route_calls(items)
        if calls:
            self._fire("route", calls)
            self._deliver_locally(items)

    def _publish(self) -> str:
        return "SPUBLISH" if self.sharded else "PUBLISH"

    def _route_calls(self, items: Sequence[Routed]) -> list[_Call]:
        """One ROUTE script per user of ``items``."""
        by_user: dict[str, list[str | int]] = {}
        publish = self._publish()
        for item in items:
            args = by_user.get(item.user)
            if args is None:
                args = by_user[item.user] = [
                    self.user_channel(item.user),
                    self.queue_limit,
                    self.queue_ttl,
                    item.user,
                    self._skip,
                    publish,
                ]
            args += [item.key, item.payload, "1" if item.owed else "0", item.exclude or ""]
        return [
            (
                SCRIPTS["route"],
                [self.user_key(u, "conns"), self.user_key(u, "q"), self.user_key(u, "qo")],
                args,
            )
            for u, args in by_user.items()
        ]

    def _deliver_locally(self, items: Sequence[Routed]) -> None:
        """Connections of these users on this node get the items at once; the
        scripts publish them only to the other nodes."""
        local: list[tuple[Deliver, Inbound]] = []
        for item in items:
            for inc in set(self._by_user.get(item.user, {}).values()):
                node = self._nodes.get(inc)
                if node is not None:
                    inbound = Inbound(
                        item.user, item.key, item.payload, item.owed, item.exclude, item.envelope
                    )
                    local.append((node[0], inbound))
        for deliver, inbound in local:
            try:
                deliver(inbound)
            except Exception:
                log.exception("deliver failed", extra={"user": inbound.user, "key": inbound.key})

    async def owed(self, user: str) -> list[Owed]:
        keys = [self.user_key(user, "q"), self.user_key(user, "qo")]
        [flat] = await self._scripts("owed", [(SCRIPTS["owed"], keys, [])])
        return [
            Owed(str(flat[i]), str(flat[i + 1]), _arrival_ms(flat[i + 2]))
            for i in range(0, len(flat) - 2, 3)
        ]

    async def settle(self, user: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        names = [self.user_key(user, "q"), self.user_key(user, "qo")]
        await self._scripts("settle", [(SCRIPTS["settle"], names, list(keys))])

    def settle_nowait(self, user: str, keys: Sequence[str]) -> None:
        if keys:
            names = [self.user_key(user, "q"), self.user_key(user, "qo")]
            self._fire("settle", [(SCRIPTS["settle"], names, list(keys))])

    # -- presence ----------------------------------------------------------------------------

    async def attach(self, user: str, node: str, conn: str) -> bool:
        inc = self.incarnation(node)
        self._local[(user, conn)] = inc
        self._tombstones.pop((user, conn), None)
        self._by_user.setdefault(user, {})[conn] = inc
        subs = self._subs.get(inc)
        if subs is not None:
            # Listening before the connection is listed: whatever is routed
            # once others can see it reaches this node.
            await subs.subscribe([user])
        call: _Call = (
            SCRIPTS["attach"],
            [self.user_key(user, "conns")],
            [conn, inc, self.conns_ttl],
        )
        commands: list[resp.Command] = [
            _evalsha(call),
            ("SADD", self.users_key(inc), user),
            ("EXPIRE", self.users_key(inc), self.conns_ttl),
        ]
        beat = trio.current_time() >= self._fresh_until.get(inc, -1.0)
        if beat:
            # This instance's heartbeat for the node is stale (its run() is not
            # beating, or not yet): refresh it in the same round trip.
            commands += self._beat_commands(inc)
        replies = await self._commands("attach", commands)
        if beat:
            self._mark_fresh(inc)
        reply = replies[0]
        if _noscript(reply):
            [reply] = await self._scripts("attach", [call])
        before = _pairs(reply)
        before.pop(conn, None)
        if not before:
            return True
        return not await self._any_live(user, before, inc, ts=0)

    async def detach(self, user: str, node: str, conn: str, ts: int) -> bool:
        inc = self.incarnation(node)
        self._local.pop((user, conn), None)
        mine = self._by_user.get(user)
        gone_here = False
        if mine is not None:
            mine.pop(conn, None)
            gone_here = inc not in mine.values()
            if not mine:
                del self._by_user[user]
        keys = [self.user_key(user, "conns"), self.user_key(user, "seen")]
        call: _Call = (SCRIPTS["detach"], keys, [conn, ts, self.last_seen_ttl])
        commands: list[resp.Command] = [_evalsha(call)]
        if gone_here:
            commands.append(("SREM", self.users_key(inc), user))
            subs = self._subs.get(inc)
            if subs is not None:
                subs.unsubscribe(user)
        try:
            reply = (await self._commands("detach", commands))[0]
            if _noscript(reply):
                [reply] = await self._scripts("detach", [call])
        except BaseException:
            # Redis may or may not have seen it: retry from the heartbeat, so
            # that a connection that is gone never stays in presence.
            self._tombstone(user, conn, inc, ts)
            raise
        if not reply or int(reply[0]) == 0:
            return False
        rest = _pairs(reply[1:])
        if not rest:
            return True
        return not await self._any_live(user, rest, inc, ts=ts)

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]:
        users = list(dict.fromkeys(users))
        if not users:
            return {}
        conns, seen = await self._read_presence(users)
        live = await self._live_incarnations({inc for c in conns.values() for inc in c.values()})
        now = time.time_ns() // 1_000_000
        dead_calls: list[_Call] = []
        for user, mapping in conns.items():
            dead = {f: v for f, v in mapping.items() if v not in live}
            if dead:
                dead_calls.append(self._prune_call(user, dead, now))
                if len(dead) == len(mapping) and mapping:
                    seen[user] = max(int(seen[user] or 0), now)
        if dead_calls:
            await self._prune(dead_calls)
        out: dict[str, Presence] = {}
        for user in users:
            nodes = tuple(sorted({node_of(v) for v in conns[user].values() if v in live}))
            last = seen[user]
            out[user] = Presence(
                online=bool(nodes), nodes=nodes, last_seen=int(last) if last is not None else None
            )
        return out

    async def devices(self, user: str) -> int:
        conns, _seen = await self._read_presence([user])
        live = await self._live_incarnations(set(conns[user].values()))
        return sum(1 for inc in conns[user].values() if inc in live)

    async def _read_presence(
        self, users: list[str]
    ) -> tuple[dict[str, dict[str, str]], dict[str, str | None]]:
        """Each user's connections (conn -> incarnation) and stored last-seen."""
        commands: list[resp.Command] = []
        for user in users:
            commands.append(("HGETALL", self.user_key(user, "conns")))
            commands.append(("GET", self.user_key(user, "seen")))
        replies = await self._commands("presence", commands)
        conns = {u: _pairs(replies[2 * i] or []) for i, u in enumerate(users)}
        seen = {u: replies[2 * i + 1] for i, u in enumerate(users)}
        return conns, seen

    def revoked_key(self, token_id: str) -> str:
        return f"{self.prefix}:revoked:{token_id}"

    async def revoke(self, token_id: str, until_ms: int) -> None:
        if until_ms > time.time_ns() // 1_000_000:
            await self._commands(
                "revoke", [("SET", self.revoked_key(token_id), 1, "PXAT", until_ms)]
            )

    def bucket_key(self, bucket: str) -> str:
        """A rate bucket's key; a bucket named ``u:<user>:…`` sits in the
        user's slot."""
        if bucket.startswith("u:"):
            user, _, rest = bucket[2:].partition(":")
            return self.user_key(user, f"rate:{rest}")
        return f"{self.prefix}:rate:{bucket}"

    def family_key(self, family: str) -> str:
        return f"{self.prefix}:refresh:{family}"

    async def refresh_begin(
        self, family: str, user: str, digest: str, token_id: str, until_ms: int
    ) -> None:
        key = self.family_key(family)
        await self._commands(
            "refresh",
            [
                ("HSET", key, "user", user, "digest", digest, "jti", token_id),
                ("PEXPIREAT", key, until_ms),
            ],
        )

    async def refresh_rotate(
        self, family: str, digest: str, new_digest: str, new_token_id: str, until_ms: int
    ) -> Rotation:
        call: _Call = (
            SCRIPTS["rotate"],
            [self.family_key(family)],
            [digest, new_digest, new_token_id, until_ms],
        )
        [(outcome, user, token_id)] = await self._scripts("refresh", [call])
        return Rotation(str(outcome), user or None, token_id or None)

    async def refresh_end(self, family: str) -> None:
        await self._commands("refresh", [("DEL", self.family_key(family))])

    async def take(self, bucket: str, want: int, rate: float, burst: int) -> Taken:
        if rate <= 0:
            return Taken(want, 0.0)
        call: _Call = (SCRIPTS["take"], [self.bucket_key(bucket)], [want, rate, burst])
        [(taken, wait_ms)] = await self._scripts("take", [call])
        return Taken(int(taken), int(wait_ms) / 1000)

    async def is_revoked(self, token_id: str) -> bool:
        [found] = await self._commands("revoked", [("EXISTS", self.revoked_key(token_id))])
        return bool(found)

    async def ping(self) -> None:
        topo = await self._ready()
        commands: list[resp.Command] = [("PING",)]
        replies = await _call_many(
            [(await self._connection_to(topo, m), commands) for m in topo.masters()]
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise Unavailable(f"redis unavailable (ping): {reply}")

    # -- administration ------------------------------------------------------------------------

    async def _scan(self, what: str, pattern: str) -> list[str]:
        """Every key matching ``pattern`` on every master: SCAN, one bounded
        round trip per step (never KEYS, which blocks the server)."""
        topo = await self._ready()
        found: list[str] = []
        for master in topo.masters():
            conn = await self._connection_to(topo, master)
            cursor = 0
            while True:
                try:
                    [reply] = await conn.call(("SCAN", cursor, "MATCH", pattern, "COUNT", 1000))
                except resp.ConnectionLost as exc:
                    topo.lost(conn)
                    raise Unavailable(f"redis unavailable ({what}): {exc}") from None
                if isinstance(reply, resp.ReplyError):
                    raise Unavailable(f"redis error ({what}): {reply}")
                cursor, keys = reply
                found.extend(str(k) for k in keys)
                if int(cursor) == 0:
                    break
        return sorted(set(found))

    def _user_of(self, key: str, kind: str) -> str | None:
        head, tail = f"{self.prefix}:{{u:", f"}}:{kind}"
        if key.startswith(head) and key.endswith(tail):
            return key[len(head) : -len(tail)]
        return None

    async def queues(self) -> list[QueueInfo]:
        users = [
            u
            for k in await self._scan("queues", f"{self.prefix}:{{u:*}}:qo")
            if (u := self._user_of(k, "qo")) is not None
        ]
        out: list[QueueInfo] = []
        for start in range(0, len(users), self.reassert_chunk):
            chunk = users[start : start + self.reassert_chunk]

            commands: list[resp.Command] = []
            for user in chunk:
                key = self.user_key(user, "qo")
                commands.append(("ZCARD", key))
                commands.append(("ZRANGE", key, 0, 0, "WITHSCORES"))
            replies = await self._commands("queues", commands)
            for i, user in enumerate(chunk):
                count, first = int(replies[2 * i]), replies[2 * i + 1]
                if count:
                    oldest = _arrival_ms(first[1]) if first else None
                    out.append(QueueInfo(user, count, oldest))
        return out

    async def enqueue(self, user: str, items: Sequence[Owed]) -> int:
        if not items:
            return 0
        names = [self.user_key(user, "q"), self.user_key(user, "qo")]
        args: list[str | int] = [self.queue_limit, self.queue_ttl]
        for item in items:
            args += [item.key, item.payload]
        call: _Call = (SCRIPTS["enqueue"], names, args)
        [added] = await self._scripts("enqueue", [call])
        return int(added)

    async def purge(self, user: str) -> int:
        names = [self.user_key(user, "q"), self.user_key(user, "qo")]
        call: _Call = (SCRIPTS["purge"], names, [])
        [count] = await self._scripts("purge", [call])
        return int(count)

    async def nodes(self) -> list[NodeInfo]:
        head = f"{self.prefix}:hb:"
        incs = [k[len(head) :] for k in await self._scan("nodes", head + "*")]
        if not incs:
            return []

        commands: list[resp.Command] = []
        for inc in incs:
            commands.append(("GET", self.heartbeat_key(inc)))
            commands.append(("PTTL", self.heartbeat_key(inc)))
        replies = await self._commands("nodes", commands)
        out: list[NodeInfo] = []
        for i, inc in enumerate(incs):
            raw, pttl = replies[2 * i], int(replies[2 * i + 1])
            if raw is None or pttl < 0:
                continue  # expired between the scan and the read
            try:
                info = json.loads(raw)
                if not isinstance(info, dict):
                    raise ValueError("not an object")
            except ValueError:
                info = {}  # a heartbeat from an older chatd: no counts
            ttl = info.get("ttl")
            age = max(0, int(ttl) - pttl) if isinstance(ttl, int) else None
            out.append(
                NodeInfo(
                    node=node_of(inc),
                    incarnation=inc,
                    connections=int(info.get("c") or 0),
                    users=int(info.get("u") or 0),
                    heartbeat_age_ms=age,
                    started_at=info.get("s"),
                )
            )
        out.sort(key=lambda n: (n.node, n.incarnation))
        return out

    async def online_users(self) -> dict[str, Presence]:
        users = [
            u
            for k in await self._scan("presence", f"{self.prefix}:{{u:*}}:conns")
            if (u := self._user_of(k, "conns")) is not None
        ]
        out: dict[str, Presence] = {}
        for start in range(0, len(users), self.reassert_chunk):
            found = await self.presence(users[start : start + self.reassert_chunk])
            out.update({u: p for u, p in found.items() if p.online})
        return out

    # -- liveness ------------------------------------------------------------------------------

    def _ttl_ms(self) -> int:
        return max(1, int(self.presence_ttl * 1000))

    def _mark_fresh(self, inc: str) -> None:
        # Half the TTL: an attach through an instance whose run() is not
        # beating still refreshes the key long before it can expire.
        self._fresh_until[inc] = trio.current_time() + self.presence_ttl / 2

    def _prune_call(self, user: str, dead: dict[str, str], ts: int) -> _Call:
        args: list[str | int] = [ts, self.last_seen_ttl]
        for field, value in dead.items():
            args += [field, value]
        keys = [self.user_key(user, "conns"), self.user_key(user, "seen")]
        return (SCRIPTS["prune"], keys, args)

    async def _live_incarnations(self, incs: set[str], own: str | None = None) -> set[str]:
        """Those of ``incs`` that are alive: ``own`` (the incarnation a call
        goes through), the ones this instance runs or beat lately, and those
        whose heartbeat key exists (one round trip to ask)."""
        now = trio.current_time()
        running = {self.incarnation(node) for node in self._running}
        live = {
            inc
            for inc in incs
            if inc == own or inc in running or self._fresh_until.get(inc, -1.0) > now
        }
        ask = sorted(incs - live)
        if ask:
            found = await self._commands(
                "presence", [("EXISTS", self.heartbeat_key(inc)) for inc in ask]
            )
            live |= {inc for inc, n in zip(ask, found, strict=True) if n}
        return live

    async def _any_live(self, user: str, conns: dict[str, str], own: str, ts: int) -> bool:
        """Whether any of ``conns`` (field -> incarnation) is alive; the dead
        ones are removed (ts > 0 becomes last-seen if that empties the hash)."""
        live = await self._live_incarnations(set(conns.values()), own)
        dead = {f: v for f, v in conns.items() if v not in live}
        if dead:
            await self._prune([self._prune_call(user, dead, ts)])
        return len(dead) < len(conns)

    async def _prune(self, calls: list[_Call]) -> None:
        """Remove dead incarnations' connections; best effort, since every
        read ignores them anyway and the next read tries again."""
        try:
            await self._scripts("prune", calls)
        except Unavailable as exc:
            log.warning("could not prune dead connections", extra={"reason": exc.message})

    def _tombstone(self, user: str, conn: str, inc: str, ts: int) -> None:
        if len(self._tombstones) >= self.tombstone_limit:
            self._tombstones.pop(next(iter(self._tombstones)))
        self._tombstones[(user, conn)] = (inc, ts)

    def _beat_value(self, inc: str) -> str:
        """What the heartbeat key holds: this incarnation's local counts, so
        that :meth:`nodes` needs no scan of every user's connections."""
        users: set[str] = set()
        conns = 0
        for (user, _conn), owner in self._local.items():
            if owner == inc:
                conns += 1
                users.add(user)
        started = self._started.get(inc)
        return json.dumps(
            {"c": conns, "u": len(users), "ttl": self._ttl_ms(), "s": started},
            separators=(",", ":"),
        )

    def _beat_commands(self, inc: str) -> list[resp.Command]:
        """Refresh the heartbeat key (answering its old value) and the
        incarnation's last beat in the index of incarnations."""
        return [
            ("SET", self.heartbeat_key(inc), self._beat_value(inc), "PX", self._ttl_ms(), "GET"),
            ("ZADD", self.incarnations_key(), time.time_ns() // 1_000_000, inc),
            ("EXPIRE", self.incarnations_key(), self.conns_ttl),
        ]

    async def _beat(self, inc: str) -> bool:
        """Refresh the heartbeat key; True if it had been lost."""
        old, *_ = await self._commands("heartbeat", self._beat_commands(inc))
        self._mark_fresh(inc)
        return old is None

    async def _reassert(self, inc: str) -> None:
        """Write every local connection of ``inc`` again (idempotent), and
        the users index; then remove any that were detached meanwhile."""
        snapshot: dict[str, dict[str, str]] = {}
        for (user, conn), owner in list(self._local.items()):
            if owner == inc:
                snapshot.setdefault(user, {})[conn] = inc
        users = list(snapshot)
        for start in range(0, len(users), self.reassert_chunk):
            chunk = users[start : start + self.reassert_chunk]

            commands: list[resp.Command] = []
            for user in chunk:
                key = self.user_key(user, "conns")
                fields = [x for conn_inc in snapshot[user].items() for x in conn_inc]
                commands.append(("HSET", key, *fields))
                commands.append(("EXPIRE", key, self.conns_ttl))
            commands.append(("SADD", self.users_key(inc), *chunk))
            commands.append(("EXPIRE", self.users_key(inc), self.conns_ttl))
            await self._commands("re-assert", commands)
        now = time.time_ns() // 1_000_000
        for user, conns in snapshot.items():
            for conn in conns:
                if (user, conn) not in self._local and (user, conn) not in self._tombstones:
                    self._tombstone(user, conn, inc, now)
        await self._retry_tombstones()

    async def _retry_tombstones(self) -> None:
        if not self._tombstones:
            return
        items = list(self._tombstones.items())[: self.reassert_chunk]
        calls = [self._prune_call(user, {conn: inc}, ts) for (user, conn), (inc, ts) in items]
        await self._scripts("detach", calls)
        for key, value in items:
            if self._tombstones.get(key) == value:
                del self._tombstones[key]

    # -- delivery --------------------------------------------------------------------------

    async def run(
        self,
        node: str,
        deliver: Deliver,
        resync: Resync,
        *,
        gone: Gone | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if node in self._running:
            raise RuntimeError(f"node '{node}' is already running on this broker")
        inc = self.incarnation(node)
        state = _RunState()
        backoff = self.backoff_min
        with trio.CancelScope() as scope:
            self._running[node] = scope
            self._started[inc] = time.time_ns() // 1_000_000
            self._nodes[inc] = (deliver, resync)
            self._skip = " " + " ".join(self._nodes) + " "
            try:
                while not self._closed:
                    try:
                        await self._session(inc, deliver, resync, gone, task_status, state)
                    except BaseException as exc:
                        _reraise_cancellation(exc)
                        log.warning(
                            "redis subscription lost; retrying"
                            if state.started
                            else "redis not reachable; retrying",
                            extra={"incarnation": inc, "reason": _reason(exc)},
                        )
                    if (
                        state.live_since is not None
                        and trio.current_time() - state.live_since > self.backoff_max
                    ):
                        backoff = self.backoff_min  # it had been up for a while
                    state.live_since = None
                    await trio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(self.backoff_max, backoff * 2)
            finally:
                del self._running[node]
                self._started.pop(inc, None)
                del self._nodes[inc]
                self._skip = " " + " ".join(self._nodes) + " "

    async def _session(
        self,
        inc: str,
        deliver: Deliver,
        resync: Resync,
        gone: Gone | None,
        task_status: trio.TaskStatus[None],
        state: _RunState,
    ) -> None:
        """Live delivery, from subscribing to a loss."""
        async with trio.open_nursery() as nursery:
            subs = _Subscriptions(self, inc, deliver, resync, nursery)
            self._subs[inc] = subs
            try:
                await self._ready()
                # Listening on every local user's channel first: anything
                # routed from now on reaches us. Then our presence back (Redis
                # may have lost it), then re-offer what may have been missed.
                await subs.subscribe(self._users_of(inc))
                await self._beat(inc)
                await self._reassert(inc)
                state.live_since = trio.current_time()
                if not state.started:
                    state.started = True
                    task_status.started()
                else:
                    log.info("redis subscription back; resync", extra={"incarnation": inc})
                    resync()
                nursery.start_soon(self._heartbeat, inc, resync, gone)
                nursery.start_soon(subs.follow)
                await subs.watch()
            finally:
                if self._subs.get(inc) is subs:
                    del self._subs[inc]
                subs.close()
                nursery.cancel_scope.cancel()

    def _users_of(self, inc: str) -> list[str]:
        return [u for u, conns in self._by_user.items() if inc in conns.values()]

    def _dispatch(self, message: list[Any], deliver: Deliver) -> None:
        try:
            doc = orjson.loads(message[2])
            user = doc["u"]
            items = [
                Inbound(user, str(key), str(payload), owed == "1", exclude or None)
                for key, payload, owed, exclude in doc["i"]
            ]
        except (ValueError, KeyError, TypeError, IndexError):
            log.error("dropping an undecodable broker message")
            return
        for item in items:
            try:
                deliver(item)
            except Exception:
                log.exception("deliver failed", extra={"user": item.user, "key": item.key})

    async def _heartbeat(self, inc: str, resync: Resync, gone: Gone | None) -> None:
        last_reassert = trio.current_time()
        while True:
            await trio.sleep(self.heartbeat_interval)
            try:
                lost = await self._beat(inc)
                if lost or trio.current_time() - last_reassert >= self.reassert_interval:
                    if lost:
                        log.warning(
                            "redis lost this node's presence; re-asserting",
                            extra={"incarnation": inc},
                        )
                    await self._reassert(inc)
                    last_reassert = trio.current_time()
                    if lost:
                        resync()
                else:
                    await self._retry_tombstones()
                await self._bury_the_dead(inc, gone)
            except Unavailable as exc:
                # The subscriptions' keepalive notices a dead server; a slow
                # answer here only skips one beat.
                log.warning("redis heartbeat failed", extra={"reason": exc.message})

    # -- nodes that died -------------------------------------------------------------------

    async def _bury_the_dead(self, me: str, gone: Gone | None) -> None:
        """Find incarnations whose heartbeat expired; claim each (exactly one
        survivor wins), then announce its users who are online nowhere else."""
        now = time.time_ns() // 1_000_000
        horizon = now - self._ttl_ms()
        [found] = await self._commands(
            "burial",
            [("ZRANGEBYSCORE", self.incarnations_key(), "-inf", horizon, "WITHSCORES")],
        )
        pairs = _pairs(found)
        candidates = [inc for inc in pairs if inc not in self._nodes]
        if not candidates:
            return
        alive = await self._commands(
            "burial", [("EXISTS", self.heartbeat_key(inc)) for inc in candidates]
        )
        for inc, exists in zip(candidates, alive, strict=True):
            if exists:
                continue  # a clock apart from ours; it still beats
            [claimed] = await self._commands(
                "burial", [("SET", self.burial_key(inc), me, "NX", "PX", 60_000)]
            )
            if claimed is None:
                continue  # another survivor buries it
            await self._bury(inc, int(float(pairs[inc])), gone)

    async def _bury(self, inc: str, last_beat: int, gone: Gone | None) -> None:
        [users] = await self._commands("burial", [("SMEMBERS", self.users_key(inc))])
        users = sorted(str(u) for u in users)
        log.warning(
            "node died; announcing its users offline",
            extra={"incarnation": inc, "users": len(users)},
        )
        departed: list[tuple[str, int]] = []
        for start in range(0, len(users), self.reassert_chunk):
            chunk = users[start : start + self.reassert_chunk]
            conns, seen = await self._read_presence(chunk)
            live = await self._live_incarnations(
                {v for c in conns.values() for v in c.values()} - {inc}
            )
            calls = []
            for user in chunk:
                dead = {f: v for f, v in conns[user].items() if v not in live}
                if dead:
                    calls.append(self._prune_call(user, dead, last_beat))
                if not any(v in live for v in conns[user].values()):
                    departed.append((user, max(int(seen[user] or 0), last_beat)))
            if calls:
                await self._prune(calls)
        await self._commands(
            "burial",
            [("DEL", self.users_key(inc)), ("ZREM", self.incarnations_key(), inc)],
        )
        if gone is not None:
            for user, last_seen in departed:
                try:
                    gone(user, last_seen)
                except Exception:
                    log.exception("gone failed", extra={"user": user})

    async def aclose(self) -> None:
        self._closed = True
        for scope in list(self._running.values()):
            scope.cancel()
        topo, self._topology = self._topology, None
        if topo is not None:
            conns = topo.connections()
            topo.close()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for conn in conns:
                    await conn.done.wait()


class _Subscriptions:
    """One node's live delivery while its run() is live: a channel per local
    user, subscribed on the server of the user's slot (SSUBSCRIBE; SUBSCRIBE
    where Redis has no sharded pub/sub), one connection per server.

    A connection that fails or stops answering PING breaks the whole
    session (run() starts again and resyncs). A channel the server drops
    (its slot moved to another shard) or that could not be subscribed is
    subscribed again where it now lives, and its user resynced."""

    def __init__(
        self,
        broker: RedisBroker,
        inc: str,
        deliver: Deliver,
        resync: Resync,
        nursery: trio.Nursery,
    ) -> None:
        self.broker = broker
        self.inc = inc
        self.deliver = deliver
        self.resync = resync
        self.nursery = nursery
        self.conns: dict[resp.Address, resp.Connection] = {}
        self._locks: dict[resp.Address, trio.Lock] = {}
        #: user -> the connection its channel is subscribed on (None: under way).
        self.channels: dict[str, resp.Connection | None] = {}
        #: Channels we unsubscribed from ourselves whose confirmation is due.
        self.leaving: dict[str, int] = {}
        #: Users to subscribe again (see follow).
        self.missing: set[str] = set()
        self._wake = trio.Event()
        self.broken = trio.Event()
        self.reason = ""
        self.closed = False

    @property
    def sharded(self) -> bool:
        return self.broker.sharded

    def wanted(self, user: str) -> bool:
        return self.inc in self.broker._by_user.get(user, {}).values()

    def channel(self, user: str) -> str:
        return self.broker.user_channel(user, self.inc)

    def user_of(self, channel: str) -> str | None:
        head = f"{self.broker.prefix}:{{u:"
        tail = f"}}:n:{self.inc}"
        if channel.startswith(head) and channel.endswith(tail):
            return channel[len(head) : -len(tail)]
        return None

    def break_(self, reason: str) -> None:
        if not self.broken.is_set() and not self.closed:
            self.reason = reason
            self.broken.set()

    def close(self) -> None:
        self.closed = True
        for conn in self.conns.values():
            conn.close()

    async def _connection(self, slot: int) -> resp.Connection:
        topo = await self.broker._ready()
        address = topo.address_of(slot)
        if address is None:
            topo.stale = True
            topo = await self.broker._ready()
            address = topo.address_of(slot)
            if address is None:
                raise Unavailable(f"redis unavailable: no server serves slot {slot}")
        conn = self.conns.get(address)
        if conn is not None and conn.alive:
            return conn
        async with self._locks.setdefault(address, trio.Lock()):
            conn = self.conns.get(address)
            if conn is not None and conn.alive:
                return conn
            try:
                conn = await self.broker._open("subscription", address, self.nursery)
            except (resp.ConnectionLost, TopologyError) as exc:
                topo.stale = True  # a failover may have moved the slot: look again
                raise Unavailable(f"redis unavailable: {exc}") from None
            conn.on_push = self._push
            self.conns[address] = conn
            self.nursery.start_soon(self._watch_connection, conn, address)
            return conn

    async def _watch_connection(self, conn: resp.Connection, address: resp.Address) -> None:
        await conn.done.wait()
        if not self.closed:
            topo = self.broker._topology
            if topo is not None:
                topo.stale = True  # a failover may have moved its slots
            self.break_(f"subscription to {address} lost: {conn.error}")

    async def subscribe(self, users: Sequence[str]) -> None:
        """Subscribe the channels of ``users`` not subscribed yet, each on
        the server of its slot. Raises Unavailable (the users then wait in
        ``missing`` for :meth:`follow`)."""
        todo = [u for u in dict.fromkeys(users) if u not in self.channels]
        if not todo:
            return
        for user in todo:
            self.channels[user] = None
        command = "SSUBSCRIBE" if self.sharded else "SUBSCRIBE"
        try:
            for _ in range(REDIRECT_LIMIT):
                groups: dict[resp.Connection, list[str]] = {}
                for user in todo:
                    conn = await self._connection(_slot(self.channel(user)))
                    groups.setdefault(conn, []).append(user)
                results = await _call_many(
                    [(c, [(command, self.channel(u)) for u in us]) for c, us in groups.items()]
                )
                again: list[str] = []
                for (conn, us), result in zip(groups.items(), results, strict=True):
                    if isinstance(result, BaseException):
                        raise Unavailable(f"redis unavailable (subscribe): {result}")
                    for user, reply in zip(us, result, strict=True):
                        redirect = _redirection(reply)
                        if redirect is not None:
                            kind, slot, address = redirect
                            if kind == "MOVED" and address is not None:
                                assert self.broker._topology is not None
                                self.broker._topology.moved(slot, address)
                            again.append(user)
                        elif isinstance(reply, resp.ReplyError):
                            raise Unavailable(f"redis refused a subscription: {reply}")
                        elif self.channels.get(user, _NOTHING) is None:
                            self.channels[user] = conn
                            if not self.wanted(user):
                                self.unsubscribe(user)  # it left meanwhile
                if not again:
                    return
                todo = again
                await trio.sleep(0.01)
            raise Unavailable("redis unavailable (subscribe): redirected too often")
        except BaseException:
            for user in todo:
                if self.channels.get(user, _NOTHING) is None:
                    del self.channels[user]
                    self.missing.add(user)
            self._wake.set()
            raise

    def unsubscribe(self, user: str) -> None:
        conn = self.channels.pop(user, None)
        if conn is None or not conn.alive:
            return
        channel = self.channel(user)
        self.leaving[channel] = self.leaving.get(channel, 0) + 1
        try:
            conn.send([("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", channel)])
        except resp.ConnectionLost:
            pass

    def _push(self, message: list[Any]) -> None:
        kind = message[0]
        if kind in ("smessage", "message"):
            self.broker._dispatch(message, self.deliver)
            return
        if kind not in ("sunsubscribe", "unsubscribe") or not isinstance(message[1], str):
            return
        channel = message[1]
        pending = self.leaving.get(channel, 0)
        if pending:
            if pending == 1:
                del self.leaving[channel]
            else:
                self.leaving[channel] = pending - 1
            return
        # The server dropped it: the channel's slot moved to another shard.
        user = self.user_of(channel)
        if user is not None and self.wanted(user):
            self.channels.pop(user, None)
            self.missing.add(user)
            self._wake.set()

    async def follow(self) -> None:
        """Subscribe again, where they live now, the channels the server
        dropped or that could not be subscribed; then resync their users
        (items routed to them meanwhile were published where nobody
        listened)."""
        delay = self.broker.backoff_min
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0.05)  # the rest of a slot migration's drops
            users = sorted(u for u in self.missing if self.wanted(u))
            self.missing.clear()
            if not users:
                continue
            topo = self.broker._topology
            if topo is not None:
                topo.stale = True
            try:
                await self.subscribe(users)
            except Unavailable as exc:
                log.warning("redis resubscribe failed; retrying", extra={"reason": exc.message})
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self.broker.backoff_max, delay * 2)
                continue
            delay = self.broker.backoff_min
            log.info("channels moved; resubscribed", extra={"users": len(users)})
            self.resync(users)

    async def watch(self) -> None:
        """Until the session breaks: raise ConnectionLost then. Every
        ``heartbeat_interval`` each connection must answer PING."""
        broker = self.broker
        while True:
            with trio.move_on_after(broker.heartbeat_interval):
                await self.broken.wait()
            if self.broken.is_set():
                raise resp.ConnectionLost(self.reason)
            for address, conn in list(self.conns.items()):
                try:
                    with trio.fail_after(broker.op_timeout):
                        await conn.call(("PING",))
                except (resp.ConnectionLost, trio.TooSlowError) as exc:
                    raise resp.ConnectionLost(f"subscription to {address}: {exc}") from None


async def _call_many(
    batches: Sequence[tuple[resp.Connection, Sequence[resp.Command]]],
) -> list[list[Any] | BaseException]:
    """Each batch on its connection, all at once; each batch's replies (or
    the error that lost its connection), in order."""
    if not batches:
        return []
    if len(batches) == 1:
        conn, commands = batches[0]
        try:
            return [await conn.call(*commands)]
        except resp.ConnectionLost as exc:
            return [exc]
    results: list[list[Any] | BaseException] = [[] for _ in batches]
    left = [len(batches)]
    all_done = trio.Event()

    def finisher(k: int) -> resp.Done:
        def done(result: list[Any] | BaseException) -> None:
            results[k] = result
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

        return done

    for k, (conn, commands) in enumerate(batches):
        try:
            conn.submit(commands, finisher(k))
        except resp.ConnectionLost as exc:
            finisher(k)(exc)
    await all_done.wait()
    return results


class _RunState:
    def __init__(self) -> None:
        self.started = False
        self.live_since: float | None = None


def _arrival_ms(score: Any) -> int | None:
    """A queue score as milliseconds since the epoch; None for the small
    arrival numbers that queues written by an older chatd hold."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return int(value // 1000) if value >= 1e14 else None


def _reraise_cancellation(exc: BaseException) -> None:
    """Re-raise ``exc`` unless it is a plain error to retry after: cancellation
    (alone or inside a group, whatever else failed alongside), KeyboardInterrupt
    and the like always propagate."""
    if isinstance(exc, BaseExceptionGroup):
        cancelled, rest = exc.split(trio.Cancelled)
        if cancelled is not None:
            raise cancelled from None
        if rest is not None and rest.split(Exception)[1] is not None:
            raise exc
    elif not isinstance(exc, Exception):
        raise exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
