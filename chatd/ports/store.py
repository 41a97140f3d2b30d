"""The Store port: the durable record (users, conversations, messages,
receipts, events, end-to-end devices and epochs), and the records it takes
and gives. See :mod:`chatd.ports` for the rules every port keeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chatd.core.model import (
    Appended,
    Conversation,
    ConversationSummary,
    Device,
    Epoch,
    EpochCheck,
    EpochShare,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMembership,
    NewMessage,
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


class Store(Protocol):
    """The durable record: users, conversations, messages and their receipts.

    Guarantees:

    * **Durable on return.** When :meth:`append` returns, every message in the
      batch is committed; a crash after that loses none of them.
    * **seq** is per conversation, 1, 2, 3 … with no gaps and no repeats, even
      when several processes append to the same conversation at once.
    * **Idempotent by (sender, cid).** Appending a (sender, cid) pair that is
      already stored stores nothing and answers the first message's id, seq,
      ts and conversation with ``duplicate=True`` (also within one batch),
      with that message as stored (``Appended.message``: its body and
      ``reply_to``, not the retry's) and, as ``recipients``, the members it
      is still owed to (not yet delivered; none once it is deleted): the
      call that stored it may have stopped before it routed it, and the
      retry routes it again. Read by the duplicate lookup itself, so a new
      message costs no extra read.
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
      nothing. That includes an edit's fit with its conversation's mode
      (:attr:`NewEvent.e2e`), as for appends: a plain edit in an end-to-end
      conversation is refused ``e2e_required``, an end-to-end edit in a
      plain one ``e2e_off`` (the service's view of the mode is only a
      hint). An applied one gets the conversation's next ``eseq`` (1, 2,
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
        already has a different share). On ``conflict`` nothing changes. The
        rule is :func:`chatd.core.e2e.judge_epoch_upload`, decided against
        the epoch as stored in that commit."""
        ...

    async def get_epoch(self, conversation: str, epoch: str) -> Epoch | None:
        """The epoch with every device it has a share for."""
        ...

    async def epoch_check(self, conversation: str, epoch: str, users: Sequence[str]) -> EpochCheck:
        """:meth:`get_epoch` and :meth:`active_devices` of ``users`` in one
        read (one round trip): what an end-to-end send is checked against,
        as stored now."""
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
