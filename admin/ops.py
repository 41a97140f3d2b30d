"""What chatctl does, as async functions on the ports: no click, no printing.

Each function takes the store, the broker and/or the keyring it needs and
returns plain data (dicts and lists, JSON-ready) that :mod:`admin.cli`
prints as JSON or, for people, with :mod:`admin.text`. Nothing here
touches a Redis key or a table directly: everything goes through
:class:`chatd.ports.Store` and :class:`chatd.ports.Broker`, so chatctl
works on every implementation and against a live cluster.
"""

from __future__ import annotations

from typing import Any

import trio

from admin.keys import list_keys, reencrypt, save_keyring  # noqa: F401 - chatctl calls them as ops.*
from chatd import crypto, queue_items
from chatd.auth import Passwords, check_password
from chatd.core.e2e import parse_stored
from chatd.core.envelope import (
    EventEnvelope,
    KickEnvelope,
    MessageEnvelope,
    PresenceEnvelope,
    ReceiptEnvelope,
    TypingEnvelope,
    decode,
    encode,
)
from chatd.core.errors import BadRequest, Forbidden, NotFound
from chatd.core.ids import UlidFactory
from chatd.core.model import EventKind, NewEvent, StoredMessage, User
from chatd.core.names import normalize_username
from chatd.ports import Broker, QueueEntry, Routed, Store, SystemClock, Writes

#: Who a deletion by an operator is ``by`` on the wire: not a valid username,
#: so it can never be mistaken for a member.
OPERATOR = "@operator"

PAGE = 500

#: chatctl's clock (milliseconds since the epoch), the one chatd's service uses.
clock = SystemClock()


def username(name: str) -> str:
    """A valid, case-folded username; NotFound for a name that cannot exist."""
    try:
        return normalize_username(name)
    except BadRequest:
        raise NotFound(f"no user '{name}' (not a valid username)") from None


def status_of(user: User) -> str:
    return "deleted" if user.deleted else "disabled" if user.disabled else "active"


async def need_user(store: Store, name: str) -> User:
    user = await store.get_user(username(name))
    if user is None:
        raise NotFound(f"no user '{name}'")
    return user


# -- users ---------------------------------------------------------------------------


async def list_users(store: Store, broker: Broker | None) -> list[dict[str, Any]]:
    users: list[User] = []
    after: str | None = None
    while page := await store.list_users(after, PAGE):
        users.extend(page)
        after = page[-1].username
    presence = {}
    if broker is not None:
        for start in range(0, len(users), PAGE):
            chunk = [u.username for u in users[start : start + PAGE]]
            presence.update(await broker.presence(chunk))
    out = []
    for u in users:
        p = presence.get(u.username)
        seen = [t for t in (u.last_seen, p.last_seen if p else None) if t is not None]
        out.append(
            {
                "username": u.username,
                "status": status_of(u),
                "created_ts": u.created_ts,
                "last_seen": max(seen) if seen else None,
                "online": None if p is None else p.online,
                "nodes": None if p is None else list(p.nodes),
            }
        )
    return out


async def count_owed(store: Store, name: str) -> tuple[int, int]:
    """(messages, receipts) the store records as owed to ``name``."""
    messages = sum([len(p) async for p in queue_items.message_pages(store, name, PAGE)])
    receipts = sum([len(p) async for p in queue_items.receipt_pages(store, name, PAGE)])
    return messages, receipts


