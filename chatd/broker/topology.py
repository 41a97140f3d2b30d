"""Where the Redis broker's commands go: one server, the shards of a Redis
Cluster, or the master that Redis Sentinel names.

The broker asks a :class:`Topology` for the connection that serves a hash
slot (:mod:`chatd.broker.resp` computes slots; every key chatd writes
belongs to one user's slot or is a node key) and reports the redirections
Redis answers with (:func:`command_slot` says which slot a command goes to,
:func:`redirection` reads a reply that sends it elsewhere or later). Three
implementations, one per mode:

* :class:`Standalone` — one server; the slot does not matter.
* :class:`Cluster` — any node's address seeds discovery (``CLUSTER SLOTS``);
  a connection per master, made on first use; ``MOVED`` updates the slot's
  owner at once and schedules a full refresh, ``ASK`` sends that one command
  to the named node after ``ASKING``.
* :class:`Sentinel` — asks the sentinels for the master's address, checks
  the server says it is a master (``ROLE``), and asks again whenever the
  connection is lost (the sentinels may have promoted a replica).

:func:`parse_url` reads the modes' URLs (docs/redis.md):

* ``redis://…``, ``rediss://…``, ``unix://…`` — one server, or a cluster's
  seed;
* ``redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]``
  (``rediss+sentinel://`` for TLS to the master; ``?sentinel_password=…``
  when the sentinels have a password of their own).
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import trio

from chatd.broker import resp

SLOTS = 16384


class Mode(StrEnum):
    AUTO = "auto"
    STANDALONE = "standalone"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


class TopologyError(Exception):
    """Redis cannot be reached, or does not look as the mode says."""


class Attempts:
    """One attempt at a time at something that may fail (opening a
    connection, finding the servers). A caller that waited while an attempt
    failed fails with it at once (resp.ConnectionLost) rather than making
    an attempt of its own: during an outage, many callers wait for one
    attempt, not for one each in turn."""

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._failed_at = -math.inf
        self._failure = ""

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        asked = trio.current_time()
        async with self._lock:
            if self._failed_at > asked:
                raise resp.ConnectionLost(self._failure)
            try:
                yield
            except Exception as exc:
                self._failed_at = trio.current_time()
                self._failure = str(exc) or type(exc).__name__
                raise


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[resp.Address, ...]
    master: str
    #: How to log in to the master (and its replicas): credentials, db, TLS.
    server: resp.Address


def parse_url(url: str) -> resp.Address | SentinelTarget:
    """A server's address, or the sentinels and master a URL names. Raises
    ValueError."""
    parts = urlparse(url)
    if parts.scheme not in ("redis+sentinel", "rediss+sentinel"):
        return resp.Address.from_url(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError(f"no sentinels in {url!r}")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"no master name in {url!r} (redis+sentinel://h:p,h:p/master)")
    sentinel_password = query.get("sentinel_password")
    sentinels = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
        sentinels.append(
            resp.Address(host or hostport, int(port or 26379), password=sentinel_password)
        )
    server = resp.Address(
        tls=parts.scheme.startswith("rediss"),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=int(path[1]) if len(path) > 1 else int(query.get("db", 0)),
        verify=query.get("ssl_cert_reqs", "required").lower() != "none",
        ca_file=query.get("ssl_ca_certs"),
    )
    return SentinelTarget(tuple(sentinels), path[0], server)


#: Opens a logged-in connection to a server (the broker's: it knows the
#: scripts to load and the nursery to run it in).
Opener = Callable[[resp.Address], Awaitable[resp.Connection]]


class Topology:
    """The connections of one broker, by hash slot. Subclasses say where
    a slot lives; this class keeps one connection per server."""

    mode: Mode

    def __init__(self, opener: Opener) -> None:
        self._open = opener
        self._conns: dict[resp.Address, resp.Connection] = {}
        self._attempts: dict[resp.Address, Attempts] = {}

    # -- where a slot lives (subclasses) -----------------------------------------------

    def address_of(self, slot: int) -> resp.Address | None:
        """The server that serves ``slot`` as far as known (None: not known)."""
        raise NotImplementedError

    async def discover(self) -> None:
        """Learn (again) where every slot lives; raises TopologyError."""
        raise NotImplementedError

    def masters(self) -> list[resp.Address]:
        """Every server that holds part of the data (for scans)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """For operators (chatctl nodes, stats)."""
        raise NotImplementedError

    # -- connections ------------------------------------------------------------------

    def connection_now(self, slot: int) -> resp.Connection | None:
        """The live connection that serves ``slot``, if there is one now."""
        address = self.address_of(slot)
        if address is None:
            return None
        conn = self._conns.get(address)
        return conn if conn is not None and conn.alive else None

    async def connection(self, slot: int) -> resp.Connection:
        """The connection that serves ``slot``, made if needed; raises
        TopologyError or resp.ConnectionLost."""
        address = self.address_of(slot)
        if address is None:
            await self.discover()
            address = self.address_of(slot)
            if address is None:
                raise TopologyError(f"no server serves slot {slot}")
        return await self.connection_to(address)

    async def connection_to(self, address: resp.Address) -> resp.Connection:
        conn = self._conns.get(address)
        if conn is not None and conn.alive:
            return conn
        async with self._attempts.setdefault(address, Attempts()).turn():
            conn = self._conns.get(address)
            if conn is not None and conn.alive:
                return conn
            conn = await self._open(address)
            self._conns[address] = conn
            return conn

    #: Something said the map may be out of date: look again before the next use.
    stale = False

    def node_address(self, address: resp.Address) -> resp.Address:
        """A server named in a redirection, logged in like the others."""
        return address

    def moved(self, slot: int, address: resp.Address) -> None:
        """Redis said MOVED: ``slot`` lives at ``address`` now."""

    def lost(self, conn: resp.Connection) -> None:
        """A connection failed: the next use may need to look again."""

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def connections(self) -> list[resp.Connection]:
        return [c for c in self._conns.values() if c.alive]


