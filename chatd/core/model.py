"""Plain records that cross the ports. Small, frozen, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    DELIVERED = "delivered"
    SEEN = "seen"


class EventKind(StrEnum):
    """What a member did to a stored message (an *event*: owed like a message)."""

    REACTION = "reaction"
    EDITED = "edited"
    DELETED = "deleted"
    #: A group's members, admins or title changed (no message concerned).
    MEMBERS = "members"


class GroupAction(StrEnum):
    """What a :class:`NewMembership` does to a group."""

    ADD = "add"
    REMOVE = "remove"
    LEAVE = "leave"
    RENAME = "rename"
    PROMOTE = "promote"  # make admins
    DEMOTE = "demote"


@dataclass(frozen=True, slots=True)
class Sealed:
    """A message body encrypted at rest: AES-256-GCM under key ``key_id``."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str
    created_ts: int
    last_seen: int | None = None
    disabled: bool = False
    #: A deleted account: always disabled too; its name stays taken so that
    #: old messages never point at a different person (Store.delete_user).
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    kind: str  # "dm" or "group"
    members: tuple[str, ...]
    title: str | None
    created_ts: int
    #: Who made a group (None for one-to-one conversations and old groups).
    created_by: str | None = None
    #: A group's admins (they change its members and title, and may delete
    #: other members' messages). A group without admins (made before they
    #: existed) is managed by all its members.
    admins: tuple[str, ...] = ()
    #: (member, the first seq they may read) for members who joined a group
    #: after it began (everyone else reads from seq 1).
    joined: tuple[tuple[str, int], ...] = ()
    #: End-to-end (issue 12): messages carry an ``e2e`` object the server
    #: cannot read, never a plain body. One way: never switched back.
    e2e: bool = False

    def visible_from(self, user: str) -> int:
        """The first seq ``user`` may read."""
        return dict(self.joined).get(user, 1)


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: str
    kind: str
    members: tuple[str, ...]
    title: str | None
    last_seq: int
    unread: int
    last_ts: int | None
    last_message: StoredMessage | None = None
    admins: tuple[str, ...] = ()
    #: (member, first seq they may read) for members who joined later.
    joined: tuple[tuple[str, int], ...] = ()
    e2e: bool = False


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store. ``seq`` is assigned by the store."""

    id: str
    conversation: str
    sender: str
    cid: str
    ts: int
    body: Sealed
    recipients: tuple[str, ...]
    #: The id of a message of the same conversation this one answers.
    reply_to: str | None = None
    #: An end-to-end message (``body`` seals its ``e2e`` object, see
    #: :mod:`chatd.core.e2e`): switches the conversation to end-to-end; a
    #: plain one in an end-to-end conversation is refused (``e2e_required``).
    e2e: bool = False


@dataclass(frozen=True, slots=True)
class Appended:
    """What the store answers for one :class:`NewMessage`.

    ``duplicate`` is true when (sender, cid) was already stored: then ``id``,
    ``seq``, ``ts`` and ``conversation`` are the first message's, ``message``
    is the first message as stored (what the retry carried is not used), and
    ``recipients`` are those who still owe it (not yet delivered to them):
    what routing it again must reach, since the call that stored it may have
    stopped before it routed it.
    """

    id: str
    conversation: str
    seq: int
    ts: int
    duplicate: bool
    #: Who the message is owed to, as the store decided in its transaction
    #: (a group's members at that moment, but the sender); None: as asked.
    #: For a duplicate: who still owes it (not yet delivered to them).
    recipients: tuple[str, ...] | None = None
    #: Set when the store refused the message; nothing was stored:
    #: ``forbidden`` (the sender is no longer a member of the group) or
    #: ``e2e_required`` (a plain body in an end-to-end conversation).
    refused: str | None = None
    #: A duplicate's first message as stored (its body, ``reply_to``, and
    #: ``deleted`` once deleted for everyone), read with the duplicate
    #: lookup; None for a message stored now, or refused.
    message: StoredMessage | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    conversation: str
    seq: int
    sender: str
    ts: int
    body: Sealed
    delivered_to: tuple[str, ...] = ()
    seen_by: tuple[str, ...] = ()
    #: The sender's own id for the message (shown only to the sender).
    cid: str | None = None
    reply_to: str | None = None
    #: When the body was last edited, and how many times.
    edited_ts: int | None = None
    edits: int = 0
    #: Deleted for everyone: the body is erased (``body`` is empty).
    deleted: bool = False
    #: (emoji, the users who reacted with it), by emoji (history only).
    reactions: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class Mark:
    """``user`` reports ``status`` for message ``message_id``."""

    user: str
    message_id: str
    status: Status
    ts: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """A receipt: ``member`` reached ``status`` for the message at ``ts``. A
    mark makes it (:class:`MarkResult`); it is owed to the message's sender
    until acked."""

    message_id: str
    conversation: str
    sender: str
    member: str
    status: Status
    ts: int


@dataclass(frozen=True, slots=True)
class MarkResult:
    """What one :class:`Mark` did: the receipts that newly happened. ``known``
    is False when the user is neither a recipient nor the sender of the
    message (or the id does not exist)."""

    transitions: tuple[Receipt, ...]
    known: bool


@dataclass(frozen=True, slots=True)
class ReceiptKey:
    message_id: str
    member: str
    status: Status


@dataclass(frozen=True, slots=True)
class Presence:
    online: bool
    nodes: tuple[str, ...]
    last_seen: int | None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A reaction, edit or deletion to store (see :class:`chatd.ports.Store`).

    ``recipients`` are owed the event (the conversation's members but the
    actor); ``window_ms`` bounds an edit's age; ``moderator`` lets the actor
    delete other members' messages (a group's creator, an operator).
    """

    id: str
    conversation: str
    kind: EventKind
    message_id: str
    by: str
    cid: str
    ts: int
    recipients: tuple[str, ...]
    emoji: str | None = None
    on: bool = True
    body: Sealed | None = None
    window_ms: int | None = None
    moderator: bool = False
    #: An end-to-end edit (``body`` seals its ``e2e`` object). The store
    #: judges an edit against its conversation's mode as stored: a plain
    #: one in an end-to-end conversation is refused ``e2e_required``, an
    #: end-to-end one in a plain conversation ``e2e_off``.
    e2e: bool = False


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored and delivered. ``eseq`` is its place in the
    conversation's own event sequence (1, 2, 3 … apart from message seq).
    ``body`` is the edited body (an ``edited`` event), else None."""

    id: str
    conversation: str
    eseq: int
    kind: EventKind
    message_id: str
    by: str
    ts: int
    emoji: str | None = None
    on: bool = True
    body: Sealed | None = None
    #: A ``members`` event: the action, the users it names, and the group
    #: after it (members, admins, title).
    action: str | None = None
    users: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()
    title: str | None = None


@dataclass(frozen=True, slots=True)
class NewMembership:
    """A change to a group by ``by``, judged and applied by the store
    (:func:`chatd.core.events.plan_membership`). The ``members`` event it
    makes is owed to every member before and after."""

    id: str
    conversation: str
    by: str
    ts: int
    action: GroupAction
    users: tuple[str, ...] = ()
    title: str | None = None


@dataclass(frozen=True, slots=True)
class EventResult:
    """What the store did with one :class:`NewEvent`.

    ``refused`` is the error code (``not_found``, ``forbidden``,
    ``bad_request``) of a refused event, or the end-to-end reason of a
    refused edit (``e2e_required``, ``e2e_off``: a ``bad_request`` with that
    reason), which changed nothing; otherwise
    ``event`` is the stored one (the first one when ``duplicate``).
    ``dropped`` lists the (user, queue key) entries a deletion made stale:
    the message and its events still owed to members, its receipts still
    owed to its sender.
    """

    event: StoredEvent | None
    duplicate: bool = False
    refused: str | None = None
    reason: str = ""
    dropped: tuple[tuple[str, str], ...] = ()
    #: Who the event is owed to, as the store decided (None: as asked).
    recipients: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """An end-to-end device of ``user``: its public keys (base64url, as
    registered), self-signed; ``removed_ts`` once it was removed (its id
    stays taken)."""

    user: str
    device: str
    sig_key: str
    dh_key: str
    name: str
    self_sig: str
    created_ts: int
    removed_ts: int | None = None


@dataclass(frozen=True, slots=True)
class Epoch:
    """An end-to-end epoch of a conversation: made by one sending device,
    whose key is sealed (one *share* each) to the devices ``recipients``."""

    conversation: str
    epoch: str
    user: str
    device: str
    recipients: tuple[str, ...]
    created_ts: int


@dataclass(frozen=True, slots=True)
class EpochCheck:
    """What an end-to-end send or edit is checked against, read at once:
    the epoch it names (None if there is none) and the active devices of
    the conversation's members, as the store holds them now."""

    epoch: Epoch | None
    active: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EpochShare:
    """One sealed epoch key, addressed to device ``to``."""

    epoch: str
    sender: str
    device: str
    to: str
    share: str
