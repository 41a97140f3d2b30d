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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from chatd.core.envelope import Envelope
from chatd.core.model import (
    Appended,
    Conversation,
    ConversationSummary,
    Device,
    Epoch,
    EpochShare,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMembership,
    NewMessage,
    Presence,
    Receipt,
    ReceiptKey,
    Sealed,
    StoredEvent,
    StoredMessage,
    User,
)


@dataclass(frozen=True, slots=True)
class UserDeleted:
    """What :meth:`Store.delete_user` did."""

    #: (message, user) pairs that were owed to the user and no longer are.
    messages_dropped: int
    #: Receipts owed to the user (as a sender) that were settled.
    receipts_settled: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    users: int
    disabled: int  # deleted ones included
    deleted: int
    conversations: int
    messages: int
    #: (message, recipient) pairs not yet delivered.
    owed_messages: int
    #: Receipts not yet acked by the message's sender.
    owed_receipts: int
    since: int
    messages_since: int
    delivered_since: int
    seen_since: int


@dataclass(frozen=True, slots=True)
class Reseal:
    """Replace a message's sealed body, if it is still ``expected``."""

    message_id: str
    expected: Sealed
    body: Sealed


@dataclass(frozen=True, slots=True)
class Writes:
    """Writes that arrived together, for one :meth:`Store.write`."""

    appends: Sequence[NewMessage] = ()
    marks: Sequence[Mark] = ()
    #: (sender, receipt) pairs, as for :meth:`Store.ack_receipts`.
    receipt_acks: Sequence[tuple[str, ReceiptKey]] = ()
    #: Reactions, edits and deletions (applied after the appends).
    events: Sequence[NewEvent] = ()
    #: (user, event id) pairs: one of the user's devices got the event.
    event_acks: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True, slots=True)