async def show_user(store: Store, broker: Broker | None, name: str) -> dict[str, Any]:
    user = await need_user(store, name)
    messages, receipts = await count_owed(store, user.username)
    presence: dict[str, Any] | None = None
    queue: int | None = None
    seen = [user.last_seen] if user.last_seen is not None else []
    if broker is not None:
        p = (await broker.presence([user.username]))[user.username]
        presence = {"online": p.online, "nodes": list(p.nodes), "last_seen": p.last_seen}
        queue = len(await broker.queued(user.username))
        if p.last_seen is not None:
            seen.append(p.last_seen)
    return {
        "username": user.username,
        "status": status_of(user),
        "created_ts": user.created_ts,
        "last_seen": max(seen) if seen else None,
        "presence": presence,
        "owed": {"messages": messages, "receipts": receipts, "queue_entries": queue},
        "conversations": [
            {
                "id": c.id,
                "kind": c.kind,
                "title": c.title,
                "members": list(c.members),
                "last_seq": c.last_seq,
                "last_ts": c.last_ts,
                "unread": c.unread,
            }
            for c in await store.conversations_of(user.username)
        ],
    }


async def create_user(store: Store, name: str, password: str) -> dict[str, Any]:
    name = normalize_username(name)  # BadRequest: a usage error
    check_password(password)  # BadRequest: a usage error
    pw_hash = await trio.to_thread.run_sync(Passwords().hash, password)
    user = User(name, pw_hash, clock.now_ms())
    await store.create_user(user)  # Conflict when taken
    return {"username": name, "status": "active", "created_ts": user.created_ts}


async def set_disabled(
    store: Store, broker: Broker | None, name: str, disabled: bool
) -> dict[str, Any]:
    user = await need_user(store, name)
    await store.set_disabled(user.username, disabled)
    nodes: list[str] | None = None
    if broker is not None:
        nodes = list((await broker.presence([user.username]))[user.username].nodes)
        if disabled:
            await close_sockets(broker, user.username, "account disabled")
    return {
        "username": user.username,
        "status": "disabled" if disabled else "active",
        "online_on": nodes,
    }


async def close_sockets(broker: Broker, user: str, reason: str) -> None:
    """Close every socket of ``user`` on every replica (4001), through the
    broker as the replicas route to each other."""
    env = KickEnvelope(None, reason)
    await broker.route([Routed(user, "kick", encode(env), queued=False, envelope=env)])


async def delete_preview(store: Store, broker: Broker | None, name: str) -> dict[str, Any]:
    user = await need_user(store, name)
    messages, receipts = await count_owed(store, user.username)
    queue = len(await broker.queued(user.username)) if broker is not None else None
    return {
        "username": user.username,
        "status": status_of(user),
        "owed_messages": messages,
        "owed_receipts": receipts,
        "queue_entries": queue,
    }


async def delete_user(store: Store, broker: Broker | None, name: str) -> dict[str, Any]:
    user = await need_user(store, name)
    done = await store.delete_user(user.username)
    purged = None
    if broker is not None:
        purged = await broker.purge(user.username)
        await close_sockets(broker, user.username, "account deleted")
    return {
        "username": user.username,
        "status": "deleted",
        "messages_dropped": done.messages_dropped,
        "receipts_settled": done.receipts_settled,
        "queue_entries_purged": purged,
    }


# -- queues --------------------------------------------------------------------------


async def list_queues(broker: Broker) -> list[dict[str, Any]]:
    found = await broker.queues()
    found.sort(key=lambda q: (-q.entries, q.user))
    return [
        {"user": q.user, "entries": q.entries, "oldest_queued_at": q.oldest_queued_at}
        for q in found
    ]


def describe(entry: QueueEntry, keyring: crypto.Keys | None) -> dict[str, Any]:
    """One queue entry for people: what it is, never its body unless a keyring
    is given (``--decrypt``)."""
    out: dict[str, Any] = {"key": entry.key, "queued_at": entry.queued_at}
    try:
        env = decode(entry.payload)
    except ValueError:
        return {**out, "kind": "undecodable"}
    match env:
        case MessageEnvelope(message=m):
            out.update(
                kind="message",
                id=m.id,
                conversation=m.conversation,
                seq=m.seq,
                sender=m.sender,
                ts=m.ts,
                key_id=m.body.key_id,
            )
            if keyring is not None:
                out.update(_opened(keyring, m))
        case ReceiptEnvelope(receipt=r):
            out.update(
                kind="receipt",
                id=r.message_id,
                conversation=r.conversation,
                sender=r.member,
                status=r.status.value,
                ts=r.ts,
            )
        case EventEnvelope(event=e):
            out.update(
                kind=e.kind.value,
                id=e.message_id,
                conversation=e.conversation,
                sender=e.by,
                ts=e.ts,
                eseq=e.eseq,
            )
        case TypingEnvelope() | PresenceEnvelope():
            out.update(kind="ephemeral")
    return out


