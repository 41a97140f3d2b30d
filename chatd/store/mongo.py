"""The production store: MongoDB, through pymongo's blocking client.

Every call runs in a worker thread (``trio.to_thread.run_sync``) behind a
bounded :class:`trio.CapacityLimiter`; one store call is one thread hop, and
inside it batches travel as one ``insert_many`` / ``bulk_write`` where the
outcome can still be known per item.

No multi-document transactions are needed (``docs/mongo.md`` has the full
argument). Every guarantee rests on what a single MongoDB write does
atomically:

* **seq and idempotency** are claimed by one and the same insert: a message
  document carries ``(conversation, seq)`` and ``(sender, cid)``, both under
  unique indexes. A seq exists only as part of a stored message, so no crash
  and no losing duplicate can burn one (no gaps), and the unique index makes
  a second writer of the same seq fail and retry with the next one (no
  repeats). The ``last_seq`` counter of a conversation is advanced with
  ``$max`` after the insert; it is the allocator's first guess, never its
  authority.
* **receipts** live in the message document (``receipts``: one element per
  recipient, at the recipient's index in ``recipients``). A mark is a
  compare-and-set on that element's ``(delivered_ts, seen_ts)``, computed by
  :func:`chatd.core.delivery.apply_mark`; only the write that wins the
  compare reports the transition, and it stamps its own token on the
  element so that the winner is known even when a ``bulk_write`` only says
  how many of its updates matched.
* **owed receipts** are counted in ``rpending`` by the same atomic updates
  (``+n`` on a transition, ``-1`` on an ack that settles one), so "which
  messages owe their sender a receipt" is an indexed query.
* **events** (reactions, edits, deletions) are claimed like messages: one
  insert into ``events`` carries ``(conversation, eseq)`` and ``(by, cid)``,
  both under unique indexes, so eseq has no gaps and no repeats and an
  event is stored once. The insert is the commit point and happens only
  after :func:`chatd.core.events.judge` has passed; a refused event writes
  nothing. The judgement is serialised by that same index: it is made
  against the message with every event up to the conversation's highest
  eseq applied, and the insert of the next eseq fails (and the event is
  judged again) if any event of the conversation was stored meanwhile. The
  message document is then brought up to date by a compare-and-set on its
  ``applied_eseq``, which any process does for any stored event it finds
  not yet applied (so a crash between the two writes is repaired by the
  next event on the message, or by the retry). Reactions live in the
  message document (``reactions``); who is still owed an event is the
  event's ``owed`` array, as ``undelivered`` is for a message.

Errors: every pymongo/BSON failure becomes :class:`Unavailable`; a taken
username (and a taken group id) is :class:`Conflict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import bson.errors
import pymongo
import trio
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

from chatd.core.delivery import SETTLED_BY_ACK, apply_mark
from chatd.core.errors import ChatError, Conflict, NotFound, Unavailable
from chatd.core.events import Target, judge
from chatd.core.model import (
    Appended,
    Conversation,
    ConversationSummary,
    EventKind,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMessage,
    Receipt,
    ReceiptKey,
    Sealed,
    Status,
    StoredEvent,
    StoredMessage,
    Transition,
    User,
)
from chatd.core.names import dm_id, rid
from chatd.ports import Reseal, StoreStats, UserDeleted, Writes, Written

T = TypeVar("T")

DEFAULT_DATABASE = "chatd"

#: Client options chatd sets unless the URI (or ``tuning``) sets them. A short
#: server selection timeout makes an outage answer ``unavailable`` within
#: seconds; the socket timeout bounds a call to a server that accepted the
#: connection and then hung; majority + journal makes "durable on return" hold
#: on a replica set and on a single server, and wtimeout bounds the wait for a
#: majority that is not there. Not ``timeoutMS``: with it set, pymongo ignores
#: serverSelectionTimeoutMS and an outage takes the whole operation budget to
#: be noticed.
CLIENT_DEFAULTS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 3000,
    "connectTimeoutMS": 3000,
    "socketTimeoutMS": 15000,
    "w": "majority",
    "journal": True,
    "wTimeoutMS": 10000,
    "appname": "chatd",
}

#: Seconds the index builds at startup may take (on an existing large
#: collection they outlast the socket timeout). Applied after a ping has
#: shown the server is there, so an outage is still noticed quickly.
INDEX_BUILD_TIMEOUT = 120.0

#: Duplicate-key error codes (11000 is current; the others are legacy).
_DUP_CODES = frozenset({11000, 11001, 12582})

#: How often one append may find its planned seq taken by another writer
#: before it gives up (Unavailable). Each time it plans again from the true
#: highest seq, so some writer always progresses.
_APPEND_CONFLICTS = 100
#: The same bound for one event finding its planned eseq taken.
_EVENT_CONFLICTS = 100

USERS = "users"
CONVERSATIONS = "conversations"
MESSAGES = "messages"
EVENTS = "events"


@dataclass(frozen=True)
class Index:
    """One index chatd needs, and the query it serves (docs/mongo.md lists the same)."""

    collection: str
    name: str
    keys: tuple[tuple[str, int], ...]
    serves: str
    unique: bool = False
    partial: dict[str, Any] | None = None


#: Names are fixed, so creating them again (a second open, several processes
#: starting at once) is a no-op.
INDEXES: tuple[Index, ...] = (
    Index(
        CONVERSATIONS,
        "members_kind",
        (("members", ASCENDING), ("kind", ASCENDING)),
        "membership: conversations_of, shares_conversation ($all), dm_peers (with kind)",
    ),
    Index(
        MESSAGES,
        "sender_cid",
        (("sender", ASCENDING), ("cid", ASCENDING)),
        "idempotency: one message per (sender, cid); the duplicate lookup",
        unique=True,
    ),
    Index(
        MESSAGES,
        "conversation_seq",
        (("conversation", ASCENDING), ("seq", ASCENDING)),
        "seq: one message per (conversation, seq); history paging, last message,"
        " the allocator's highest seq",
        unique=True,
    ),
    Index(
        MESSAGES,
        "owed_messages",
        (("undelivered", ASCENDING), ("conversation", ASCENDING), ("seq", ASCENDING)),
        "owed_messages: {undelivered: user, conversation >= after} sorted by conversation, seq",
    ),
    Index(
        MESSAGES,
        "unread",
        (("unseen", ASCENDING), ("conversation", ASCENDING)),
        "unread per conversation: {unseen: user} grouped by conversation",
    ),
    Index(
        MESSAGES,
        "owed_receipts",
        (("sender", ASCENDING), ("_id", ASCENDING)),
        "owed_receipts: {sender, rpending > 0, _id >= after} sorted by _id (partial:"
        " only messages that owe their sender a receipt)",
        partial={"rpending": {"$gt": 0}},
    ),
    Index(
        EVENTS,
        "by_cid",
        (("by", ASCENDING), ("cid", ASCENDING)),
        "idempotency: one event per (by, cid); the duplicate lookup",
        unique=True,
    ),
    Index(
        EVENTS,
        "conversation_eseq",
        (("conversation", ASCENDING), ("eseq", ASCENDING)),
        "eseq: one event per (conversation, eseq); the allocator's highest eseq",
        unique=True,
    ),
    Index(
        EVENTS,
        "owed_events",
        (("owed", ASCENDING), ("conversation", ASCENDING), ("eseq", ASCENDING)),
        "owed_events: {owed: user, conversation >= after} sorted by conversation, eseq",
    ),
    Index(
        EVENTS,
        "message_eseq",
        (("message_id", ASCENDING), ("eseq", ASCENDING)),
        "a message's events: those not yet applied to it, a deletion's earlier ones",
    ),
)

#: What messages_by_key reads.
_BASE_FIELDS = {
    "conversation": 1,
    "seq": 1,
    "sender": 1,
    "ts": 1,
    "body": 1,
    "status": 1,
}
#: What owed_messages and a summary's last message read.
_MSG_FIELDS = {
    **_BASE_FIELDS,
    "cid": 1,
    "reply_to": 1,
    "edited_ts": 1,
    "edits": 1,
    "deleted": 1,
}
#: What history and get_messages read.
_HISTORY_FIELDS = {**_MSG_FIELDS, "reactions": 1}
#: What judging an event reads of its message (a deletion: also what it drops).
_TARGET_FIELDS = {
    "conversation": 1,
    "sender": 1,
    "ts": 1,
    "deleted": 1,
    "reactions": 1,
    "applied_eseq": 1,
}
_DELETE_FIELDS = {**_TARGET_FIELDS, "receipts": 1, "undelivered": 1}
#: What a deleted message's body is stored as.
_ERASED = {"key_id": "", "nonce": b"", "ciphertext": b""}


def _field(status: Status) -> str:
    return "delivered" if status is Status.DELIVERED else "seen"


def _uri_options(uri: str) -> tuple[str | None, set[str]]:
    """The database named in the URI's path and the (lower-cased) option names
    in its query, read without resolving anything (``mongodb+srv`` included)."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    rest, _, query = rest.partition("?")
    _, slash, path = rest.partition("/")
    database = unquote(path) if slash and path else None
    return database, {k.lower() for k, _ in parse_qsl(query, keep_blank_values=True)}