class Standalone(Topology):
    mode = Mode.STANDALONE

    def __init__(self, opener: Opener, address: resp.Address) -> None:
        super().__init__(opener)
        self.address = address

    def address_of(self, slot: int) -> resp.Address | None:
        return self.address

    async def discover(self) -> None:
        self.stale = False
        await trio.lowlevel.checkpoint()

    def masters(self) -> list[resp.Address]:
        return [self.address]

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "server": str(self.address)}


def _address(host: Any, port: Any, template: resp.Address) -> resp.Address:
    """A cluster node's address, logged in like the seed."""
    return replace(template, host=str(host), port=int(port), path=None, db=0)


class Cluster(Topology):
    """A Redis Cluster seeded by ``seed``; slots from ``CLUSTER SLOTS``."""

    mode = Mode.CLUSTER

    def __init__(self, opener: Opener, seed: resp.Address) -> None:
        super().__init__(opener)
        self.seed = replace(seed, db=0)  # a cluster has one database
        self._slots: list[resp.Address | None] = [None] * SLOTS
        self._shards: list[dict[str, Any]] = []
        self._known: list[resp.Address] = [self.seed]
        self._discovering = trio.Lock()

    def address_of(self, slot: int) -> resp.Address | None:
        return self._slots[slot]

    async def discover(self) -> None:
        async with self._discovering:
            errors = []
            for address in [*self._known_masters(), *self._known]:
                try:
                    conn = await self.connection_to(address)
                    with trio.fail_after(2):
                        [slots] = await conn.call(("CLUSTER", "SLOTS"))
                except (resp.ConnectionLost, trio.TooSlowError, TopologyError) as exc:
                    errors.append(f"{address}: {exc}")
                    continue
                if isinstance(slots, resp.ReplyError):
                    raise TopologyError(f"{address} is not a cluster node: {slots}")
                self._load(slots, address)
                self.stale = False
                return
            raise TopologyError("no cluster node answers: " + "; ".join(errors))

    def _load(self, slots: list[Any], origin: resp.Address) -> None:
        # A node that does not know its own address names it "" (or "?"):
        # it is the one that was asked.
        def at(host: Any, port: Any) -> resp.Address:
            return _address(host if host not in ("", "?") else origin.host, port, self.seed)

        table: list[resp.Address | None] = [None] * SLOTS
        shards: dict[resp.Address, dict[str, Any]] = {}
        known: list[resp.Address] = []
        for start, end, master, *replicas in slots:
            address = at(master[0], master[1])
            for s in range(int(start), int(end) + 1):
                table[s] = address
            shard = shards.setdefault(
                address,
                {
                    "master": f"{address.host}:{address.port}",
                    "replicas": [f"{at(r[0], r[1]).host}:{r[1]}" for r in replicas],
                    "slots": 0,
                },
            )
            shard["slots"] += int(end) - int(start) + 1
            known += [address, *(at(r[0], r[1]) for r in replicas)]
        self._slots = table
        self._shards = sorted(shards.values(), key=lambda s: str(s["master"]))
        self._known = list(dict.fromkeys(known)) or self._known

    def _known_masters(self) -> list[resp.Address]:
        return list(dict.fromkeys(a for a in self._slots if a is not None))

    def masters(self) -> list[resp.Address]:
        return self._known_masters()

    def node_address(self, address: resp.Address) -> resp.Address:
        return _address(address.host, address.port, self.seed)

    def moved(self, slot: int, address: resp.Address) -> None:
        self._slots[slot] = self.node_address(address)
        self.stale = True

    def lost(self, conn: resp.Connection) -> None:
        self.stale = True

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "shards": self._shards}


