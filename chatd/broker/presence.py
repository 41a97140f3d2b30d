"""Presence on Redis: who is connected through which node, and which nodes live.

Owns ``attach``/``detach``/``presence``/``devices`` (scripts ATTACH, DETACH,
PRUNE), the heartbeats of the nodes this instance runs (a key per
incarnation, the index of incarnations, each incarnation's users), the
re-assert of this instance's connections, failed detaches kept as
tombstones, the burial of dead nodes, and the admin reads ``nodes`` and
``online_users``. Key names come from :mod:`chatd.broker.keys`.

Guarantees (docs/redis.md, *Presence*):

* ``attach`` is True only for a user's first connection on any live node,
  ``detach`` True only for the last; concurrent calls are serialised by the
  scripts.
* An incarnation is alive while its heartbeat key exists. Reads ignore the
  connections of dead incarnations and remove them, so a killed node leaves
  presence within ``presence_ttl``.
* Every heartbeat checks the key was still there; if Redis lost it, this
  instance writes all of its connections again and the node resyncs. It
  also re-writes them every ``reassert_interval``. A detach Redis may not
  have seen is retried from the heartbeat, so a closed connection never
  lingers.
* Exactly one survivor claims a dead incarnation and calls ``gone`` for its
  users who are online nowhere else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import trio

from chatd.broker import resp
from chatd.broker.keys import Keys, incarnation_of, node_of
from chatd.broker.link import Link
from chatd.broker.local import Local
from chatd.broker.scripts import SCRIPTS, Call, evalsha, noscript
from chatd.core.errors import Unavailable
from chatd.core.model import Presence
from chatd.ports import Gone, NodeInfo, Resync

log = logging.getLogger("chatd.broker.redis")


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class PresenceTracker:
    """Presence and heartbeats for one broker instance (see the module docstring)."""

    def __init__(
        self,
        link: Link,
        keys: Keys,
        local: Local,
        *,
        token: str,
        presence_ttl: float,
        heartbeat_interval: float,
        conns_ttl: int,
        last_seen_ttl: int,
        reassert_interval: float,
        reassert_chunk: int,
        tombstone_limit: int,
    ) -> None:
        self.link = link
        self.keys = keys
        self.local = local
        self.token = token
        self.presence_ttl = presence_ttl
        self.heartbeat_interval = heartbeat_interval
        self.conns_ttl = conns_ttl
        self.last_seen_ttl = last_seen_ttl
        self.reassert_interval = reassert_interval
        self.reassert_chunk = reassert_chunk
        self.tombstone_limit = tombstone_limit
        #: (user, conn) -> (incarnation, ts): detaches Redis may not have seen.
        self.tombstones: dict[tuple[str, str], tuple[str, int]] = {}
        #: incarnation -> monotonic time until which its heartbeat key is known fresh.
        self.fresh_until: dict[str, float] = {}

    # -- connections -------------------------------------------------------------------------

    async def attach(self, user: str, node: str, conn: str) -> bool:
        inc = incarnation_of(node, self.token)
        self.local.conns[(user, conn)] = inc
        self.tombstones.pop((user, conn), None)
        self.local.by_user.setdefault(user, {})[conn] = inc
        subs = self.local.subs.get(inc)
        if subs is not None:
            # Listening before the connection is listed: whatever is routed
            # once others can see it reaches this node.
            await subs.subscribe([user])
        call: Call = (
            SCRIPTS["attach"],
            [self.keys.user_key(user, "conns")],
            [conn, inc, self.conns_ttl],
        )
        commands: list[resp.Command] = [
            evalsha(call),
            ("SADD", self.keys.users_key(inc), user),
            ("EXPIRE", self.keys.users_key(inc), self.conns_ttl),
        ]
        beat = trio.current_time() >= self.fresh_until.get(inc, -1.0)
        if beat:
            # This instance's heartbeat for the node is stale (its run() is not
            # beating, or not yet): refresh it in the same round trip.
            commands += self.beat_commands(inc)
        replies = await self.link.commands("attach", commands)
        if beat:
            self.mark_fresh(inc)
        reply = replies[0]
        if noscript(reply):
            [reply] = await self.link.scripts("attach", [call])
        before = pairs(reply)
        before.pop(conn, None)
        if not before:
            return True
        return not await self.any_live(user, before, inc, ts=0)

    async def detach(self, user: str, node: str, conn: str, ts: int) -> bool:
        inc = incarnation_of(node, self.token)
        self.local.conns.pop((user, conn), None)
        mine = self.local.by_user.get(user)
        gone_here = False
        if mine is not None:
            mine.pop(conn, None)
            gone_here = inc not in mine.values()
            if not mine:
                del self.local.by_user[user]
        keys = [self.keys.user_key(user, "conns"), self.keys.user_key(user, "seen")]
        call: Call = (SCRIPTS["detach"], keys, [conn, ts, self.last_seen_ttl])
        commands: list[resp.Command] = [evalsha(call)]
        if gone_here:
            commands.append(("SREM", self.keys.users_key(inc), user))
            subs = self.local.subs.get(inc)
            if subs is not None:
                subs.unsubscribe(user)
        try:
            reply = (await self.link.commands("detach", commands))[0]
            if noscript(reply):
                [reply] = await self.link.scripts("detach", [call])
        except BaseException:
            # Redis may or may not have seen it: retry from the heartbeat, so
            # that a connection that is gone never stays in presence.
            self.tombstone(user, conn, inc, ts)
            raise
        if not reply or int(reply[0]) == 0:
            return False
        rest = pairs(reply[1:])
        if not rest:
            return True
        return not await self.any_live(user, rest, inc, ts=ts)

    # -- reads -------------------------------------------------------------------------------

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]:
        users = list(dict.fromkeys(users))
        if not users:
            return {}
        conns, seen = await self.read(users)
        live = await self.live_incarnations({inc for c in conns.values() for inc in c.values()})
        now = _now_ms()
        dead_calls: list[Call] = []
        for user, mapping in conns.items():
            dead = {f: v for f, v in mapping.items() if v not in live}
            if dead:
                dead_calls.append(self.prune_call(user, dead, now))
                if len(dead) == len(mapping) and mapping:
                    seen[user] = str(max(int(seen[user] or 0), now))
        if dead_calls:
            await self.prune(dead_calls)
        out: dict[str, Presence] = {}
        for user in users:
            nodes = tuple(sorted({node_of(v) for v in conns[user].values() if v in live}))
            last = seen[user]
            out[user] = Presence(
                online=bool(nodes), nodes=nodes, last_seen=int(last) if last is not None else None
            )
        return out

    async def devices(self, user: str) -> int:
        conns, _seen = await self.read([user])
        live = await self.live_incarnations(set(conns[user].values()))
        return sum(1 for inc in conns[user].values() if inc in live)

    async def read(
        self, users: list[str]
    ) -> tuple[dict[str, dict[str, str]], dict[str, str | None]]:
        """Each user's connections (conn -> incarnation) and stored last-seen."""
        commands: list[resp.Command] = []
        for user in users:
            commands.append(("HGETALL", self.keys.user_key(user, "conns")))
            commands.append(("GET", self.keys.user_key(user, "seen")))
        replies = await self.link.commands("presence", commands)
        conns = {u: pairs(replies[2 * i] or []) for i, u in enumerate(users)}
        seen = {u: replies[2 * i + 1] for i, u in enumerate(users)}
        return conns, seen

    async def online_users(self) -> dict[str, Presence]:
        users = [
            u
            for k in await self.link.scan("presence", self.keys.user_pattern("conns"))
            if (u := self.keys.user_of(k, "conns")) is not None
        ]
        out: dict[str, Presence] = {}
        for start in range(0, len(users), self.reassert_chunk):
            found = await self.presence(users[start : start + self.reassert_chunk])
            out.update({u: p for u, p in found.items() if p.online})
        return out

    async def nodes(self) -> list[NodeInfo]:
        head = self.keys.heartbeat_prefix()
        incs = [k[len(head) :] for k in await self.link.scan("nodes", head + "*")]
        if not incs:
            return []

        commands: list[resp.Command] = []
        for inc in incs:
            commands.append(("GET", self.keys.heartbeat_key(inc)))
            commands.append(("PTTL", self.keys.heartbeat_key(inc)))
        replies = await self.link.commands("nodes", commands)
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

    # -- liveness ----------------------------------------------------------------------------

    def ttl_ms(self) -> int:
        return max(1, int(self.presence_ttl * 1000))

    def mark_fresh(self, inc: str) -> None:
        # Half the TTL: an attach through an instance whose run() is not
        # beating still refreshes the key long before it can expire.
        self.fresh_until[inc] = trio.current_time() + self.presence_ttl / 2

    def prune_call(self, user: str, dead: dict[str, str], ts: int) -> Call:
        args: list[resp.Arg] = [ts, self.last_seen_ttl]
        for field, value in dead.items():
            args += [field, value]
        keys = [self.keys.user_key(user, "conns"), self.keys.user_key(user, "seen")]
        return (SCRIPTS["prune"], keys, args)

    async def live_incarnations(self, incs: set[str], own: str | None = None) -> set[str]:
        """Those of ``incs`` that are alive: ``own`` (the incarnation a call
        goes through), the ones this instance runs or beat lately, and those
        whose heartbeat key exists (one round trip to ask)."""
        now = trio.current_time()
        running = self.local.nodes
        live = {
            inc
            for inc in incs
            if inc == own or inc in running or self.fresh_until.get(inc, -1.0) > now
        }
        ask = sorted(incs - live)
        if ask:
            found = await self.link.commands(
                "presence", [("EXISTS", self.keys.heartbeat_key(inc)) for inc in ask]
            )
            live |= {inc for inc, n in zip(ask, found, strict=True) if n}
        return live

    async def any_live(self, user: str, conns: dict[str, str], own: str, ts: int) -> bool:
        """Whether any of ``conns`` (field -> incarnation) is alive; the dead
        ones are removed (ts > 0 becomes last-seen if that empties the hash)."""
        live = await self.live_incarnations(set(conns.values()), own)
        dead = {f: v for f, v in conns.items() if v not in live}
        if dead:
            await self.prune([self.prune_call(user, dead, ts)])
        return len(dead) < len(conns)

    async def prune(self, calls: list[Call]) -> None:
        """Remove dead incarnations' connections; best effort, since every
        read ignores them anyway and the next read tries again."""
        try:
            await self.link.scripts("prune", calls)
        except Unavailable as exc:
            log.warning("could not prune dead connections", extra={"reason": exc.message})

    def tombstone(self, user: str, conn: str, inc: str, ts: int) -> None:
        if len(self.tombstones) >= self.tombstone_limit:
            self.tombstones.pop(next(iter(self.tombstones)))
        self.tombstones[(user, conn)] = (inc, ts)

    # -- heartbeats --------------------------------------------------------------------------

    def _beat_value(self, inc: str) -> str:
        """What the heartbeat key holds: this incarnation's local counts, so
        that :meth:`nodes` needs no scan of every user's connections."""
        users: set[str] = set()
        conns = 0
        for (user, _conn), owner in self.local.conns.items():
            if owner == inc:
                conns += 1
                users.add(user)
        started = self.local.started.get(inc)
        return json.dumps(
            {"c": conns, "u": len(users), "ttl": self.ttl_ms(), "s": started},
            separators=(",", ":"),
        )

    def beat_commands(self, inc: str) -> list[resp.Command]:
        """Refresh the heartbeat key (answering its old value) and the
        incarnation's last beat in the index of incarnations."""
        return [
            (
                "SET",
                self.keys.heartbeat_key(inc),
                self._beat_value(inc),
                "PX",
                self.ttl_ms(),
                "GET",
            ),
            ("ZADD", self.keys.incarnations_key(), _now_ms(), inc),
            ("EXPIRE", self.keys.incarnations_key(), self.conns_ttl),
        ]

    async def beat(self, inc: str) -> bool:
        """Refresh the heartbeat key; True if it had been lost."""
        old, *_ = await self.link.commands("heartbeat", self.beat_commands(inc))
        self.mark_fresh(inc)
        return old is None

    async def reassert(self, inc: str) -> None:
        """Write every local connection of ``inc`` again (idempotent), and
        the users index; then remove any that were detached meanwhile."""
        snapshot: dict[str, dict[str, str]] = {}
        for (user, conn), owner in list(self.local.conns.items()):
            if owner == inc:
                snapshot.setdefault(user, {})[conn] = inc
        users = list(snapshot)
        for start in range(0, len(users), self.reassert_chunk):
            chunk = users[start : start + self.reassert_chunk]

            commands: list[resp.Command] = []
            for user in chunk:
                key = self.keys.user_key(user, "conns")
                fields = [x for conn_inc in snapshot[user].items() for x in conn_inc]
                commands.append(("HSET", key, *fields))
                commands.append(("EXPIRE", key, self.conns_ttl))
            commands.append(("SADD", self.keys.users_key(inc), *chunk))
            commands.append(("EXPIRE", self.keys.users_key(inc), self.conns_ttl))
            await self.link.commands("re-assert", commands)
        now = _now_ms()
        for user, conns in snapshot.items():
            for conn in conns:
                if (user, conn) not in self.local.conns and (user, conn) not in self.tombstones:
                    self.tombstone(user, conn, inc, now)
        await self.retry_tombstones()

    async def retry_tombstones(self) -> None:
        if not self.tombstones:
            return
        items = list(self.tombstones.items())[: self.reassert_chunk]
        calls = [self.prune_call(user, {conn: inc}, ts) for (user, conn), (inc, ts) in items]
        await self.link.scripts("detach", calls)
        for key, value in items:
            if self.tombstones.get(key) == value:
                del self.tombstones[key]

    async def heartbeat(self, inc: str, resync: Resync, gone: Gone | None) -> None:
        """run()'s beat, every ``heartbeat_interval``: refresh the key,
        re-assert when it was lost or every ``reassert_interval`` (then
        resync), else retry tombstones; then bury the dead."""
        last_reassert = trio.current_time()
        while True:
            await trio.sleep(self.heartbeat_interval)
            try:
                lost = await self.beat(inc)
                if lost or trio.current_time() - last_reassert >= self.reassert_interval:
                    if lost:
                        log.warning(
                            "redis lost this node's presence; re-asserting",
                            extra={"incarnation": inc},
                        )
                    await self.reassert(inc)
                    last_reassert = trio.current_time()
                    if lost:
                        resync()
                else:
                    await self.retry_tombstones()
                await self.bury_the_dead(inc, gone)
            except Unavailable as exc:
                # The subscriptions' keepalive notices a dead server; a slow
                # answer here only skips one beat.
                log.warning("redis heartbeat failed", extra={"reason": exc.message})

    # -- nodes that died ---------------------------------------------------------------------

    async def bury_the_dead(self, me: str, gone: Gone | None) -> None:
        """Find incarnations whose heartbeat expired; claim each (exactly one
        survivor wins), then announce its users who are online nowhere else."""
        horizon = _now_ms() - self.ttl_ms()
        [found] = await self.link.commands(
            "burial",
            [("ZRANGEBYSCORE", self.keys.incarnations_key(), "-inf", horizon, "WITHSCORES")],
        )
        beats = pairs(found)
        candidates = [inc for inc in beats if inc not in self.local.nodes]
        if not candidates:
            return
        alive = await self.link.commands(
            "burial", [("EXISTS", self.keys.heartbeat_key(inc)) for inc in candidates]
        )
        for inc, exists in zip(candidates, alive, strict=True):
            if exists:
                continue  # a clock apart from ours; it still beats
            [claimed] = await self.link.commands(
                "burial", [("SET", self.keys.burial_key(inc), me, "NX", "PX", 60_000)]
            )
            if claimed is None:
                continue  # another survivor buries it
            await self._bury(inc, int(float(beats[inc])), gone)

    async def _bury(self, inc: str, last_beat: int, gone: Gone | None) -> None:
        [users] = await self.link.commands("burial", [("SMEMBERS", self.keys.users_key(inc))])
        users = sorted(str(u) for u in users)
        log.warning(
            "node died; announcing its users offline",
            extra={"incarnation": inc, "users": len(users)},
        )
        departed: list[tuple[str, int]] = []
        for start in range(0, len(users), self.reassert_chunk):
            chunk = users[start : start + self.reassert_chunk]
            conns, seen = await self.read(chunk)
            live = await self.live_incarnations(
                {v for c in conns.values() for v in c.values()} - {inc}
            )
            calls = []
            for user in chunk:
                dead = {f: v for f, v in conns[user].items() if v not in live}
                if dead:
                    calls.append(self.prune_call(user, dead, last_beat))
                if not any(v in live for v in conns[user].values()):
                    departed.append((user, max(int(seen[user] or 0), last_beat)))
            if calls:
                await self.prune(calls)
        await self.link.commands(
            "burial",
            [("DEL", self.keys.users_key(inc)), ("ZREM", self.keys.incarnations_key(), inc)],
        )
        if gone is not None:
            for user, last_seen in departed:
                try:
                    gone(user, last_seen)
                except Exception:
                    log.exception("gone failed", extra={"user": user})