def _sealed(body: dict[str, Any]) -> Sealed:
    return Sealed(
        key_id=body["key_id"], nonce=bytes(body["nonce"]), ciphertext=bytes(body["ciphertext"])
    )


def _body_doc(body: Sealed) -> dict[str, Any]:
    return {"key_id": body.key_id, "nonce": body.nonce, "ciphertext": body.ciphertext}


def _message(doc: dict[str, Any]) -> StoredMessage:
    """A message document as read (the fields it lacks take their defaults:
    documents stored before replies and events, or a narrower projection)."""
    status = doc.get("status") or {}
    reactions: dict[str, list[str]] = {}
    for r in doc.get("reactions") or ():
        reactions.setdefault(r["emoji"], []).append(r["user"])
    return StoredMessage(
        id=doc["_id"],
        conversation=doc["conversation"],
        seq=doc["seq"],
        sender=doc["sender"],
        ts=doc["ts"],
        body=_sealed(doc["body"]),
        delivered_to=tuple(sorted(status.get("delivered_to", ()))),
        seen_by=tuple(sorted(status.get("seen_by", ()))),
        cid=doc.get("cid"),
        reply_to=doc.get("reply_to"),
        edited_ts=doc.get("edited_ts"),
        edits=int(doc.get("edits") or 0),
        deleted=bool(doc.get("deleted", False)),
        reactions=tuple((e, tuple(sorted(u))) for e, u in sorted(reactions.items())),
    )


def _user(doc: dict[str, Any]) -> User:
    return User(
        username=doc["_id"],
        password_hash=doc["password_hash"],
        created_ts=doc["created_ts"],
        last_seen=doc.get("last_seen"),
        disabled=bool(doc.get("disabled", False)),
        deleted=bool(doc.get("deleted", False)),
    )


def _conversation(doc: dict[str, Any]) -> Conversation:
    return Conversation(
        id=doc["_id"],
        kind=doc["kind"],
        members=tuple(sorted(doc["members"])),
        title=doc.get("title"),
        created_ts=doc["created_ts"],
        created_by=doc.get("created_by"),
    )


def _message_doc(msg: NewMessage, seq: int) -> dict[str, Any]:
    recipients = list(dict.fromkeys(msg.recipients))  # unique, order kept
    return {
        "_id": msg.id,
        "conversation": msg.conversation,
        "seq": seq,
        "sender": msg.sender,
        "cid": msg.cid,
        "ts": msg.ts,
        "recipients": recipients,
        "reply_to": msg.reply_to,
        "body": _body_doc(msg.body),
        "status": {"delivered_to": [], "seen_by": []},
        # Per-recipient receipt state, element i belongs to recipients[i].
        "receipts": [
            {
                "member": r,
                "delivered_ts": None,
                "seen_ts": None,
                "delivered_acked": False,
                "seen_acked": False,
            }
            for r in recipients
        ],
        # Index keys: who is still owed this message / has not seen it.
        "undelivered": list(recipients),
        "unseen": list(recipients),
        # Receipts of this message its sender has not acked yet.
        "rpending": 0,
    }


def _event_doc(ev: NewEvent, eseq: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": ev.id,
        "conversation": ev.conversation,
        "eseq": eseq,
        "kind": ev.kind.value,
        "message_id": ev.message_id,
        "by": ev.by,
        "cid": ev.cid,
        "ts": ev.ts,
        "emoji": ev.emoji,
        "on": ev.on,
        # Index key: who is still owed this event.
        "owed": list(dict.fromkeys(ev.recipients)),
    }
    if ev.body is not None and ev.kind is EventKind.EDITED:
        # Until the edit is applied to its message (then unset): what lets
        # any process apply it.
        doc["body"] = _body_doc(ev.body)
    return doc


