"""The ports: what the service needs from a store, a broker and a clock.

Each port states its guarantees here; every implementation must keep them,
and the contract suites in :mod:`chatd.testing` check them. The service only
ever talks to these protocols; one wiring switch (:mod:`chatd.wiring`) picks
the implementations.

Errors: an implementation raises :class:`chatd.core.errors.Unavailable` when
its backend does not answer, and :class:`chatd.core.errors.Conflict` /
``NotFound`` where a method says so. Nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from chatd.core.model import (
    Appended,
    Conversation,
    ConversationSummary,
    Mark,
    MarkResult,
    NewMessage,
    Presence,
    Receipt,
    ReceiptKey,
    StoredMessage,
    User,
)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock milliseconds since the Unix epoch (the wire's ``ts``)."""
        ...


class Store(Protocol):
    """The durable record: users, conversations, messages and their receipts.

    Guarantees:

    * **Durable on return.** When :meth:`append` returns, every message in the
      batch is committed; a crash after that loses none of them.
    * **seq** is per conversation, 1, 2, 3 … with no gaps and no repeats, even
      when several processes append to the same conversation at once.
    * **Idempotent by (sender, cid).** Appending a (sender, cid) pair that is
      already stored stores nothing and answers the first message's id, seq,
      ts and conversation with ``duplicate=True`` (also within one batch).
    * **Receipts are monotonic**: a (message, member) pair only moves
      NEW → DELIVERED → SEEN (:data:`chatd.core.delivery.RECEIPT_TRANSITIONS`);
      :meth:`mark` reports each move exactly once, however often or however
      concurrently the same mark is applied.
    * **Owed means unacked**: :meth:`owed_messages` lists every message a user
      is a recipient of and has not yet had delivered; :meth:`owed_receipts`
      every receipt of a user's messages that the user has not acked.
    * Bodies are stored as given (sealed); a store never sees plaintext.
    """

    async def create_user(self, user: User) -> None:
        """Add a user; raises Conflict if the name is taken."""
        ...

    async def get_user(self, username: str) -> User | None: ...

    async def set_last_seen(self, username: str, ts: int) -> None: ...

    async def ensure_dm(self, a: str, b: str, ts: int) -> Conversation:
        """The one-to-one conversation of a and b, created on first use."""
        ...

    async def create_group(
        self, id: str, title: str | None, members: Sequence[str], ts: int
    ) -> Conversation: ...

    async def get_conversation(self, id: str) -> Conversation | None: ...

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        """Every conversation the user is a member of, most recent activity first."""
        ...

    async def shares_conversation(self, a: str, b: str) -> bool: ...

    async def dm_peers(self, username: str) -> list[str]:
        """The other member of each one-to-one conversation of ``username``."""
        ...

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        """Store a batch in one commit; one :class:`Appended` per item, in order."""
        ...

    async def history(
        self, conversation: str, before: int | None, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with seq < before (all if None), oldest first,
        with ``delivered_to`` and ``seen_by`` filled in."""
        ...

    async def get_messages(self, ids: Sequence[str]) -> list[StoredMessage]: ...

    async def mark(self, batch: Sequence[Mark]) -> list[MarkResult]:
        """Apply delivered/seen reports in one commit; one result per item.

        A mark by a user who is not a recipient of the message (including an
        unknown id) changes nothing and answers ``known=False``; a mark by the
        message's own sender changes nothing and answers ``known=True``.
        """
        ...

    async def ack_receipts(self, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
        """Apply (sender, receipt) acks in one commit: each settles the receipt
        and what it supersedes (:data:`chatd.core.delivery.SETTLED_BY_ACK`).
        A key of a message the sender did not send is ignored."""
        ...

    async def owed_messages(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages not yet delivered to ``username``, ordered by
        (conversation, seq), starting after the (conversation, seq) ``after``."""
        ...

    async def owed_receipts(
        self, username: str, limit: int, after: tuple[str, str] | None = None
    ) -> list[Receipt]:
        """Receipts of ``username``'s messages not yet acked by ``username``.

        Pages by (message id, member) pairs: up to ``limit`` pairs after the
        pair ``after``, each giving its delivered and/or seen receipt, ordered
        by (message id, member, delivered before seen)."""
        ...

    async def ping(self) -> None:
        """Raise Unavailable unless the backend answers."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Routed:
    """One item for the broker to route to ``user``.

    ``owed``: keep it in the user's owed queue under ``key`` until settled.
    ``exclude``: a connection id that must not get the live copy (the one
    that sent it).
    """

    user: str
    key: str
    payload: str
    owed: bool
    exclude: str | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    """A routed item arriving at a node for one of its local users."""

    user: str
    key: str
    payload: str
    owed: bool
    exclude: str | None = None


@dataclass(frozen=True, slots=True)
class Owed:
    key: str
    payload: str


#: Called by the broker, on the trio thread, for every item addressed to a
#: user with a connection on this node. Must not block.
Deliver = Callable[[Inbound], None]

#: Called by the broker when live delivery to this node was interrupted and
#: is back (a lost subscription, a backend restart): items routed meanwhile
#: may not have arrived, so the service re-offers what is owed from the
#: store. Must not block.
Resync = Callable[[], None]


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
    """

    async def run(
        self,
        node: str,
        deliver: Deliver,
        resync: Resync,
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None: ...

    async def route(self, items: Sequence[Routed]) -> None: ...

    async def owed(self, user: str) -> list[Owed]:
        """The user's owed queue, oldest first."""
        ...

    async def settle(self, user: str, keys: Sequence[str]) -> None: ...

    async def attach(self, user: str, node: str, conn: str) -> bool:
        """Register a connection; True when it is the user's first anywhere."""
        ...

    async def detach(self, user: str, node: str, conn: str, ts: int) -> bool:
        """Remove a connection; True when it was the user's last (then ``ts``
        becomes the user's last-seen)."""
        ...

    async def presence(self, users: Sequence[str]) -> dict[str, Presence]: ...

    async def ping(self) -> None:
        """Raise Unavailable unless the backend answers."""
        ...

    async def aclose(self) -> None: ...