class Sentinel(Topology):
    """The master that the sentinels of ``target`` name."""

    mode = Mode.SENTINEL

    def __init__(self, opener: Opener, target: SentinelTarget, connect_timeout: float) -> None:
        super().__init__(opener)
        self.target = target
        self.connect_timeout = connect_timeout
        self.master: resp.Address | None = None
        self._discovering = trio.Lock()

    def address_of(self, slot: int) -> resp.Address | None:
        return self.master

    async def discover(self) -> None:
        async with self._discovering:
            errors = []
            for sentinel in self.target.sentinels:
                try:
                    address = await self._ask(sentinel)
                except (resp.ConnectionLost, trio.TooSlowError, TopologyError) as exc:
                    errors.append(f"{sentinel}: {exc}")
                    continue
                if address is None:
                    errors.append(f"{sentinel}: does not know {self.target.master!r}")
                    continue
                # The sentinels may lag: the server itself must say master.
                conn = await self.connection_to(address)
                with trio.fail_after(2):
                    [role] = await conn.call(("ROLE",))
                if isinstance(role, list) and role and role[0] == "master":
                    if self.master is not None and self.master != address:
                        old = self._conns.pop(self.master, None)
                        if old is not None:
                            old.close()
                    self.master = address
                    self.stale = False
                    return
                errors.append(f"{sentinel}: names {address}, which is not a master yet")
            raise TopologyError("no master from the sentinels: " + "; ".join(errors))

    async def _ask(self, sentinel: resp.Address) -> resp.Address | None:
        conn = await resp.Connection.open(
            sentinel, connect_timeout=self.connect_timeout, reply_timeout=2.0, name="sentinel"
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                hello: list[resp.Command] = []
                if sentinel.password is not None:
                    hello.append(("AUTH", sentinel.password))
                hello.append(("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.target.master))
                with trio.fail_after(2):
                    *_, reply = await conn.call(*hello)
            finally:
                conn.close()
        if isinstance(reply, resp.ReplyError):
            raise TopologyError(str(reply))
        if not reply:
            return None
        return replace(self.target.server, host=str(reply[0]), port=int(reply[1]))

    def masters(self) -> list[resp.Address]:
        return [self.master] if self.master is not None else []

    def lost(self, conn: resp.Connection) -> None:
        # Ask the sentinels again before the next use.
        if self.master is not None and self._conns.get(self.master) is conn:
            self.master = None

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "master_name": self.target.master,
            "master": f"{self.master.host}:{self.master.port}" if self.master else None,
            "sentinels": [f"{s.host}:{s.port}" for s in self.target.sentinels],
        }


async def detect(url: str, mode: Mode, opener: Opener, *, connect_timeout: float) -> Topology:
    """The topology for ``url`` in ``mode`` (AUTO: a sentinel URL means
    Sentinel; otherwise ask the server whether it is a cluster node)."""
    target = parse_url(url)
    if isinstance(target, SentinelTarget):
        if mode not in (Mode.AUTO, Mode.SENTINEL):
            raise TopologyError(f"a redis+sentinel:// URL needs mode sentinel, not {mode}")
        topology: Topology = Sentinel(opener, target, connect_timeout)
    elif mode is Mode.SENTINEL:
        raise TopologyError("mode sentinel needs a redis+sentinel:// URL")
    elif mode is Mode.CLUSTER:
        topology = Cluster(opener, target)
    elif mode is Mode.STANDALONE:
        topology = Standalone(opener, target)
    else:
        probe = Standalone(opener, target)
        conn = await probe.connection_to(target)
        with trio.fail_after(2):
            [info] = await conn.call(("INFO", "cluster"))
        if isinstance(info, str) and "cluster_enabled:1" in info:
            topology = Cluster(opener, target)
            topology._conns[topology.seed] = conn
        else:
            topology = probe
    await topology.discover()
    return topology


# -- which slot a command goes to, and replies that send it elsewhere ---------------------

#: Error replies that mean "not here / not now": the command did not run.
_RETRY_PREFIXES = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY")

key_slot = functools.lru_cache(maxsize=1 << 16)(resp.hash_slot)

#: Commands without a key (any server answers them).
_KEYLESS = frozenset(("PING", "SCAN", "INFO", "CLUSTER", "ROLE", "COMMAND", "SCRIPT", "CLIENT"))


def command_slot(command: resp.Command) -> int:
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return key_slot(str(command[3])) if int(command[2]) else 0
    if name in _KEYLESS or len(command) < 2:
        return 0
    return key_slot(str(command[1]))


def redirection(reply: Any) -> tuple[str, int, resp.Address | None] | None:
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