def _event(doc: dict[str, Any], body: Sealed | None = None) -> StoredEvent:
    return StoredEvent(
        id=doc["_id"],
        conversation=doc["conversation"],
        eseq=doc["eseq"],
        kind=EventKind(doc["kind"]),
        message_id=doc["message_id"],
        by=doc["by"],
        ts=doc["ts"],
        emoji=doc.get("emoji"),
        on=bool(doc.get("on", True)),
        body=body,
    )


def _applying(ev: dict[str, Any]) -> dict[str, Any]:
    """The update that applies stored event ``ev`` to its message."""
    done = {"applied_eseq": ev["eseq"]}
    kind = EventKind(ev["kind"])
    if kind is EventKind.REACTION:
        entry = {"user": ev["by"], "emoji": ev["emoji"]}
        # $addToSet: one entry per (user, emoji), whatever the order of events.
        return {
            "$set": done,
            ("$addToSet" if ev.get("on", True) else "$pull"): {"reactions": entry},
        }
    if kind is EventKind.EDITED:
        return {"$set": {**done, "body": ev["body"], "edited_ts": ev["ts"]}, "$inc": {"edits": 1}}
    # Deleted: a tombstone that keeps its seq; no receipts, reactions or
    # owed-message keys left (a later mark or ack finds no recipient).
    return {
        "$set": {
            **done,
            "body": _ERASED,
            "deleted": True,
            "reactions": [],
            "recipients": [],
            "receipts": [],
            "status": {"delivered_to": [], "seen_by": []},
            "undelivered": [],
            "unseen": [],
            "rpending": 0,
        }
    }


