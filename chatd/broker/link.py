"""The broker's way to Redis: topology, command connections, and calls.

Owns finding the servers (:mod:`chatd.broker.topology`: one server, a Redis
Cluster or Sentinel), opening and logging in connections
(:mod:`chatd.broker.resp`), and running commands and scripts on the server
of each one's slot — awaited (:meth:`Link.commands`, :meth:`Link.scripts`)
or sent without waiting (:meth:`Link.fire`).

Guarantees:

* An awaited call raises :class:`~chatd.core.errors.Unavailable` within
  ``op_timeout`` (at once when the server refuses connections); a command
  sent is never retried after a lost connection (it may have run). Only
  replies that say it did not run (``MOVED``, ``ASK``, ``TRYAGAIN``,
  ``CLUSTERDOWN``, ``LOADING``, ``MASTERDOWN``, ``READONLY``) are followed.
* Every script is loaded (``SCRIPT LOAD``) on each new command connection;
  a ``NOSCRIPT`` answer runs only the missing calls again with their source.
* Calls sent without waiting go out with the next write, in order with
  every later call. While there is no connection for them they wait (up to
  :data:`UNSENT_LIMIT`); if any may be lost, ``resync_all`` is called once
  Redis answers again, so the store re-offers what is owed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import trio

from chatd.broker import resp, topology
from chatd.broker.scripts import ROUTE_SCRIPT, SCRIPTS, Call, eval_source, evalsha, noscript
from chatd.broker.topology import Mode, Topology, TopologyError, command_slot, key_slot, redirection
from chatd.core.errors import Unavailable

log = logging.getLogger("chatd.broker.redis")

_NOTHING = object()
#: Calls sent without waiting that may wait for a connection (see Link.fire).
UNSENT_LIMIT = 10_000
#: Tries of a call that Redis answers with a redirection or "try again".
REDIRECT_LIMIT = 16


class _Pending:
    """Scripts sent without waiting that are not on a connection yet."""

    __slots__ = ("ask", "calls", "tries", "what")

    def __init__(
        self, what: str, calls: Sequence[Call], tries: int = 0, ask: resp.Address | None = None
    ) -> None:
        self.what = what
        self.calls = calls
        self.tries = tries
        self.ask = ask


class Link:
    """Where commands go and how they get there, for one broker instance."""

    def __init__(
        self,
        url: str,
        mode: Mode,
        token: str,
        *,
        op_timeout: float,
        connect_timeout: float,
        backoff_min: float,
        backoff_max: float,
        resync_all: Callable[[], None],
    ) -> None:
        self.url = url
        self.mode = mode
        self.token = token
        self.op_timeout = op_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        #: Called once Redis answers again after calls sent without waiting may be lost.
        self.resync_all = resync_all
        #: Where the connections' tasks run: the broker's (given, or its own).
        self.nursery: trio.Nursery | None = None
        self.closed = False
        #: Where commands go (made on first use: it asks the server or the sentinels).
        self.topology: Topology | None = None
        self._topology_attempts = topology.Attempts()
        #: SPUBLISH/SSUBSCRIBE (Redis >= 7.0) for live delivery; PUBLISH/SUBSCRIBE
        #: where the server has no sharded pub/sub (or this is False).
        self.sharded_allowed = True
        self.sharded = True
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

    def publish(self) -> str:
        """The command ROUTE publishes with."""
        return "SPUBLISH" if self.sharded else "PUBLISH"

    # -- where commands go -------------------------------------------------------------------

    async def ready(self) -> Topology:
        """The topology, found on first use and looked up again when stale;
        raises Unavailable."""
        topo = self.topology
        if topo is not None and not topo.stale:
            return topo
        try:
            async with self._topology_attempts.turn():
                if self.topology is None:
                    if self.closed:
                        raise Unavailable("the redis broker is closed")
                    self.topology = await topology.detect(
                        self.url,
                        self.mode,
                        self._open_commands,
                        connect_timeout=self.connect_timeout,
                    )
                elif self.topology.stale:
                    await self.topology.discover()
                return self.topology
        except (TopologyError, resp.ConnectionLost, trio.TooSlowError) as exc:
            raise Unavailable(f"redis unavailable: {exc}") from None

    async def connection_for(self, topo: Topology, slot: int) -> resp.Connection:
        try:
            return await topo.connection(slot)
        except (TopologyError, resp.ConnectionLost, trio.TooSlowError) as exc:
            topo.stale = True  # a failover may have moved the slot: look again next time
            raise Unavailable(f"redis unavailable: {exc}") from None

    async def connection_to(self, topo: Topology, address: resp.Address) -> resp.Connection:
        try:
            return await topo.connection_to(topo.node_address(address))
        except (TopologyError, resp.ConnectionLost, trio.TooSlowError) as exc:
            topo.stale = True
            raise Unavailable(f"redis unavailable: {exc}") from None

    async def _open_commands(self, address: resp.Address) -> resp.Connection:
        return await self.open("commands", address)

    async def open(
        self, what: str, address: resp.Address, nursery: trio.Nursery | None = None
    ) -> resp.Connection:
        """A new connection to ``address``, logged in, its tasks in ``nursery``
        (default: the broker's). Raises resp.ConnectionLost when the server
        cannot be reached and TopologyError when it refuses us."""
        if self.closed:
            raise TopologyError("the redis broker is closed")
        nursery = nursery or self.nursery
        if nursery is None:
            raise RuntimeError("use the RedisBroker as `async with broker:` (or pass nursery=)")
        conn = await resp.Connection.open(
            address,
            connect_timeout=self.connect_timeout,
            reply_timeout=self.op_timeout,
            name=f"{what}-{self.token}",
        )
        try:
            await nursery.start(conn.run)
        except RuntimeError as exc:  # the nursery closed meanwhile (a session that ended)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.stream.aclose()
            raise resp.ConnectionLost(f"no nursery for the connection: {exc}") from None
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
            self.sharded = self.sharded_allowed and bool(replies[-1] and replies[-1][0])
        return conn

    async def close(self) -> None:
        """Close every connection and wait (a little) for their tasks to end."""
        self.closed = True
        topo, self.topology = self.topology, None
        if topo is not None:
            conns = topo.connections()
            topo.close()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for conn in conns:
                    await conn.done.wait()

    # -- awaited calls -----------------------------------------------------------------------

    async def commands(self, what: str, commands: Sequence[resp.Command]) -> list[Any]:
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
            topo = await self.ready()
            groups: dict[resp.Connection, list[int]] = {}
            for i in todo:
                if i in ask:
                    conn = await self.connection_to(topo, ask[i])
                else:
                    conn = await self.connection_for(topo, command_slot(commands[i]))
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
            results = await resp.call_many(batches)
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
                    redirect = redirection(reply)
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
            if isinstance(reply, resp.ReplyError) and not noscript(reply):
                log.error("redis %s failed: %s", what, reply)
                raise Unavailable(f"redis error ({what}): {reply}")
        return replies

    async def scripts(self, what: str, calls: Sequence[Call]) -> list[Any]:
        """Run scripts in one round trip per server (a second one only after
        Redis lost its script cache); results in order."""
        if not calls:
            return []
        replies = await self.commands(what, [evalsha(c) for c in calls])
        missing = [i for i, r in enumerate(replies) if noscript(r)]
        if missing:
            again = await self.commands(what, [eval_source(calls[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def scan(self, what: str, pattern: str) -> list[str]:
        """Every key matching ``pattern`` on every master: SCAN, one bounded
        round trip per step (never KEYS, which blocks the server)."""
        topo = await self.ready()
        found: list[str] = []
        for master in topo.masters():
            conn = await self.connection_to(topo, master)
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

    async def ping(self) -> None:
        """Every master answers PING, or Unavailable."""
        topo = await self.ready()
        commands: list[resp.Command] = [("PING",)]
        replies = await resp.call_many(
            [(await self.connection_to(topo, m), commands) for m in topo.masters()]
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise Unavailable(f"redis unavailable (ping): {reply}")

    # -- sending without waiting -------------------------------------------------------------

    def fire(self, what: str, calls: Sequence[Call]) -> None:
        """Send scripts without waiting for them (see Broker.route_nowait):
        on the connection of each script's slot if it is up and nothing sent
        earlier still waits; otherwise behind what waits."""
        topo = self.topology
        if topo is not None and not self._unsent and not topo.stale:
            if topo.mode is not Mode.CLUSTER:
                conn = topo.connection_now(0)
                if conn is not None:
                    self._submit(conn, what, calls)
                    return
            else:
                groups: dict[resp.Connection, list[Call]] = {}
                for call in calls:
                    conn = topo.connection_now(key_slot(call[1][0]))
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
        calls: Sequence[Call],
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
                if noscript(reply):
                    missing.append(call)
                elif (redirect := redirection(reply)) is not None:
                    again.append((call, redirect))
                elif isinstance(reply, resp.ReplyError):
                    log.error("redis %s failed: %s", what, reply)
            if missing:  # Redis lost its scripts (SCRIPT FLUSH): again, with the source
                try:
                    conn.submit([eval_source(c) for c in missing], lambda r: None)
                except resp.ConnectionLost as exc:
                    self._lost(what, str(exc), conn)
            if again:
                self._redirect(conn, what, again, tries)

        commands = [evalsha(c) for c in calls]
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
        calls: list[tuple[Call, tuple[str, int, resp.Address | None]]],
        tries: int,
    ) -> None:
        """Scripts Redis did not run there (MOVED, ASK) or then (TRYAGAIN,
        CLUSTERDOWN, READONLY…): send them again, behind what waits."""
        topo = self.topology
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
        if conn is not None and self.topology is not None:
            self.topology.lost(conn)
        self._failed_conn = conn
        self._resync_when_connected = True
        self._start_flush()

    def _start_flush(self) -> None:
        if not self._flushing and self.nursery is not None and not self.closed:
            self._flushing = True
            self.nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        """Send what waits, once Redis answers (with backoff); then resync if
        something sent without waiting was lost."""
        delay = self.backoff_min
        try:
            while not self.closed and (self._unsent or self._resync_when_connected):
                try:
                    if any(p.tries for p in self._unsent):
                        await trio.sleep(0.01 * max(p.tries for p in self._unsent))
                    await self._drain()
                    if not self._unsent and self._resync_when_connected:
                        # Connected again (the drain found a connection for
                        # everything): what was lost is re-offered.
                        topo = await self.ready()
                        await self.connection_for(topo, 0)
                        self._resync_when_connected = False
                        log.info("redis connection back; resync")
                        self.resync_all()
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
                topo = await self.ready()
                # First every connection they need (this may wait, and more
                # may be added meanwhile)...
                targets: list[resp.Connection | list[resp.Connection]] = []
                for pending in list(self._unsent):
                    if pending.ask is not None:
                        targets.append(await self.connection_to(topo, pending.ask))
                    else:
                        targets.append(
                            [
                                await self.connection_for(topo, key_slot(c[1][0]))
                                for c in pending.calls
                            ]
                        )
                # ...then all of them submitted without a pause, in order.
                batch, self._unsent = self._unsent[: len(targets)], self._unsent[len(targets) :]
                publish = self.publish()
                for pending, target in zip(batch, targets, strict=True):
                    for script, _keys, args in pending.calls:
                        if script is ROUTE_SCRIPT:
                            args[5] = publish  # built before the server was known
                    if isinstance(target, resp.Connection):
                        self._submit(target, pending.what, pending.calls, pending.tries, True)
                        continue
                    groups: dict[resp.Connection, list[Call]] = {}
                    for call, conn in zip(pending.calls, target, strict=True):
                        groups.setdefault(conn, []).append(call)
                    for conn, calls in groups.items():
                        self._submit(conn, pending.what, calls, pending.tries)
