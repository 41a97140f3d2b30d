"""The Broker port: presence, the owed queue per user, fan-out between
nodes, and the records it takes and gives. See :mod:`chatd.ports` for the
rules every port keeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from chatd.core.envelope import Envelope
from chatd.core.model import (
    Presence,
)


@dataclass(frozen=True, slots=True)
class Routed:
    """One item routed to ``user``: what the service hands the broker, and
    what the broker hands each node with a connection of ``user``
    (:data:`Deliver`).

    ``queued``: the item is also kept in the user's queue under ``key`` until
    settled, so the device must ack it (the frame carries ``key``).
    ``exclude``: a connection id that must not get the live copy (the one
    that sent it). ``envelope``: the payload decoded, if the caller has it:
    a broker hands it to local connections so they need not decode again
    (it is None once the item crossed a process).
    """

    user: str
    key: str
    payload: str
    queued: bool
    exclude: str | None = None
    envelope: Envelope | None = None


@dataclass(frozen=True, slots=True)
class Rotation:
    """What :meth:`Broker.refresh_rotate` did: ``rotated``, ``reused`` or
    ``unknown``; the family's user, and the id of the access token last
    issued in it (to revoke on reuse)."""

    outcome: str
    user: str | None = None
    token_id: str | None = None


@dataclass(frozen=True, slots=True)
class Taken:
    """What :meth:`Broker.take` gave."""

    granted: int
    #: Seconds until a token is there (0 when some were granted).
    retry_after: float


@dataclass(frozen=True, slots=True)
class QueueEntry:
    key: str
    payload: str
    #: When the entry entered the queue (ms since the epoch), if known.
    queued_at: int | None = None


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """One user's owed queue, as :meth:`Broker.queues` sees it."""

    user: str
    entries: int
    #: When the oldest entry entered the queue (ms since the epoch), if known.
    oldest_queued_at: int | None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live node (replica), as :meth:`Broker.nodes` sees it."""

    node: str
    #: The node's current process (``<node>#<token>`` for Redis).
    incarnation: str
    connections: int
    users: int
    #: Milliseconds since the node's last heartbeat (0 in one process; None
    #: when the node does not say).
    heartbeat_age_ms: int | None
    #: When this incarnation started serving (ms since the epoch), if known.
    started_at: int | None


#: Called by the broker, on the trio thread, for every item addressed to a
#: user with a connection on this node. Must not block.
Deliver = Callable[[Routed], None]

#: Called by the broker when live delivery to this node was interrupted and
#: is back (a lost subscription, a backend restart): items routed meanwhile
#: may not have arrived, so the service re-offers what is owed from the
#: store — to the users given, or to every local user when called without
#: them. Must not block.
Resync = Callable[..., None]

#: Called by the broker of one surviving node (exactly one) when another
#: node died without detaching its connections: for each user who was
#: online there and is online nowhere now, with the user's last-seen (ms).
#: The service announces them offline. Must not block.
Gone = Callable[[str, int], None]


class Broker(Protocol):
    """Presence, the owed queue per user, and fan-out to the nodes that hold
    a user's connections.

    Guarantees:

    * **Route or queue, atomically.** :meth:`route` does for every item, in
      one round trip to the backend for the whole batch: if ``owed``, keep
      the payload in the user's owed queue under ``key`` (once per key), and
      hand it to every node where the user has a connection. An item is
      never live-delivered without also being queued when it is owed.
    * **Owed until settled.** Queue entries leave only through
      :meth:`settle` — never on route, never on read. Reading the queue while
      items are routed loses none of them.
    * The queue is a cache of what the store knows; an implementation may
      bound it (dropping the oldest), because the store re-supplies.
    * **Presence**: :meth:`attach` / :meth:`detach` count a user's
      connections across all nodes; the first attach and the last detach are
      reported so that presence frames go out once. A node that dies without
      detaching disappears from presence within seconds (implementations
      with one process are exempt: they die with their connections).
    * :meth:`run` delivers inbound items for this node's users until
      cancelled; ``task_status.started()`` is called only once delivery is
      live. It survives its backend going away: it keeps retrying (with
      backoff, bounded memory) and calls ``resync`` once delivery is live
      again. Other methods raise Unavailable while the backend is away.
    * A broker is used inside ``async with broker:``: the block owns whatever
      tasks its connections need (an implementation may also take a nursery
      of the caller's).
    """

    async def __aenter__(self) -> Broker: ...

    async def __aexit__(self, *exc: object) -> object: ...

    async def run(
        self,
        node: str,
        deliver: Deliver,
        resync: Resync,
        *,
        gone: Gone | None = None,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None: ...

    async def route(self, items: Sequence[Routed]) -> None: ...

    def route_nowait(self, items: Sequence[Routed]) -> None:
        """:meth:`route` without waiting for the backend (the hot path uses
        it from the group commit's callbacks, which cannot wait): the items
        reach this node's own connections at once, and go to the backend in
        order with every call made after this one (a later :meth:`owed`
        sees them). If the backend is away now, or fails before it took
        them, the broker calls ``resync`` of every node it runs once it is
        back, so the store re-offers what is owed. Never raises."""
        ...

    async def queued(self, user: str) -> list[QueueEntry]:
        """The user's owed queue, oldest first."""
        ...

    async def settle(self, user: str, keys: Sequence[str]) -> None: ...

    def settle_nowait(self, user: str, keys: Sequence[str]) -> None:
        """:meth:`settle` without waiting, ordered like :meth:`route_nowait`.
        A settle that is lost only leaves a stale queue entry, which the
        next backlog drops. Never raises."""
        ...

    async def attach(self, user: str, node: str, conn: str) -> bool:
        """Register a connection; True when it is the user's first anywhere."""
        ...

    async def detach(self, user: str, node: str, conn: str, ts: int) -> bool:
        """Remove a connection; True when it was the user's last (then ``ts``
        becomes the user's last-seen)."""
        ...

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]: ...

    async def devices(self, user: str) -> int:
        """How many connections ``user`` has attached on live nodes."""
        ...

    async def revoke(self, token_id: str, until_ms: int) -> None:
        """Refuse the token ``token_id`` until ``until_ms`` (its expiry), on
        every node sharing this broker."""
        ...

    async def is_revoked(self, token_id: str) -> bool: ...

    async def refresh_begin(
        self, family: str, user: str, digest: str, token_id: str, until_ms: int
    ) -> None:
        """Remember a new refresh-token family: its user, the digest of the
        one valid refresh token, the id of the access token issued with it;
        forgotten at ``until_ms``."""
        ...

    async def refresh_rotate(
        self, family: str, digest: str, new_digest: str, new_token_id: str, until_ms: int
    ) -> Rotation:
        """Atomically, on every node: if ``digest`` is the family's valid
        refresh token, replace it by ``new_digest`` (outcome ``rotated``); if
        the family exists but ``digest`` is an older one, forget the family
        (outcome ``reused``: a copy was stolen or replayed); else ``unknown``."""
        ...

    async def refresh_end(self, family: str) -> None:
        """Forget a family (logout)."""
        ...

    async def take(self, bucket: str, want: int, rate: float, burst: int) -> Taken:
        """A token bucket shared by every node on this broker: ``bucket``
        refills at ``rate`` tokens per second up to ``burst`` (starting
        full). Takes up to ``want`` tokens (fewer if fewer are there) and
        answers how many, and when none were, the seconds until one is."""
        ...

    # -- administration (chatctl) ------------------------------------------------

    async def queues(self) -> list[QueueInfo]:
        """Every user with a non-empty owed queue: entries and the oldest
        entry's arrival. May scan the backend."""
        ...

    async def enqueue(self, user: str, items: Sequence[QueueEntry]) -> int:
        """Queue ``items`` as owed to ``user``, in order, without live delivery
        (once per key: a key already queued keeps its payload and place; the
        queue's bound applies). Returns how many keys were new."""
        ...

    async def purge(self, user: str) -> int:
        """Empty the user's owed queue; returns how many entries it held. The
        store still records what is owed, so nothing is lost but the fast path."""
        ...

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes: those running :meth:`run` whose heartbeat is fresh,
        with their local connection and user counts, by node name."""
        ...

    async def online_users(self) -> dict[str, Presence]:
        """Every user with a connection on a live node, by name. May scan."""
        ...

    async def ping(self) -> None:
        """Raise Unavailable unless the backend answers."""
        ...

    async def aclose(self) -> None: ...
