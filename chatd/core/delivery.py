"""Delivery rules: who gets what, what is owed, how receipts move.

Plain functions and tables; the service calls them and the store applies
:func:`apply_mark` inside its own transaction, so the rule lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatd.core.errors import BadRequest, Forbidden
from chatd.core.frames import Send
from chatd.core.model import ReceiptKey, Status
from chatd.core.names import (
    dm_id,
    dm_members,
    is_conversation_id,
    normalize_username,
    rid,
)

# --- receipts -----------------------------------------------------------------


class ReceiptState:
    """Where one (message, member) pair is: NEW → DELIVERED → SEEN."""

    NEW = "new"
    DELIVERED = "delivered"
    SEEN = "seen"


#: (state, reported status) → (next state, receipts it produces, in order).
#: ``seen`` implies delivered: a member who reports seen first yields both.
RECEIPT_TRANSITIONS: dict[tuple[str, Status], tuple[str, tuple[Status, ...]]] = {
    (ReceiptState.NEW, Status.DELIVERED): (ReceiptState.DELIVERED, (Status.DELIVERED,)),
    (ReceiptState.NEW, Status.SEEN): (ReceiptState.SEEN, (Status.DELIVERED, Status.SEEN)),
    (ReceiptState.DELIVERED, Status.DELIVERED): (ReceiptState.DELIVERED, ()),
    (ReceiptState.DELIVERED, Status.SEEN): (ReceiptState.SEEN, (Status.SEEN,)),
    (ReceiptState.SEEN, Status.DELIVERED): (ReceiptState.SEEN, ()),
    (ReceiptState.SEEN, Status.SEEN): (ReceiptState.SEEN, ()),
}


def receipt_state(delivered_ts: int | None, seen_ts: int | None) -> str:
    if seen_ts is not None:
        return ReceiptState.SEEN
    if delivered_ts is not None:
        return ReceiptState.DELIVERED
    return ReceiptState.NEW


def apply_mark(
    delivered_ts: int | None, seen_ts: int | None, status: Status, ts: int
) -> tuple[int | None, int | None, tuple[Status, ...]]:
    """Apply a member's report; returns the new timestamps and the receipts made."""
    _, produced = RECEIPT_TRANSITIONS[(receipt_state(delivered_ts, seen_ts), status)]
    for made in produced:
        if made is Status.DELIVERED:
            delivered_ts = ts
        else:
            seen_ts = ts
    return delivered_ts, seen_ts, produced


#: Acking a receipt settles these: a seen receipt supersedes the delivered one.
SETTLED_BY_ACK: dict[Status, tuple[Status, ...]] = {
    Status.DELIVERED: (Status.DELIVERED,),
    Status.SEEN: (Status.SEEN, Status.DELIVERED),
}


def settled_rids(key: ReceiptKey) -> list[str]:
    """Every rid that acking ``key`` settles."""
    return [rid(key.message_id, key.member, s) for s in SETTLED_BY_ACK[key.status]]


# --- sending ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where a ``send`` goes. ``peer`` is set for a one-to-one conversation."""

    conversation: str
    peer: str | None


def target_of(frame: Send, sender: str) -> Target:
    """Resolve a send's destination without I/O.

    Raises BadRequest for a malformed name or id, Forbidden for a one-to-one
    conversation that does not include the sender. Membership of groups is
    checked by the service against the store.
    """
    if frame.to is not None:
        try:
            peer = normalize_username(frame.to)
        except BadRequest as exc:
            raise exc.with_cid(frame.cid) from None
        if peer == sender:
            raise BadRequest("cannot send a direct message to yourself", cid=frame.cid)
        return Target(conversation=dm_id(sender, peer), peer=peer)
    conversation = frame.conversation or ""
    if not is_conversation_id(conversation):
        raise BadRequest("'conversation' is not a conversation id", cid=frame.cid)
    pair = dm_members(conversation)
    if pair is not None:
        if sender not in pair:
            raise Forbidden("not a member of this conversation", cid=frame.cid)
        return Target(conversation=conversation, peer=pair[0] if pair[1] == sender else pair[1])
    return Target(conversation=conversation, peer=None)


def recipients(members: tuple[str, ...], sender: str) -> tuple[str, ...]:
    """Everyone a message is owed to: the members but the sender."""
    return tuple(m for m in members if m != sender)


# --- ordering -----------------------------------------------------------------

MESSAGE_ORDER = 0
EVENT_ORDER = 1
RECEIPT_ORDER = 2


def message_order(conversation: str, seq: int) -> tuple[int, str, int]:
    """Backlog order: messages per conversation in seq order, then events
    per conversation in eseq order (an event follows its message), then
    receipts."""
    return (MESSAGE_ORDER, conversation, seq)


def event_order(conversation: str, eseq: int) -> tuple[int, str, int]:
    return (EVENT_ORDER, conversation, eseq)


def receipt_order(ts: int, receipt_id: str) -> tuple[int, int, str]:
    return (RECEIPT_ORDER, ts, receipt_id)