# -- messages (moderation) -------------------------------------------------------------


async def need_message(store: Store, id: str) -> StoredMessage:
    found = await store.get_messages([id])
    if not found:
        raise NotFound(f"no message '{id}'")
    return found[0]


async def show_message(store: Store, id: str, keyring: crypto.Keys | None) -> dict[str, Any]:
    """One stored message for an operator: where and when, its state, and
    its body only with a keyring (``--decrypt``)."""
    m = await need_message(store, id)
    out: dict[str, Any] = {
        "id": m.id,
        "conversation": m.conversation,
        "seq": m.seq,
        "from": m.sender,
        "ts": m.ts,
        "deleted": m.deleted,
        "key_id": None if m.deleted else m.body.key_id,
        "reply_to": m.reply_to,
        "edited_ts": m.edited_ts,
        "edits": m.edits,
        "reactions": {emoji: len(users) for emoji, users in m.reactions},
        "delivered_to": list(m.delivered_to),
        "seen_by": list(m.seen_by),
    }
    if keyring is not None and not m.deleted:
        out.update(_opened(keyring, m))
    return out


def _opened(keyring: crypto.Keys, m: StoredMessage) -> dict[str, Any]:
    """``body`` of a message opened with the keyring; an end-to-end one has
    no body the server can read: ``e2e`` (its ciphertext object) instead."""
    try:
        return parse_stored(keyring.open(m.body, m.id, m.conversation)).fields()
    except crypto.KeyringError as exc:
        return {"body": None, "error": str(exc)}


async def delete_message(store: Store, broker: Broker | None, id: str) -> dict[str, Any]:
    """Delete a message for everyone, as its sender would: the body is
    erased, every member is owed a ``deleted`` event ``by`` :data:`OPERATOR`,
    and (with Redis) the event reaches connected devices at once and the
    stale queue entries go. Without Redis, devices get it on their next
    connection."""
    m = await need_message(store, id)
    if m.deleted:
        raise NotFound(f"message '{id}' is already deleted")
    conv = await store.get_conversation(m.conversation)
    members = conv.members if conv is not None else ()
    eid = UlidFactory(clock_ms=clock.now_ms).new()
    ev = NewEvent(
        eid, m.conversation, EventKind.DELETED, m.id, OPERATOR, f"op-{eid}", clock.now_ms(),
        tuple(members), moderator=True,
    )  # fmt: skip
    [done] = (await store.write(Writes(events=[ev]))).events
    if done.refused is not None or done.event is None:
        error = Forbidden if done.refused == "forbidden" else NotFound
        raise error(done.reason or "refused")
    e = done.event
    routed = 0
    if broker is not None:
        key, payload, env = queue_items.event_item(e)
        await broker.route([Routed(u, key, payload, True, None, env) for u in members])
        for user, keys in queue_items.by_user(done.dropped).items():
            await broker.settle(user, keys)
        routed = len(members)
    return {
        "id": m.id,
        "conversation": m.conversation,
        "seq": m.seq,
        "from": m.sender,
        "eid": e.id,
        "eseq": e.eseq,
        "ts": e.ts,
        "members": list(members),
        "routed": routed,
        "queue_entries_settled": len(done.dropped) if broker is not None else 0,
    }


async def show_queue(
    broker: Broker, name: str, keyring: crypto.Keys | None, limit: int | None
) -> list[dict[str, Any]]:
    entries = await broker.queued(username(name))
    if limit is not None:
        entries = entries[:limit]
    return [describe(e, keyring) for e in entries]


