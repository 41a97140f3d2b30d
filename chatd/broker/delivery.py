"""Live delivery: ``run()`` for each node, and its subscriptions to its users' channels.

Owns :class:`Runner` — one session per node from subscribing to a loss
(subscribe every local user's channel, heartbeat and re-assert through
:mod:`chatd.broker.presence`, then ``resync``), started again with capped
exponential backoff — and :class:`Subscriptions`: a channel per local
user (``P:{u:<user>}:n:<incarnation>``, from :mod:`chatd.broker.keys`)
subscribed on the server of the user's slot (SSUBSCRIBE; SUBSCRIBE where
Redis has no sharded pub/sub), one connection per server, and the decoding
of what ROUTE publishes there into ``deliver`` calls.

Guarantees:

* ``run()`` never gives up; its ``task_status.started()`` comes only once
  the first subscription is live. After a lost session it subscribes
  first, then re-asserts presence, and only then calls ``resync``: an item
  routed after that point is published to us, anything earlier is
  re-offered from the store.
* A connection that fails or stops answering PING within ``op_timeout``
  (asked every ``heartbeat_interval``) breaks the whole session.
* A channel the server drops (its slot moved to another shard) or that
  could not be subscribed is subscribed again where it now lives, and its
  user resynced (items routed meanwhile were published where nobody
  listened).
* An undecodable message is logged and dropped; a failing ``deliver`` is
  logged and does not stop the others.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from chatd.broker import resp
from chatd.broker.keys import Keys
from chatd.broker.link import REDIRECT_LIMIT, Link
from chatd.broker.local import Local
from chatd.broker.presence import PresenceTracker
from chatd.broker.topology import Attempts, TopologyError, key_slot, redirection
from chatd.core.errors import Unavailable
from chatd.ports import Deliver, Gone, Resync, Routed

log = logging.getLogger("chatd.broker.redis")

_NOTHING = object()


def dispatch(message: list[Any], deliver: Deliver) -> None:
    """Hand the items of one published message to ``deliver``."""
    try:
        doc = orjson.loads(message[2])
        user = doc["u"]
        items = [
            Routed(user, str(key), str(payload), queued == "1", exclude or None)
            for key, payload, queued, exclude in doc["i"]
        ]
    except (ValueError, KeyError, TypeError, IndexError):
        log.error("dropping an undecodable broker message")
        return
    for item in items:
        try:
            deliver(item)
        except Exception:
            log.exception("deliver failed", extra={"user": item.user, "key": item.key})


class Subscriptions:
    """One node's live delivery while its run() is live (see the module docstring)."""

    def __init__(
        self,
        link: Link,
        keys: Keys,
        local: Local,
        inc: str,
        deliver: Deliver,
        resync: Resync,
        nursery: trio.Nursery,
        *,
        heartbeat_interval: float,
    ) -> None:
        self.link = link
        self.keys = keys
        self.local = local
        self.inc = inc
        self.deliver = deliver
        self.resync = resync
        self.nursery = nursery
        self.heartbeat_interval = heartbeat_interval
        self.conns: dict[resp.Address, resp.Connection] = {}
        self._attempts: dict[resp.Address, Attempts] = {}
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
        return self.link.sharded

    def wanted(self, user: str) -> bool:
        return self.inc in self.local.by_user.get(user, {}).values()

    def channel(self, user: str) -> str:
        return self.keys.user_channel(user, self.inc)

    def user_of(self, channel: str) -> str | None:
        return self.keys.user_of_channel(channel, self.inc)

    def break_(self, reason: str) -> None:
        if not self.broken.is_set() and not self.closed:
            self.reason = reason
            self.broken.set()

    def close(self) -> None:
        self.closed = True
        for conn in self.conns.values():
            conn.close()

    async def _connection(self, slot: int) -> resp.Connection:
        topo = await self.link.ready()
        address = topo.address_of(slot)
        if address is None:
            topo.stale = True
            topo = await self.link.ready()
            address = topo.address_of(slot)
            if address is None:
                raise Unavailable(f"redis unavailable: no server serves slot {slot}")
        conn = self.conns.get(address)
        if conn is not None and conn.alive:
            return conn
        try:
            async with self._attempts.setdefault(address, Attempts()).turn():
                conn = self.conns.get(address)
                if conn is not None and conn.alive:
                    return conn
                conn = await self.link.open("subscription", address, self.nursery)
                conn.on_push = self._push
                self.conns[address] = conn
                self.nursery.start_soon(self._watch_connection, conn, address)
                return conn
        except (resp.ConnectionLost, TopologyError) as exc:
            topo.stale = True  # a failover may have moved the slot: look again
            raise Unavailable(f"redis unavailable: {exc}") from None

    async def _watch_connection(self, conn: resp.Connection, address: resp.Address) -> None:
        await conn.done.wait()
        if not self.closed:
            topo = self.link.topology
            if topo is not None:
                topo.stale = True  # a failover may have moved its slots
            self.break_(f"subscription to {address} lost: {conn.error}")

    async def subscribe(self, users: Sequence[str]) -> None:
        """Subscribe the channels of ``users`` not subscribed yet, each on
        the server of its slot. Raises Unavailable (the users then wait in
        ``missing`` for :meth:`follow`)."""
        if self.closed:
            return  # this session ended: the next subscribes every local user, then resyncs
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
                    conn = await self._connection(key_slot(self.channel(user)))
                    groups.setdefault(conn, []).append(user)
                results = await resp.call_many(
                    [(c, [(command, self.channel(u)) for u in us]) for c, us in groups.items()]
                )
                again: list[str] = []
                for (conn, us), result in zip(groups.items(), results, strict=True):
                    if isinstance(result, BaseException):
                        raise Unavailable(f"redis unavailable (subscribe): {result}")
                    for user, reply in zip(us, result, strict=True):
                        redirect = redirection(reply)
                        if redirect is not None:
                            kind, slot, address = redirect
                            if kind == "MOVED" and address is not None:
                                topo = self.link.topology
                                if topo is None:
                                    raise Unavailable("the redis broker is closed")
                                topo.moved(slot, address)
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
            dispatch(message, self.deliver)
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
        delay = self.link.backoff_min
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0.05)  # the rest of a slot migration's drops
            users = sorted(u for u in self.missing if self.wanted(u))
            self.missing.clear()
            if not users:
                continue
            topo = self.link.topology
            if topo is not None:
                topo.stale = True
            try:
                await self.subscribe(users)
            except Unavailable as exc:
                log.warning("redis resubscribe failed; retrying", extra={"reason": exc.message})
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self.link.backoff_max, delay * 2)
                continue
            delay = self.link.backoff_min
            log.info("channels moved; resubscribed", extra={"users": len(users)})
            self.resync(users)

    async def watch(self) -> None:
        """Until the session breaks: raise ConnectionLost then. Every
        ``heartbeat_interval`` each connection must answer PING."""
        while True:
            with trio.move_on_after(self.heartbeat_interval):
                await self.broken.wait()
            if self.broken.is_set():
                raise resp.ConnectionLost(self.reason)
            for address, conn in list(self.conns.items()):
                try:
                    with trio.fail_after(self.link.op_timeout):
                        await conn.call(("PING",))
                except (resp.ConnectionLost, trio.TooSlowError) as exc:
                    raise resp.ConnectionLost(f"subscription to {address}: {exc}") from None


