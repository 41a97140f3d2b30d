"""What the store records as owed to a user, page by page, and how an owed
item is keyed and encoded for the broker's queue.

One place for both: the backlog (:meth:`ChatService.backlog`), ``chatctl
queue requeue`` and ``chatctl users show`` page the same way, and whatever
routes an item owed builds the same key and payload, so a requeued entry is
settled by the same ack as a routed one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from chatd.core.envelope import EventEnvelope, MessageEnvelope, ReceiptEnvelope, encode
from chatd.core.model import Receipt, StoredEvent, StoredMessage
from chatd.core.names import rid
from chatd.ports import Store


def queue_key(env: MessageEnvelope | EventEnvelope | ReceiptEnvelope) -> str:
    """The key an owed item is queued (and acked, and settled) under."""
    match env:
        case MessageEnvelope(message=m):
            return m.id
        case EventEnvelope(event=e):
            return e.id
        case ReceiptEnvelope(receipt=r):
            return rid(r.message_id, r.member, r.status)
    raise TypeError(f"not an owed envelope: {env!r}")


def message_item(m: StoredMessage) -> tuple[str, str, MessageEnvelope]:
    """(queue key, broker payload, the envelope it encodes) of an owed message."""
    env = MessageEnvelope(m)
    # The key queue_key gives, without its match (this runs per routed item).
    return m.id, encode(env), env


def receipt_item(r: Receipt) -> tuple[str, str, ReceiptEnvelope]:
    """(queue key, broker payload, the envelope it encodes) of an owed receipt."""
    env = ReceiptEnvelope(r)
    return rid(r.message_id, r.member, r.status), encode(env), env


def event_item(e: StoredEvent) -> tuple[str, str, EventEnvelope]:
    """(queue key, broker payload, the envelope it encodes) of an owed event."""
    env = EventEnvelope(e)
    return e.id, encode(env), env


def by_user(entries: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(user, queue key) pairs grouped per user: one settle per queue."""
    out: dict[str, list[str]] = {}
    for user, key in entries:
        out.setdefault(user, []).append(key)
    return out


async def message_pages(store: Store, user: str, page: int) -> AsyncIterator[list[StoredMessage]]:
    """Every message owed to ``user``, by conversation and seq, ``page`` at a time."""
    after: tuple[str, int] | None = None
    while True:
        got = await store.owed_messages(user, page, after)
        if got:
            yield got
        if len(got) < page:
            return
        after = (got[-1].conversation, got[-1].seq)


async def event_pages(store: Store, user: str, page: int) -> AsyncIterator[list[StoredEvent]]:
    """Every event owed to ``user``, by conversation and eseq, ``page`` at a time."""
    after: tuple[str, int] | None = None
    while True:
        got = await store.owed_events(user, page, after)
        if got:
            yield got
        if len(got) < page:
            return
        after = (got[-1].conversation, got[-1].eseq)


async def receipt_pages(store: Store, user: str, page: int) -> AsyncIterator[list[Receipt]]:
    """Every receipt owed to ``user``, paged by (message id, member) pairs."""
    after: tuple[str, str] | None = None
    while True:
        got = await store.owed_receipts(user, page, after)
        if got:
            yield got
        pairs = {(r.message_id, r.member) for r in got}
        if len(pairs) < page:
            return
        after = max(pairs)