async def queue_summary(broker: Broker, name: str) -> dict[str, int]:
    kinds: dict[str, int] = {"message": 0, "receipt": 0}
    for entry in await broker.queued(username(name)):
        kind = describe(entry, None)["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


async def purge_queue(broker: Broker, name: str) -> dict[str, Any]:
    user = username(name)
    return {"user": user, "purged": await broker.purge(user)}


async def requeue(store: Store, broker: Broker, name: str) -> dict[str, int]:
    """Rebuild the user's owed queue from what the store says is owed: empty
    it, then queue every owed message (by conversation and seq) and receipt,
    without live delivery. Something routed meanwhile is owed in the store
    too, so the rebuilt queue misses nothing; an entry that gets acked
    meanwhile is stale and is settled by the next backlog."""
    user = await need_user(store, name)
    before = await broker.purge(user.username)
    messages = receipts = 0
    async for page in queue_items.message_pages(store, user.username, PAGE):
        entries = [QueueEntry(*queue_items.message_item(m)[:2]) for m in page]
        messages += await broker.enqueue(user.username, entries)
    async for got in queue_items.receipt_pages(store, user.username, PAGE):
        entries = [QueueEntry(*queue_items.receipt_item(r)[:2]) for r in got]
        receipts += await broker.enqueue(user.username, entries)
    return {"purged": before, "messages": messages, "receipts": receipts}


# -- presence, nodes, stats ------------------------------------------------------------


async def presence(broker: Broker) -> list[dict[str, Any]]:
    online = await broker.online_users()
    return [{"user": u, "nodes": list(p.nodes)} for u, p in sorted(online.items())]


async def nodes(broker: Broker) -> list[dict[str, Any]]:
    return [
        {
            "node": n.node,
            "incarnation": n.incarnation,
            "connections": n.connections,
            "users": n.users,
            "heartbeat_age_ms": n.heartbeat_age_ms,
            "started_at": n.started_at,
        }
        for n in await broker.nodes()
    ]


async def redis_topology(broker: Broker) -> dict[str, Any] | None:
    """The Redis deployment as the broker sees it (mode; a cluster's shards;
    Sentinel's master), or None for a broker without one."""
    describe = getattr(broker, "describe", None)
    return await describe() if describe is not None else None


async def nodes_and_redis(broker: Broker) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    return await nodes(broker), await redis_topology(broker)


async def stats(store: Store, broker: Broker | None, window_s: float) -> dict[str, Any]:
    now = clock.now_ms()
    st = await store.stats(now - int(window_s * 1000))
    minutes = window_s / 60
    out: dict[str, Any] = {
        "window_seconds": window_s,
        "users": {"total": st.users, "disabled": st.disabled, "deleted": st.deleted},
        "conversations": st.conversations,
        "messages": {
            "stored": st.messages,
            "in_window": st.messages_since,
            "per_minute": round(st.messages_since / minutes, 2),
        },
        "owed": {"messages": st.owed_messages, "receipts": st.owed_receipts},
        "delivered": {
            "in_window": st.delivered_since,
            "per_minute": round(st.delivered_since / minutes, 2),
        },
        "seen": {"in_window": st.seen_since, "per_minute": round(st.seen_since / minutes, 2)},
        "keys": await store.count_by_key(),
        "queues": None,
        "nodes": None,
        "redis": None,
    }
    if broker is not None:
        queues = await broker.queues()
        oldest = [q.oldest_queued_at for q in queues if q.oldest_queued_at is not None]
        out["queues"] = {
            "users": len(queues),
            "entries": sum(q.entries for q in queues),
            "oldest_queued_at": min(oldest) if oldest else None,
        }
        out["nodes"] = {n.node: n.connections for n in await broker.nodes()}
        out["redis"] = await redis_topology(broker)
    return out