class Runner:
    """run() for each node this broker instance serves: its session (the
    subscriptions, the heartbeat), retried with backoff until cancelled."""

    def __init__(
        self,
        link: Link,
        keys: Keys,
        local: Local,
        presence: PresenceTracker,
        *,
        heartbeat_interval: float,
        backoff_min: float,
        backoff_max: float,
    ) -> None:
        self.link = link
        self.keys = keys
        self.local = local
        self.presence = presence
        self.heartbeat_interval = heartbeat_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        #: node -> the cancel scope of its run().
        self.running: dict[str, trio.CancelScope] = {}

    def cancel_all(self) -> None:
        for scope in list(self.running.values()):
            scope.cancel()

    async def run(
        self,
        node: str,
        inc: str,
        deliver: Deliver,
        resync: Resync,
        *,
        gone: Gone | None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        if node in self.running:
            raise RuntimeError(f"node '{node}' is already running on this broker")
        state = _RunState()
        backoff = self.backoff_min
        with trio.CancelScope() as scope:
            self.running[node] = scope
            self.local.serve(inc, deliver, resync, time.time_ns() // 1_000_000)
            try:
                while not self.link.closed:
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
                del self.running[node]
                self.local.leave(inc)

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
            subs = Subscriptions(
                self.link,
                self.keys,
                self.local,
                inc,
                deliver,
                resync,
                nursery,
                heartbeat_interval=self.heartbeat_interval,
            )
            self.local.subs[inc] = subs
            try:
                await self.link.ready()
                # Listening on every local user's channel first: anything
                # routed from now on reaches us. Then our presence back (Redis
                # may have lost it), then re-offer what may have been missed.
                await subs.subscribe(self.local.users_of(inc))
                await self.presence.beat(inc)
                await self.presence.reassert(inc)
                state.live_since = trio.current_time()
                if not state.started:
                    state.started = True
                    task_status.started()
                else:
                    log.info("redis subscription back; resync", extra={"incarnation": inc})
                    resync()
                nursery.start_soon(self.presence.heartbeat, inc, resync, gone)
                nursery.start_soon(subs.follow)
                await subs.watch()
            finally:
                if self.local.subs.get(inc) is subs:
                    del self.local.subs[inc]
                subs.close()
                nursery.cancel_scope.cancel()


class _RunState:
    def __init__(self) -> None:
        self.started = False
        self.live_since: float | None = None


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