class Written:
    """What a :meth:`Store.write` did: one result per append, per mark and
    per event, in order."""

    appended: list[Appended]
    marked: list[MarkResult]
    events: list[EventResult] = field(default_factory=list)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock milliseconds since the Unix epoch (the wire's ``ts``)."""
        ...


def wall_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch: the one place that
    reads it (everything else takes a :class:`Clock`, or calls this)."""
    return time.time_ns() // 1_000_000


class SystemClock:
    """The real :class:`Clock`."""

    def now_ms(self) -> int:
        return wall_ms()


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
    * **Events** (reactions, edits, deletions: :class:`NewEvent`) are judged
      by :func:`chatd.core.events.judge` inside the transaction that applies
      them, against the message as it is then; a refused event changes
      nothing. An applied one gets the conversation's next ``eseq`` (1, 2,
      3 …, no gaps, apart from message seq), is idempotent by (actor, cid)
      like a message, and is owed to each of its recipients until acked
      (:meth:`owed_events`). A deletion erases the body (and the bodies of
      the message's queued edits: their owed records go), the message's
      reactions and its receipt rows; the message stays as a tombstone that
      keeps its seq.
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
        self,
        id: str,
        title: str | None,
        members: Sequence[str],
        ts: int,
        creator: str | None = None,
        e2e: bool = False,
    ) -> Conversation:
        """A new group; ``e2e``: end-to-end from its first message."""
        ...

    async def get_conversation(self, id: str) -> Conversation | None:
        """The conversation with its current members, admins and when each
        member who joined later may read from."""
        ...

    async def change_group(self, change: NewMembership) -> EventResult:
        """Judge (:func:`chatd.core.events.plan_membership`) and apply a
        change of a group's members, admins or title in one commit, against
        the group as it is then; record a ``members`` event with the next
        eseq, owed to every member before and after (``recipients``). A
        member added now may read from the next seq on. Refused: nothing
        changes. **Membership in the store is the authority**: an append or
        an event in a group is owed to the members at the moment it is
        stored (``Appended.recipients``, ``EventResult.recipients``), and a
        non-member's append is refused (``Appended.refused``)."""
        ...

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        """Every conversation the user is a member of, most recent activity first."""
        ...

    async def shares_conversation(self, a: str, b: str) -> bool: ...

    async def dm_peers(self, username: str) -> list[str]:
        """The other member of each one-to-one conversation of ``username``."""
        ...

    async def sent_id(self, sender: str, cid: str) -> str | None:
        """The id of the message ``sender`` stored under ``cid``, if any (a
        retry is answered with its first ``sent`` whatever changed since)."""
        ...

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        """Store a batch in one commit; one :class:`Appended` per item, in order."""
        ...

    async def history(
        self, conversation: str, before: int | None, limit: int, viewer: str | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages with seq < before (all if None), oldest first,
        and, with a ``viewer``, only what that member may read: from the seq
        at which they joined (nothing for a non-member). Filled
        in with ``delivered_to``, ``seen_by``, ``cid``, ``reply_to``, the edit
        fields, ``deleted`` and ``reactions`` filled in (deleted ones too:
        tombstones keep seq gap-free)."""
        ...

    async def get_messages(self, ids: Sequence[str]) -> list[StoredMessage]:
        """The stored messages among ``ids`` (deleted ones as tombstones),
        filled in as by :meth:`history`, by (conversation, seq)."""
        ...

    async def mark(self, batch: Sequence[Mark]) -> list[MarkResult]:
        """Apply delivered/seen reports in one commit; one result per item.

        A mark by a user who is not a recipient of the message (including an
        unknown id) changes nothing and answers ``known=False``; a mark by the
        message's own sender, or of a message deleted for everyone (the ack
        crossed the deletion), changes nothing and answers ``known=True``.
        """
        ...

    async def ack_receipts(self, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
        """Apply (sender, receipt) acks in one commit: each settles the receipt
        and what it supersedes (:data:`chatd.core.delivery.SETTLED_BY_ACK`).
        A key of a message the sender did not send is ignored."""
        ...

    async def write(self, writes: Writes) -> Written:
        """:meth:`append`, the events, :meth:`mark`, :meth:`ack_receipts` and
        the event acks of what arrived together, in that order, with the
        same results and guarantees. An event ack of an event not owed to
        that user is ignored. The
        service sends every write through here; a store that can (SQLite)
        does it in one transaction, so one commit serves a whole scheduler
        pass of sends, acks and seen reports. Durable on return."""
        ...

    async def owed_messages(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages not yet delivered to ``username``, ordered by
        (conversation, seq), starting after the (conversation, seq) ``after``."""
        ...

    async def owed_events(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredEvent]:
        """Up to ``limit`` events owed to ``username``, by (conversation,
        eseq), after the (conversation, eseq) ``after``. An ``edited`` event
        carries the message's current body."""
        ...

    async def owed_receipts(
        self, username: str, limit: int, after: tuple[str, str] | None = None
    ) -> list[Receipt]:
        """Receipts of ``username``'s messages not yet acked by ``username``.

        Pages by (message id, member) pairs: up to ``limit`` pairs after the
        pair ``after``, each giving its delivered and/or seen receipt, ordered
        by (message id, member, delivered before seen)."""
        ...

    # -- end-to-end devices ----------------------------------------------------------

    async def put_device(self, device: Device, limit: int) -> str:
        """Register ``device`` in one commit: ``created``; ``same`` when that
        id is registered with the same keys and self-signature (its name is
        updated); ``conflict`` when the id is taken with other keys, or was
        removed (a device's keys never change, a removed id stays taken);
        ``full`` when the user already has ``limit`` devices."""
        ...

    async def remove_device(self, user: str, device: str, ts: int) -> bool:
        """Tombstone a device (``removed_ts``); False if it is unknown or
        removed already."""
        ...

    async def devices(self, user: str) -> list[Device]:
        """The user's devices, removed ones included, oldest first."""
        ...

    async def contacts(self, username: str) -> list[str]:
        """Everyone who shares a conversation with ``username`` (not them)."""
        ...

    async def active_devices(self, users: Sequence[str]) -> list[str]:
        """The ids of the active (not removed) devices of ``users``."""
        ...

    # -- end-to-end epochs ---------------------------------------------------------

    async def put_epoch(
        self,
        conversation: str,
        epoch: str,
        user: str,
        device: str,
        shares: Mapping[str, str],
        ts: int,
    ) -> str:
        """Record epoch ``epoch`` of ``conversation`` as made by (``user``,
        ``device``) and add ``shares`` (recipient device -> sealed key) in one
        commit: ``created`` (a new epoch), ``added`` (an epoch of the same
        device: shares added; a share already there with the same value is
        kept), ``conflict`` (the epoch is another device's, or a recipient
        already has a different share). On ``conflict`` nothing changes."""
        ...

    async def get_epoch(self, conversation: str, epoch: str) -> Epoch | None:
        """The epoch with every device it has a share for."""
        ...

    async def epoch_shares(
        self, conversation: str, epochs: Sequence[str], devices: Sequence[str]
    ) -> list[EpochShare]:
        """The shares of ``epochs`` addressed to one of ``devices``, by epoch."""
        ...

    # -- administration (chatctl) ------------------------------------------------
    #
    # Not on the hot path; each may scan. They are safe to call while chatd
    # serves from any number of processes.

    async def list_users(self, after: str | None, limit: int) -> list[User]:
        """Up to ``limit`` users whose name sorts after ``after``, by name;
        disabled and deleted accounts included."""
        ...

    async def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable or enable an account.

        A disabled user cannot log in, and a token issued before is refused at
        its next use (``ChatService.authenticate`` reads the user each time).
        Nothing else changes: messages to them are stored and owed as before.
        Raises NotFound for an unknown user and Conflict for a deleted one.
        """
        ...

    async def delete_user(self, username: str) -> UserDeleted:
        """Delete an account and what is owed to and by it; keep everyone
        else's history.

        * The account stays as a tombstone: ``deleted`` and ``disabled``, its
          password hash erased, its name taken for good (a new account with
          the name would otherwise inherit old one-to-one conversations and
          be named as the sender of old messages).
        * Messages not yet delivered to the user stop being owed to them;
          receipts owed to the user are settled.
        * Conversations, memberships and every stored message stay, including
          the messages the user sent: other members' history is unchanged.

        Idempotent: deleting a deleted user clears again what was recorded as
        owed to or by them since. Raises NotFound for an unknown user.
        """
        ...

    async def stats(self, since: int) -> StoreStats:
        """Counts for operators; the ``*_since`` ones from ``since`` (ms) on.
        May scan messages and receipts."""
        ...

    async def count_by_key(self) -> dict[str, int]:
        """How many stored messages each key id seals (key ids in use only)."""
        ...

    async def messages_by_key(
        self, key_id: str, after: str | None, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages sealed with ``key_id`` whose id sorts after
        ``after``, by id (``delivered_to`` / ``seen_by`` not filled). Paging by
        id visits every such message once, also while others are appended."""
        ...

    async def reseal(self, batch: Sequence[Reseal]) -> list[bool]:
        """Replace bodies in one commit, each by compare-and-set: a message's
        body becomes ``body`` only if it still is ``expected`` (same key id,
        nonce and ciphertext); one bool per item, True where it was replaced.
        An unknown id answers False. Nothing else about the message changes."""
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
    that sent it). ``envelope``: the payload decoded, if the caller has it:
    a broker hands it to local connections so they need not decode again.
    """

    user: str
    key: str
    payload: str
    owed: bool
    exclude: str | None = None
    envelope: Envelope | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    """A routed item arriving at a node for one of its local users
    (``envelope``: the payload decoded, when it did not cross a process)."""

    user: str
    key: str
    payload: str
    owed: bool
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
class Owed:
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
Deliver = Callable[[Inbound], None]

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

    async def owed(self, user: str) -> list[Owed]:
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

    async def enqueue(self, user: str, items: Sequence[Owed]) -> int:
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
