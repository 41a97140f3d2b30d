"""Plain records that cross the ports. Small, frozen, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    DELIVERED = "delivered"
    SEEN = "seen"


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


@dataclass(frozen=True, slots=True)
class Appended:
    """What the store answers for one :class:`NewMessage`.

    ``duplicate`` is true when (sender, cid) was already stored: then ``id``,
    ``seq``, ``ts`` and ``conversation`` are the first message's.
    """

    id: str
    conversation: str
    seq: int
    ts: int
    duplicate: bool


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


@dataclass(frozen=True, slots=True)
class Mark:
    """``user`` reports ``status`` for message ``message_id``."""

    user: str
    message_id: str
    status: Status
    ts: int


@dataclass(frozen=True, slots=True)
class Transition:
    """A receipt that newly happened: ``member`` reached ``status`` at ``ts``."""

    message_id: str
    conversation: str
    sender: str
    member: str
    status: Status
    ts: int


@dataclass(frozen=True, slots=True)
class MarkResult:
    """What one :class:`Mark` did. ``known`` is False when the user is neither
    a recipient nor the sender of the message (or the id does not exist)."""

    transitions: tuple[Transition, ...]
    known: bool


@dataclass(frozen=True, slots=True)
class Receipt:
    """A receipt owed to the message's sender."""

    message_id: str
    conversation: str
    sender: str
    member: str
    status: Status
    ts: int


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