def _erased(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The (user, queue key) entries erasing message ``doc`` leaves stale: the
    message still owed to members, its receipts still owed to its sender."""
    mid, sender = doc["_id"], doc["sender"]
    out = [(member, mid) for member in doc.get("undelivered") or ()]
    for r in doc.get("receipts") or ():
        for status in (Status.DELIVERED, Status.SEEN):
            f = _field(status)
            if r.get(f"{f}_ts") is not None and not r.get(f"{f}_acked"):
                out.append((sender, rid(mid, r["member"], status)))
    return out


class MongoStore:
    """The Store port on MongoDB. Open with :meth:`open`; close with :meth:`aclose`.

    :meth:`open` does no I/O: the indexes are created (idempotently) before
    the first operation runs, and again after a failed attempt, so a process
    that starts while MongoDB is away comes up, answers ``unavailable``, and
    recovers when the server is back. Nothing is written before the unique
    indexes exist (the seq and idempotency guarantees rest on them).
    """

    def __init__(
        self, client: Any, database: str, *, owns_client: bool, max_threads: int = 16
    ) -> None:
        self._client = client
        self._owns_client = owns_client
        self.database = database
        self._db = client[database]
        self._users = self._db.get_collection(USERS)
        self._conversations = self._db.get_collection(CONVERSATIONS)
        self._messages = self._db.get_collection(MESSAGES)
        self._events = self._db.get_collection(EVENTS)
        self._limiter = trio.CapacityLimiter(max_threads)
        self._ready = False
        self._ready_lock = trio.Lock()
        self._closed = False

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        database: str | None = None,
        client: Any = None,
        max_threads: int = 16,
        **tuning: Any,
    ) -> MongoStore:
        """A store on ``uri``'s database (its path; ``chatd`` when it has none).

        ``client`` injects a ready client (tests pass a ``mongomock.MongoClient``);
        the store then leaves closing it to the caller. ``tuning`` is passed to
        :class:`pymongo.MongoClient` and wins over :data:`CLIENT_DEFAULTS`;
        options the URI sets win over the defaults too; ``max_threads`` bounds
        the worker threads (and so the concurrent MongoDB calls) of this store.

        No I/O happens here (except the DNS lookup a ``mongodb+srv://`` URI
        asks pymongo for). A malformed URI or option raises ValueError.
        """
        uri_db, uri_opts = _uri_options(uri)
        name = database or uri_db or DEFAULT_DATABASE
        if client is not None:
            if tuning:
                raise TypeError(f"client options {sorted(tuning)} given with an injected client")
            return cls(client, name, owns_client=False, max_threads=max_threads)
        options = {k: v for k, v in CLIENT_DEFAULTS.items() if k.lower() not in uri_opts}
        options.update(tuning)
        try:
            made = pymongo.MongoClient(uri, **options)
        except (PyMongoError, TypeError) as exc:
            # A configuration mistake, not an outage: the wiring reports it.
            raise ValueError(f"invalid MongoDB URI or options: {exc}") from None
        return cls(made, name, owns_client=True, max_threads=max_threads)

    # -- plumbing ----------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if not self._ready:
            await self._ensure_ready()
        return await trio.to_thread.run_sync(_guard, fn, *args, limiter=self._limiter)

    async def _ensure_ready(self) -> None:
        async with self._ready_lock:
            if self._ready:
                return
            await trio.to_thread.run_sync(_guard, self._create_indexes, limiter=self._limiter)
            self._ready = True

    def _create_indexes(self) -> None:
        self._db.command("ping")  # fails within serverSelectionTimeoutMS if down
        with pymongo.timeout(INDEX_BUILD_TIMEOUT):
            # One create_index per index, not create_indexes: mongomock's
            # create_indexes drops partialFilterExpression.
            for index in INDEXES:
                options: dict[str, Any] = {"name": index.name}
                if index.unique:
                    options["unique"] = True
                if index.partial is not None:
                    options["partialFilterExpression"] = index.partial
                self._db.get_collection(index.collection).create_index(list(index.keys), **options)

    async def ensure_indexes(self) -> None:
        """Create the indexes now (the first operation does it otherwise)."""
        await self._ensure_ready()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await trio.to_thread.run_sync(self._client.close)

    async def ping(self) -> None:
        await self._run(lambda: self._db.command("ping"))

    # -- users -------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        doc: dict[str, Any] = {
            "_id": user.username,
            "password_hash": user.password_hash,
            "created_ts": user.created_ts,
            "disabled": user.disabled or user.deleted,
        }
        if user.deleted:
            doc["deleted"] = True
        if user.last_seen is not None:
            doc["last_seen"] = user.last_seen

        def fn() -> None:
            try:
                self._users.insert_one(doc)
            except DuplicateKeyError:
                raise Conflict(f"username '{user.username}' is taken") from None

        await self._run(fn)

    async def get_user(self, username: str) -> User | None:
        def fn() -> User | None:
            doc = self._users.find_one({"_id": username})
            return None if doc is None else _user(doc)

        return await self._run(fn)

    async def set_last_seen(self, username: str, ts: int) -> None:
        # $max: only ever forward, atomically. The field is absent until first
        # set (a stored null would compare below every number anyway).
        await self._run(
            lambda: self._users.update_one({"_id": username}, {"$max": {"last_seen": ts}})
        )

    # -- conversations -----------------------------------------------------------

    def _new_conversation(
        self, id: str, kind: str, title: str | None, members: Iterable[str], ts: int
    ) -> dict[str, Any]:
        # last_ts stays absent until the first message ($max sets it then).
        return {
            "_id": id,
            "kind": kind,
            "title": title,
            "members": sorted(set(members)),
            "created_ts": ts,
            "last_seq": 0,
        }

    async def ensure_dm(self, a: str, b: str, ts: int) -> Conversation:
        id = dm_id(a, b)
        first, second = sorted((a, b))
        doc = self._new_conversation(id, "dm", None, (first, second), ts)

        def fn() -> Conversation:
            found = self._conversations.find_one({"_id": id})
            if found is None:
                try:
                    self._conversations.insert_one(doc)
                except DuplicateKeyError:
                    pass  # a concurrent caller made it first: same conversation
                found = self._conversations.find_one({"_id": id})
            if found is None:
                raise Unavailable(f"conversation {id} vanished")
            return _conversation(found)

        return await self._run(fn)

    async def create_group(
        self,
        id: str,
        title: str | None,
        members: Sequence[str],
        ts: int,
        creator: str | None = None,
    ) -> Conversation:
        doc = self._new_conversation(id, "group", title, members, ts)
        doc["created_by"] = creator

        def fn() -> Conversation:
            try:
                self._conversations.insert_one(doc)
            except DuplicateKeyError:
                raise Conflict(f"conversation id '{id}' is taken") from None
            return _conversation(doc)

        return await self._run(fn)

    async def get_conversation(self, id: str) -> Conversation | None:
        def fn() -> Conversation | None:
            doc = self._conversations.find_one({"_id": id})
            return None if doc is None else _conversation(doc)

        return await self._run(fn)

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        def fn() -> list[ConversationSummary]:
            convs = list(self._conversations.find({"members": username}))
            if not convs:
                return []
            unread = {
                row["_id"]: row["n"]
                for row in self._messages.aggregate(
                    [
                        {"$match": {"unseen": username}},
                        {"$group": {"_id": "$conversation", "n": {"$sum": 1}}},
                    ]
                )
            }
            wanted = [
                {"conversation": c["_id"], "seq": c["last_seq"]}
                for c in convs
                if c.get("last_seq", 0) > 0
            ]
            last: dict[str, StoredMessage] = {}
            if wanted:
                for doc in self._messages.find({"$or": wanted}, _MSG_FIELDS):
                    last[doc["conversation"]] = _message(doc)
            out = [
                ConversationSummary(
                    id=c["_id"],
                    kind=c["kind"],
                    members=tuple(sorted(c["members"])),
                    title=c.get("title"),
                    last_seq=c.get("last_seq", 0),
                    unread=unread.get(c["_id"], 0),
                    last_ts=c.get("last_ts"),
                    last_message=last.get(c["_id"]),
                )
                for c in convs
            ]
            created = {c["_id"]: c["created_ts"] for c in convs}
            out.sort(key=lambda s: (s.last_ts or created[s.id], s.id), reverse=True)
            return out

        return await self._run(fn)

    async def shares_conversation(self, a: str, b: str) -> bool:
        def fn() -> bool:
            found = self._conversations.find_one({"members": {"$all": [a, b]}}, {"_id": 1})
            return found is not None

        return await self._run(fn)

    async def dm_peers(self, username: str) -> list[str]:
        def fn() -> list[str]:
            docs = self._conversations.find(
                {"members": username, "kind": "dm"}, {"members": 1}, sort=[("_id", ASCENDING)]
            )
            return [m for doc in docs for m in doc["members"] if m != username]

        return await self._run(fn)

    # -- messages ----------------------------------------------------------------

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        if not batch:
            return []
        return await self._run(self._append, list(batch))

    def _append(self, batch: list[NewMessage]) -> list[Appended]:
        results: list[Appended | None] = [None] * len(batch)
        first_of: dict[tuple[str, str], int] = {}
        unique: list[int] = []
        for i, msg in enumerate(batch):
            if (msg.sender, msg.cid) not in first_of:
                first_of[(msg.sender, msg.cid)] = i
                unique.append(i)

        # Stored already (a client's retry): answer the first message.
        stored = self._stored_by_key({(batch[i].sender, batch[i].cid) for i in unique})
        pending: list[int] = []
        for i in unique:
            doc = stored.get((batch[i].sender, batch[i].cid))
            if doc is not None:
                results[i] = _duplicate(doc)
            else:
                pending.append(i)

        # The allocator's first guess: each conversation's last_seq (also
        # tells an unknown conversation apart before anything is written).
        top: dict[str, int] = {}
        if pending:
            names = sorted({batch[i].conversation for i in pending})
            for doc in self._conversations.find({"_id": {"$in": names}}, {"last_seq": 1}):
                top[doc["_id"]] = doc.get("last_seq", 0)
            missing = [c for c in names if c not in top]
            if missing:
                raise NotFound(f"conversation {missing[0]} does not exist")

        conflicts = 0
        while pending:
            planned: list[int] = []
            docs: list[dict[str, Any]] = []
            next_seq = dict(top)
            for i in pending:
                msg = batch[i]
                next_seq[msg.conversation] += 1
                planned.append(next_seq[msg.conversation])
                docs.append(_message_doc(msg, next_seq[msg.conversation]))
            try:
                # Ordered: within one conversation the batch's order is the seq
                # order, and a failure stops at the first item that failed.
                self._messages.insert_many(docs, ordered=True)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors") or []
                if exc.details.get("writeConcernErrors"):
                    # Written on the primary, not (yet) durable as asked: the
                    # sender retries, and the retry finds the messages.
                    concern = exc.details["writeConcernErrors"][0]
                    raise Unavailable(f"write not confirmed: {concern.get('errmsg')}") from None
                if not errors or any(e.get("code") not in _DUP_CODES for e in errors):
                    first = errors[0].get("errmsg") if errors else exc
                    raise Unavailable(f"store refused a write: {first}") from None
                failed = int(errors[0]["index"])
            else:
                failed = len(pending)
            for k in range(failed):
                msg = batch[pending[k]]
                results[pending[k]] = Appended(
                    msg.id, msg.conversation, planned[k], msg.ts, duplicate=False
                )
            if failed == len(pending):
                break
            # The item at ``failed`` lost either its (sender, cid) — a
            # concurrent duplicate: answer the winner — or its seq — another
            # writer took it: plan again from the true highest seq.
            i = pending[failed]
            msg = batch[i]
            dup = self._messages.find_one(
                {"sender": msg.sender, "cid": msg.cid}, {"conversation": 1, "seq": 1, "ts": 1}
            )
            rest = pending[failed + 1 :]
            if dup is not None:
                results[i] = _duplicate(dup)
            else:
                if self._messages.find_one({"_id": msg.id}, {"_id": 1}) is not None:
                    raise Unavailable(f"message id {msg.id} is already taken")
                rest = [i, *rest]
                conflicts += 1
                if conflicts > _APPEND_CONFLICTS:
                    raise Unavailable("too much contention appending messages")
            pending = rest
            for conv in {batch[j].conversation for j in pending}:
                highest = self._messages.find_one(
                    {"conversation": conv}, {"seq": 1}, sort=[("seq", DESCENDING)]
                )
                # Read from the primary: includes what this call just stored.
                top[conv] = max(top[conv], highest["seq"] if highest else 0)

        out: list[Appended] = []
        for i, msg in enumerate(batch):
            res = results[i]
            if res is None:
                res = replace(_need(results[first_of[(msg.sender, msg.cid)]]), duplicate=True)
            out.append(res)

        # Advance each conversation's counter and activity time. $max keeps
        # this monotonic under any interleaving; duplicates are included so
        # that a retry repairs a counter a crash left behind.
        advance: dict[str, tuple[int, int]] = {}
        for res in out:
            seq, ts = advance.get(res.conversation, (0, 0))
            advance[res.conversation] = (max(seq, res.seq), max(ts, res.ts))
        self._conversations.bulk_write(
            [
                UpdateOne({"_id": conv}, {"$max": {"last_seq": seq, "last_ts": ts}})
                for conv, (seq, ts) in sorted(advance.items())
            ],
            ordered=True,
        )
        return out

    def _stored_by_key(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        if not keys:
            return {}
        by_sender: dict[str, list[str]] = {}
        for sender, cid in sorted(keys):
            by_sender.setdefault(sender, []).append(cid)
        query = {
            "$or": [{"sender": s, "cid": {"$in": cids}} for s, cids in sorted(by_sender.items())]
        }
        fields = {"conversation": 1, "seq": 1, "ts": 1, "sender": 1, "cid": 1}
        return {(d["sender"], d["cid"]): d for d in self._messages.find(query, fields)}

    async def history(
        self, conversation: str, before: int | None, limit: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []

        def fn() -> list[StoredMessage]:
            query: dict[str, Any] = {"conversation": conversation}
            if before is not None:
                query["seq"] = {"$lt": before}
            docs = self._messages.find(
                query, _HISTORY_FIELDS, sort=[("seq", DESCENDING)], limit=limit
            )
            return [_message(d) for d in reversed(list(docs))]

        return await self._run(fn)

    async def get_messages(self, ids: Sequence[str]) -> list[StoredMessage]:
        if not ids:
            return []

        def fn() -> list[StoredMessage]:
            docs = self._messages.find(
                {"_id": {"$in": list(dict.fromkeys(ids))}},
                _HISTORY_FIELDS,
                sort=[("conversation", ASCENDING), ("seq", ASCENDING)],
            )
            return [_message(d) for d in docs]

        return await self._run(fn)

    # -- receipts ----------------------------------------------------------------

    async def mark(self, batch: Sequence[Mark]) -> list[MarkResult]:
        if not batch:
            return []
        return await self._run(self._mark, list(batch))

    def _mark(self, batch: list[Mark]) -> list[MarkResult]:
        results: list[MarkResult | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        fields = {"sender": 1, "conversation": 1, "recipients": 1, "receipts": 1}
        # A round repeats only for updates whose receipt another writer moved
        # meanwhile, and a receipt moves at most twice: this many rounds always
        # suffice (more would be a bug, reported as Unavailable, never a hang).
        rounds = 2 * len({(m.message_id, m.user) for m in batch}) + 2
        for _ in range(rounds):
            if not pending:
                break
            ids = sorted({batch[i].message_id for i in pending})
            docs = {d["_id"]: d for d in self._messages.find({"_id": {"$in": ids}}, fields)}
            # The receipt state each planned update leaves behind, so that two
            # marks of one (message, member) in one batch chain correctly.
            state: dict[tuple[str, str], tuple[int | None, int | None]] = {}
            ops: list[UpdateOne] = []
            planned: list[tuple[int, int, str, tuple[Status, ...]]] = []
            for i in pending:
                mark = batch[i]
                doc = docs.get(mark.message_id)
                if doc is None:
                    results[i] = MarkResult((), known=False)
                    continue
                try:
                    idx = doc["recipients"].index(mark.user)
                except ValueError:
                    results[i] = MarkResult((), known=doc["sender"] == mark.user)
                    continue
                key = (mark.message_id, mark.user)
                if key not in state:
                    receipt = doc["receipts"][idx]
                    state[key] = (receipt["delivered_ts"], receipt["seen_ts"])
                old_d, old_s = state[key]
                new_d, new_s, made = apply_mark(old_d, old_s, mark.status, mark.ts)
                if not made:
                    results[i] = MarkResult((), known=True)
                    continue
                state[key] = (new_d, new_s)
                token = str(ObjectId())
                at = f"receipts.{idx}"
                sets: dict[str, Any] = {}
                add: dict[str, Any] = {}
                pull: dict[str, Any] = {}
                for status in made:
                    f = _field(status)
                    sets[f"{at}.{f}_ts"] = mark.ts
                    sets[f"{at}.{f}_op"] = token
                    if status is Status.DELIVERED:
                        add["status.delivered_to"] = mark.user
                        pull["undelivered"] = mark.user
                    else:
                        add["status.seen_by"] = mark.user
                        pull["unseen"] = mark.user
                ops.append(
                    UpdateOne(
                        # Compare-and-set on the state this plan started from.
                        {
                            "_id": mark.message_id,
                            f"{at}.member": mark.user,
                            f"{at}.delivered_ts": old_d,
                            f"{at}.seen_ts": old_s,
                        },
                        {
                            "$set": sets,
                            "$addToSet": add,
                            "$pull": pull,
                            "$inc": {"rpending": len(made)},
                        },
                    )
                )
                planned.append((i, idx, token, made))
            if not ops:
                pending = []
                break
            # Ordered: a later mark of the same receipt expects the earlier
            # one's result, so it must run after it.
            done = self._messages.bulk_write(ops, ordered=True)
            won = {i for i, *_ in planned}
            if done.modified_count != len(ops):
                # Some compares lost to a concurrent writer: the tokens say
                # which updates are ours. The others plan again from fresh state.
                again = sorted({batch[i].message_id for i, *_ in planned})
                fresh = {
                    d["_id"]: d
                    for d in self._messages.find({"_id": {"$in": again}}, {"receipts": 1})
                }
                won = {
                    i
                    for i, idx, token, made in planned
                    if _stamp(fresh.get(batch[i].message_id), idx, made[0]) == token
                }
            for i, _idx, _token, made in planned:
                if i in won:
                    mark = batch[i]
                    doc = docs[mark.message_id]
                    results[i] = MarkResult(
                        tuple(
                            Transition(
                                mark.message_id,
                                doc["conversation"],
                                doc["sender"],
                                mark.user,
                                status,
                                mark.ts,
                            )
                            for status in made
                        ),
                        known=True,
                    )
            pending = [i for i, *_ in planned if i not in won]
        if pending:
            raise Unavailable("too much contention applying receipts")
        return [_need(r) for r in results]

    async def write(self, writes: Writes) -> Written:
        # No multi-document transaction: the five steps are applied in order,
        # each durable (majority write concern) before the next; each is
        # idempotent, so a retry after a failure in between is safe.
        appended = await self.append(writes.appends) if writes.appends else []
        events = await self._run(self._apply_events, list(writes.events)) if writes.events else []
        marked = await self.mark(writes.marks) if writes.marks else []
        if writes.receipt_acks:
            await self.ack_receipts(writes.receipt_acks)
        if writes.event_acks:
            await self._run(self._ack_events, list(writes.event_acks))
        return Written(appended, marked, events)

    # -- events ------------------------------------------------------------------

    def _apply_events(self, batch: list[NewEvent]) -> list[EventResult]:
        # One at a time: a later event of the batch is judged against what
        # the earlier ones did.
        return [self._apply_event(ev) for ev in batch]

    def _apply_event(self, ev: NewEvent) -> EventResult:
        if ev.kind is EventKind.EDITED and ev.body is None:
            raise ValueError("an edit without a body")
        fields = _DELETE_FIELDS if ev.kind is EventKind.DELETED else _TARGET_FIELDS
        for _ in range(_EVENT_CONFLICTS):
            found = self._events.find_one({"by": ev.by, "cid": ev.cid})
            if found is not None:
                # Stored already (a retry): make sure it reached its message
                # (its writer may have stopped in between), answer the first.
                self._settled(found["message_id"], {"_id": 1})
                return EventResult(_event(found), duplicate=True)
            # Read the highest eseq first, then the message with every event
            # up to it applied: the insert of the next eseq below succeeds
            # only if no event of the conversation was stored in between, so
            # the judgement holds at the moment the event is stored.
            top = self._events.find_one(
                {"conversation": ev.conversation}, {"eseq": 1}, sort=[("eseq", DESCENDING)]
            )
            eseq = (top["eseq"] if top else 0) + 1
            doc = self._settled(ev.message_id, fields)
            target = None
            mine, already = 0, False
            if doc is not None:
                target = Target(
                    doc["conversation"], doc["sender"], doc["ts"], bool(doc.get("deleted"))
                )
                own = [r["emoji"] for r in doc.get("reactions") or () if r["user"] == ev.by]
                mine, already = len(own), ev.emoji in own
            refusal = judge(
                ev.kind,
                ev.by,
                ev.conversation,
                target,
                ev.ts,
                window_ms=ev.window_ms,
                moderator=ev.moderator,
                reactions_by_user=mine,
                reacted_already=already,
                on=ev.on,
            )
            if refusal is not None:
                return EventResult(None, refused=refusal.code, reason=refusal.reason)
            stored = _event_doc(ev, eseq)
            try:
                self._events.insert_one(stored)
            except DuplicateKeyError:
                # Lost (by, cid) to a concurrent duplicate (the next round
                # answers it) or the eseq to another event (the next round
                # plans and judges again).
                if (
                    self._events.find_one({"by": ev.by, "cid": ev.cid}, {"_id": 1}) is None
                    and self._events.find_one({"_id": ev.id}, {"_id": 1}) is not None
                ):
                    raise Unavailable(f"event id {ev.id} is already taken") from None
                continue
            before, dropped = self._apply_to_message(stored)
            if ev.kind is EventKind.DELETED:
                # The message as this call erased it; as judged if another
                # process applied the deletion first.
                dropped = _erased(before or _need(doc)) + dropped
            body = ev.body if ev.kind is EventKind.EDITED else None
            return EventResult(_event(stored, body), dropped=tuple(dropped))
        raise Unavailable("too much contention applying events")

    def _settled(self, message_id: str, fields: dict[str, int]) -> dict[str, Any] | None:
        """The message document with every stored event of it applied (those
        a crashed or slower process left unapplied are applied here, in eseq
        order); None if there is no such message."""
        doc = self._messages.find_one({"_id": message_id}, {**fields, "applied_eseq": 1})
        if doc is None:
            return None
        late = list(
            self._events.find(
                {"message_id": message_id, "eseq": {"$gt": doc.get("applied_eseq", 0)}},
                sort=[("eseq", ASCENDING)],
            )
        )
        if not late:
            return doc
        for ev in late:
            self._apply_to_message(ev)
        return self._messages.find_one({"_id": message_id}, {**fields, "applied_eseq": 1})

    def _apply_to_message(
        self, ev: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
        """Apply stored event ``ev`` to its message, once, whoever calls: the
        message as it was before (None if it was applied already) and, for a
        deletion, the (member, event id) entries it took out of the queues."""
        kind = EventKind(ev["kind"])
        dropped: list[tuple[str, str]] = []
        if kind is EventKind.EDITED and "body" not in ev:
            # Its body is unset only once it is applied (read late, by a helper).
            return None, dropped
        if kind is EventKind.DELETED:
            # The earlier events first (all stored before this one was
            # judged): nothing is owed of them any more, and their bodies go.
            # Before the message, so that a crash in between is repaired by
            # applying the deletion again.
            earlier = {"message_id": ev["message_id"], "_id": {"$ne": ev["_id"]}}
            for other in self._events.find(
                {**earlier, "owed.0": {"$exists": True}}, {"owed": 1}, sort=[("eseq", ASCENDING)]
            ):
                dropped += [(user, other["_id"]) for user in other["owed"]]
            self._events.update_many(earlier, {"$set": {"owed": []}, "$unset": {"body": ""}})
        # Compare-and-set on applied_eseq: the events of one message are
        # applied in eseq order, each exactly once.
        before = self._messages.find_one_and_update(
            {"_id": ev["message_id"], "applied_eseq": {"$not": {"$gte": ev["eseq"]}}},
            _applying(ev),
            projection=_DELETE_FIELDS if kind is EventKind.DELETED else {"_id": 1},
            return_document=ReturnDocument.BEFORE,
        )
        if kind is EventKind.EDITED:
            # Applied (by this call or another): the message holds the body now.
            self._events.update_one({"_id": ev["_id"]}, {"$unset": {"body": ""}})
        return before, dropped

    def _ack_events(self, acks: list[tuple[str, str]]) -> None:
        # The filter makes an ack of an event not owed to that user a no-op.
        self._events.bulk_write(
            [
                UpdateOne({"_id": event_id, "owed": user}, {"$pull": {"owed": user}})
                for user, event_id in acks
            ],
            ordered=True,
        )

    async def owed_events(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredEvent]:
        if limit <= 0:
            return []
        query: dict[str, Any] = {"owed": username}
        if after is not None:
            # As owed_messages: a range on the index's second key.
            conv, eseq = after
            query["conversation"] = {"$gte": conv}
            query["$nor"] = [{"conversation": conv, "eseq": {"$lte": eseq}}]

        def fn() -> list[StoredEvent]:
            docs = list(
                self._events.find(
                    query,
                    {"owed": 0, "body": 0},
                    sort=[("conversation", ASCENDING), ("eseq", ASCENDING)],
                    limit=limit,
                )
            )
            # An edit carries the message's body as it is now (none once deleted).
            edited = sorted({d["message_id"] for d in docs if d["kind"] == EventKind.EDITED})
            bodies: dict[str, Sealed] = {}
            if edited:
                for m in self._messages.find(
                    {"_id": {"$in": edited}, "deleted": {"$ne": True}}, {"body": 1}
                ):
                    bodies[m["_id"]] = _sealed(m["body"])
            return [
                _event(d, bodies.get(d["message_id"]) if d["kind"] == EventKind.EDITED else None)
                for d in docs
            ]

        return await self._run(fn)

    async def ack_receipts(self, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
        if not acks:
            return []

        def fn() -> list[None]:
            ids = sorted({key.message_id for _, key in acks})
            docs = {
                d["_id"]: d
                for d in self._messages.find({"_id": {"$in": ids}}, {"sender": 1, "recipients": 1})
            }
            ops: list[UpdateOne] = []
            for sender, key in acks:
                doc = docs.get(key.message_id)
                if doc is None or doc["sender"] != sender or key.member not in doc["recipients"]:
                    continue
                at = f"receipts.{doc['recipients'].index(key.member)}"
                for status in SETTLED_BY_ACK[key.status]:
                    f = _field(status)
                    # Settles a receipt that exists and is unacked, exactly once:
                    # the filter makes a repeated or concurrent ack a no-op, so
                    # rpending stays the count of owed receipts.
                    ops.append(
                        UpdateOne(
                            {
                                "_id": key.message_id,
                                "sender": sender,
                                f"{at}.member": key.member,
                                f"{at}.{f}_ts": {"$ne": None},
                                f"{at}.{f}_acked": False,
                            },
                            {"$set": {f"{at}.{f}_acked": True}, "$inc": {"rpending": -1}},
                        )
                    )
            if ops:
                self._messages.bulk_write(ops, ordered=True)
            return [None] * len(acks)

        return await self._run(fn)

    async def owed_messages(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        query: dict[str, Any] = {"undelivered": username}
        if after is not None:
            # A range on the index's second key, so the scan starts at
            # ``after``'s conversation; the few entries of that conversation
            # up to ``after`` are dropped by the $nor.
            conv, seq = after
            query["conversation"] = {"$gte": conv}
            query["$nor"] = [{"conversation": conv, "seq": {"$lte": seq}}]

        def fn() -> list[StoredMessage]:
            docs = self._messages.find(
                query,
                _MSG_FIELDS,
                sort=[("conversation", ASCENDING), ("seq", ASCENDING)],
                limit=limit,
            )
            return [_message(d) for d in docs]

        return await self._run(fn)

    async def owed_receipts(
        self, username: str, limit: int, after: tuple[str, str] | None = None
    ) -> list[Receipt]:
        if limit <= 0:
            return []
        query: dict[str, Any] = {"sender": username, "rpending": {"$gt": 0}}
        if after is not None:
            query["_id"] = {"$gte": after[0]}

        def fn() -> list[Receipt]:
            # Pages by (message id, member) pairs. Every matching message owes
            # at least one pair, except perhaps the one ``after`` points into:
            # limit + 1 messages always hold ``limit`` pairs when there are as many.
            docs = self._messages.find(
                query,
                {"conversation": 1, "receipts": 1},
                sort=[("_id", ASCENDING)],
                limit=limit + 1,
            )
            out: list[Receipt] = []
            pairs = 0
            for doc in docs:
                for r in sorted(doc["receipts"], key=lambda r: r["member"]):
                    if after is not None and (doc["_id"], r["member"]) <= after:
                        continue
                    owed = [
                        Receipt(
                            doc["_id"],
                            doc["conversation"],
                            username,
                            r["member"],
                            status,
                            r[f"{_field(status)}_ts"],
                        )
                        for status in (Status.DELIVERED, Status.SEEN)
                        if r.get(f"{_field(status)}_ts") is not None
                        and not r.get(f"{_field(status)}_acked")
                    ]
                    if not owed:
                        continue
                    if pairs == limit:
                        return out
                    out.extend(owed)
                    pairs += 1
            return out

        return await self._run(fn)

    # -- administration ----------------------------------------------------------

    async def list_users(self, after: str | None, limit: int) -> list[User]:
        if limit <= 0:
            return []

        def fn() -> list[User]:
            docs = self._users.find(
                {"_id": {"$gt": after or ""}}, sort=[("_id", ASCENDING)], limit=limit
            )
            return [_user(d) for d in docs]

        return await self._run(fn)

    async def set_disabled(self, username: str, disabled: bool) -> None:
        def fn() -> None:
            done = self._users.update_one(
                {"_id": username, "deleted": {"$ne": True}}, {"$set": {"disabled": disabled}}
            )
            if done.matched_count == 0:
                if self._users.find_one({"_id": username}, {"_id": 1}) is None:
                    raise NotFound(f"no user '{username}'")
                raise Conflict(f"user '{username}' is deleted")

        await self._run(fn)

    async def delete_user(self, username: str) -> UserDeleted:
        def fn() -> UserDeleted:
            done = self._users.update_one(
                {"_id": username},
                {"$set": {"disabled": True, "deleted": True, "password_hash": ""}},
            )
            if done.matched_count == 0:
                raise NotFound(f"no user '{username}'")
            # Not owed to them any more: out of the owed and unread index keys.
            dropped = self._messages.update_many(
                {"undelivered": username},
                {"$pull": {"undelivered": username, "unseen": username}},
            ).modified_count
            self._events.update_many({"owed": username}, {"$pull": {"owed": username}})
            # Receipts owed to them as a sender: settle each one that happened.
            settled = 0
            for doc in self._messages.find(
                {"sender": username, "rpending": {"$gt": 0}}, {"receipts": 1}
            ):
                sets: dict[str, Any] = {}
                for i, r in enumerate(doc["receipts"]):
                    for status in (Status.DELIVERED, Status.SEEN):
                        f = _field(status)
                        if r.get(f"{f}_ts") is not None and not r.get(f"{f}_acked"):
                            sets[f"receipts.{i}.{f}_acked"] = True
                if sets:
                    # Compare-and-set on rpending: a receipt made meanwhile is
                    # left owed for the next delete (idempotent).
                    res = self._messages.update_one(
                        {"_id": doc["_id"], "rpending": len(sets)},
                        {"$set": sets, "$inc": {"rpending": -len(sets)}},
                    )
                    settled += len(sets) if res.modified_count else 0
            return UserDeleted(messages_dropped=dropped, receipts_settled=settled)

        return await self._run(fn)

    async def stats(self, since: int) -> StoreStats:
        def fn() -> StoreStats:
            users = self._users.count_documents({})
            disabled = self._users.count_documents({"disabled": True})
            deleted = self._users.count_documents({"deleted": True})
            owed_messages = 0
            owed_receipts = 0
            delivered = seen = 0
            for doc in self._messages.find(
                {"$or": [{"undelivered.0": {"$exists": True}}, {"rpending": {"$gt": 0}}]},
                {"undelivered": 1, "rpending": 1},
            ):
                owed_messages += len(doc.get("undelivered") or ())
                owed_receipts += int(doc.get("rpending") or 0)
            for doc in self._messages.find(
                {
                    "$or": [
                        {"receipts.delivered_ts": {"$gte": since}},
                        {"receipts.seen_ts": {"$gte": since}},
                    ]
                },
                {"receipts": 1},
            ):
                for r in doc["receipts"]:
                    delivered += (r.get("delivered_ts") or -1) >= since
                    seen += (r.get("seen_ts") or -1) >= since
            return StoreStats(
                users=users,
                disabled=disabled,
                deleted=deleted,
                conversations=self._conversations.count_documents({}),
                messages=self._messages.count_documents({}),
                owed_messages=owed_messages,
                owed_receipts=owed_receipts,
                since=since,
                messages_since=self._messages.count_documents({"ts": {"$gte": since}}),
                delivered_since=delivered,
                seen_since=seen,
            )

        return await self._run(fn)

    async def count_by_key(self) -> dict[str, int]:
        def fn() -> dict[str, int]:
            return {
                row["_id"]: row["n"]
                for row in self._messages.aggregate(
                    [
                        # A deleted message's erased body is under no key.
                        {"$match": {"deleted": {"$ne": True}}},
                        {"$group": {"_id": "$body.key_id", "n": {"$sum": 1}}},
                    ]
                )
            }

        return await self._run(fn)

    async def messages_by_key(
        self, key_id: str, after: str | None, limit: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []

        def fn() -> list[StoredMessage]:
            # Walks the _id index from ``after``: all pages together read the
            # collection once, with no index on the key id to slow down appends.
            docs = self._messages.find(
                {"_id": {"$gt": after or ""}, "body.key_id": key_id, "deleted": {"$ne": True}},
                _BASE_FIELDS,
                sort=[("_id", ASCENDING)],
                limit=limit,
            )
            return [replace(_message(d), delivered_to=(), seen_by=()) for d in docs]

        return await self._run(fn)

    async def reseal(self, batch: Sequence[Reseal]) -> list[bool]:
        if not batch:
            return []

        def fn() -> list[bool]:
            out = []
            for item in batch:
                done = self._messages.update_one(
                    {
                        "_id": item.message_id,
                        "body.key_id": item.expected.key_id,
                        "body.nonce": item.expected.nonce,
                        "body.ciphertext": item.expected.ciphertext,
                    },
                    {
                        "$set": {
                            "body": {
                                "key_id": item.body.key_id,
                                "nonce": item.body.nonce,
                                "ciphertext": item.body.ciphertext,
                            }
                        }
                    },
                )
                out.append(done.modified_count == 1)
            return out

        return await self._run(fn)


def _duplicate(doc: dict[str, Any]) -> Appended:
    return Appended(doc["_id"], doc["conversation"], doc["seq"], doc["ts"], duplicate=True)


def _stamp(doc: dict[str, Any] | None, idx: int, status: Status) -> str | None:
    """The token of the update that made ``status`` for receipt ``idx``."""
    receipts = (doc or {}).get("receipts") or []
    if idx >= len(receipts):
        return None
    return receipts[idx].get(f"{_field(status)}_op")


def _need(value: T | None) -> T:
    assert value is not None
    return value


def _guard(fn: Callable[..., T], *args: object) -> T:
    """Run a store call; a MongoDB failure becomes Unavailable (nothing else leaks)."""
    try:
        return fn(*args)
    except ChatError:
        raise
    except (
        ServerSelectionTimeoutError,
        NetworkTimeout,
        AutoReconnect,
        ConnectionFailure,
        ExecutionTimeout,
        WTimeoutError,
    ) as exc:
        raise Unavailable(f"MongoDB did not answer: {_short(exc)}") from None
    except PyMongoError as exc:
        raise Unavailable(f"MongoDB error: {_short(exc)}") from None
    except bson.errors.BSONError as exc:
        raise Unavailable(f"MongoDB refused a document: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."
