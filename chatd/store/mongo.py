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
* **group membership** lives in the conversation document (``members``,
  ``admins``, ``joined``: the first seq of each member who joined later,
  ``mver``: how many changes it has had). A change is judged by
  :func:`chatd.core.events.plan_membership` against that document and
  committed by one compare-and-set on it (``mver`` as read, ``last_seq``
  still below the change's ``from_seq`` = one past the highest stored seq,
  no change pending), which also sets ``pending`` to its ``members`` event
  and keeps the change in ``changes`` (the latest few). The event is then
  inserted with the next eseq like any event, and ``pending`` unset; any
  writer that finds ``pending`` (the next change, append or event of the
  group) stores it first, so a crash in between is repaired and members
  events follow the changes in order. An event in a group reads the
  members after its eseq guess, so the eseq index serialises it with the
  members events: it is owed to (and allowed for) the members as of its
  eseq. An append reads the members with ``last_seq``, refuses a
  non-member's message (nothing stored) and stores the others owed to
  those members, with the ``mver`` it read; it then advances ``last_seq``
  with a compare-and-set on that ``mver``. If a change committed in
  between, each message it stored is placed again: owed to the members
  for its seq (``changes`` says which changes start after it), or, if its
  sender was removed before it, turned into a tombstone and answered
  refused. A retry (a duplicate) does the same for a first call that
  stopped before it could. What remains (``docs/mongo.md``): such a
  message is readable with the members of before for the moment until it
  is placed, and stays so if its writer stopped and the client never
  retries.
* **end-to-end devices** are claimed by one insert into ``devices`` that
  carries ``(user, device)`` and ``(user, slot)``, both under unique
  indexes: an id is registered once (a second writer of it fails and reads
  it back: ``same`` or ``conflict``), and a user holds at most ``limit``
  devices because each takes a distinct slot below ``limit`` (slots are
  never given back, as removed ids stay taken). A removal is one
  conditional update (``removed_ts`` null -> ts).

Errors: every pymongo/BSON failure becomes :class:`Unavailable`; a taken
username (and a taken group id) is :class:`Conflict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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
from chatd.core.errors import ChatError, Conflict, Internal, NotFound, Unavailable
from chatd.core.events import Refusal, Target, judge, manages, plan_membership
from chatd.core.model import (
    Appended,
    Conversation,
    ConversationSummary,
    Device,
    Epoch,
    EpochShare,
    EventKind,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMembership,
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
from chatd.core.names import GROUP_PREFIX, dm_id, rid
from chatd.ports import Reseal, Store, StoreStats, UserDeleted, Writes, Written

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
#: How many of a group's latest membership changes its document keeps
#: (``changes``): what lets an append that raced them place its message.
_CHANGES_KEPT = 16

USERS = "users"
CONVERSATIONS = "conversations"
MESSAGES = "messages"
EVENTS = "events"
DEVICES = "devices"
E2E_EPOCHS = "e2e_epochs"


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
    Index(
        DEVICES,
        "user_device",
        (("user", ASCENDING), ("device", ASCENDING)),
        "a device id is registered once per user; put_device's read-back, remove_device",
        unique=True,
    ),
    Index(
        DEVICES,
        "user_slot",
        (("user", ASCENDING), ("slot", ASCENDING)),
        "the per-user bound: one device per (user, slot), slot < limit; a user's"
        " devices and taken slots ({user})",
        unique=True,
    ),
    Index(
        DEVICES,
        "device_id",
        (("device", ASCENDING),),
        "a device id is one device's, whoever's (end-to-end shares are addressed by it)",
        unique=True,
    ),
    Index(
        DEVICES,
        "active_devices",
        (("user", ASCENDING), ("removed_ts", ASCENDING)),
        "active_devices: {user: {$in}, removed_ts: null}",
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
    "seq": 1,
    "sender": 1,
    "ts": 1,
    "deleted": 1,
    "reactions": 1,
    "applied_eseq": 1,
}
_DELETE_FIELDS = {**_TARGET_FIELDS, "receipts": 1, "undelivered": 1}
#: What a deleted message's body is stored as.
_ERASED = {"key_id": "", "nonce": b"", "ciphertext": b""}
#: What reads of a conversation leave out: the bookkeeping of membership
#: changes (``changes``, ``pending``), which only writers use.
_CONV_FIELDS = {"changes": 0, "pending": 0}


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


def _device(doc: dict[str, Any]) -> Device:
    return Device(
        user=doc["user"],
        device=doc["device"],
        sig_key=doc["sig_key"],
        dh_key=doc["dh_key"],
        name=doc["name"],
        self_sig=doc["self_sig"],
        created_ts=doc["created_ts"],
        removed_ts=doc.get("removed_ts"),
    )


def _tombstone() -> dict[str, Any]:
    """The fields of a deleted message: a tombstone that keeps its seq, with
    no receipts, reactions or owed-message keys left (a later mark or ack
    finds no recipient)."""
    return {
        "body": dict(_ERASED),
        "deleted": True,
        "reactions": [],
        "recipients": [],
        "receipts": [],
        "status": {"delivered_to": [], "seen_by": []},
        "undelivered": [],
        "unseen": [],
        "rpending": 0,
    }


def _joined(doc: dict[str, Any]) -> dict[str, int]:
    """member -> the first seq they may read, for the members of a group who
    joined after it began (everyone else reads from seq 1)."""
    members = set(doc.get("members") or ())
    return {j["member"]: j["seq"] for j in doc.get("joined") or () if j["member"] in members}


def _admins(doc: dict[str, Any]) -> list[str]:
    """A group's admins (none in a document made before admins existed)."""
    members = set(doc.get("members") or ())
    return sorted(a for a in doc.get("admins") or () if a in members)


def _conversation(doc: dict[str, Any]) -> Conversation:
    return Conversation(
        id=doc["_id"],
        kind=doc["kind"],
        members=tuple(sorted(doc["members"])),
        title=doc.get("title"),
        created_ts=doc["created_ts"],
        created_by=doc.get("created_by"),
        admins=tuple(_admins(doc)),
        joined=tuple(sorted((m, seq) for m, seq in _joined(doc).items() if seq > 1)),
        e2e=bool(doc.get("e2e")),
    )


def _members_at(doc: dict[str, Any], since: int, seq: int) -> set[str] | None:
    """The members of group ``doc`` for the message at ``seq``, planned
    against membership version ``since``: the members now, with every
    change made after ``since`` that starts after ``seq`` undone (changes
    start at increasing seqs, so those are the latest ones). None if that
    needs changes older than ``doc`` keeps."""
    members = set(doc["members"])
    later = [c for c in doc.get("changes") or () if c["mver"] > since]
    for change in sorted(later, key=lambda c: c["mver"], reverse=True):
        if change["from_seq"] <= seq:
            return members
        members -= set(change["added"])
        members |= set(change["removed"])
    return members if len(later) == int(doc.get("mver", 0)) - since else None


def _message_doc(
    msg: NewMessage, seq: int, to: Sequence[str], mver: int | None = None
) -> dict[str, Any]:
    recipients = list(dict.fromkeys(to))  # unique, order kept
    doc: dict[str, Any] = {
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
        "receipts": [_receipt(r) for r in recipients],
        # Index keys: who is still owed this message / has not seen it.
        "undelivered": list(recipients),
        "unseen": list(recipients),
        # Receipts of this message its sender has not acked yet.
        "rpending": 0,
    }
    if mver is not None:
        # A group's message: the membership version it was planned with.
        doc["mver"] = mver
    return doc


def _receipt(member: str) -> dict[str, Any]:
    return {
        "member": member,
        "delivered_ts": None,
        "seen_ts": None,
        "delivered_acked": False,
        "seen_acked": False,
    }


def _event_doc(ev: NewEvent, eseq: int, to: Sequence[str]) -> dict[str, Any]:
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
        "owed": list(dict.fromkeys(to)),
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
        action=doc.get("action"),
        users=tuple(doc.get("users") or ()),
        members=tuple(doc.get("members") or ()),
        admins=tuple(doc.get("admins") or ()),
        title=doc.get("title"),
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
    return {"$set": {**done, **_tombstone()}}


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
        self._devices = self._db.get_collection(DEVICES)
        self._epochs = self._db.get_collection(E2E_EPOCHS)
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
        e2e: bool = False,
    ) -> Conversation:
        doc = self._new_conversation(id, "group", title, members, ts)
        doc["created_by"] = creator
        if e2e:
            doc["e2e"] = True
        # The creator is the first admin; mver counts membership changes.
        doc["admins"] = [creator] if creator in doc["members"] else []
        doc["mver"] = 0

        def fn() -> Conversation:
            try:
                self._conversations.insert_one(doc)
            except DuplicateKeyError:
                raise Conflict(f"conversation id '{id}' is taken") from None
            return _conversation(doc)

        return await self._run(fn)

    async def get_conversation(self, id: str) -> Conversation | None:
        def fn() -> Conversation | None:
            doc = self._conversations.find_one({"_id": id}, _CONV_FIELDS)
            return None if doc is None else _conversation(doc)

        return await self._run(fn)

    async def change_group(self, change: NewMembership) -> EventResult:
        return await self._run(self._change_group, change)

    def _change_group(self, change: NewMembership) -> EventResult:
        found = self._events.find_one({"_id": change.id})
        if found is not None:
            return EventResult(_event(found), duplicate=True, recipients=())
        conv = change.conversation
        for _ in range(_EVENT_CONFLICTS):
            doc = self._conversations.find_one({"_id": conv}, {"changes": 0})
            if doc is None:
                return EventResult(None, refused="not_found", reason="no such conversation")
            waiting = doc.get("pending")
            if waiting is not None:
                # A change committed and its event not stored yet (its
                # writer is a moment ahead, or stopped): store it first, so
                # that members events follow the changes in order.
                stored = self._announce(waiting)
                if waiting["_id"] == change.id:
                    return EventResult(_event(stored), duplicate=True, recipients=())
                continue
            joined = _joined(doc)
            plan = plan_membership(
                change.action,
                change.by,
                change.users,
                change.title,
                kind=doc["kind"],
                # Join order, the longest-standing first (ties by name).
                members=sorted(doc["members"], key=lambda m: (joined.get(m, 1), m)),
                admins=_admins(doc),
                current_title=doc.get("title"),
            )
            if isinstance(plan, Refusal):
                return EventResult(None, refused=plan.code, reason=plan.reason)
            # The first seq the group after the change applies to: one past
            # the highest stored (read after the document, so it only grows
            # from one change to the next). Compare-and-set below on the
            # version read and on last_seq still below it, so an append that
            # has stored and counted a message at from_seq or later makes
            # this change plan again.
            highest = self._messages.find_one(
                {"conversation": conv}, {"seq": 1}, sort=[("seq", DESCENDING)]
            )
            from_seq = max(doc.get("last_seq", 0), highest["seq"] if highest else 0) + 1
            version = int(doc.get("mver", 0)) + 1
            event = {
                "_id": change.id,
                "conversation": conv,
                "kind": EventKind.MEMBERS.value,
                "message_id": "",
                "by": change.by,
                "cid": change.id,
                "ts": change.ts,
                "action": change.action.value,
                "users": list(plan.added or plan.removed or change.users),
                "members": list(plan.members),
                "admins": list(plan.admins),
                "title": plan.title,
                "mver": version,
                "from_seq": from_seq,
                "owed": list(plan.notify),
            }
            done = self._conversations.update_one(
                {
                    "_id": conv,
                    "mver": {"$not": {"$gt": version - 1}},
                    "last_seq": {"$not": {"$gte": from_seq}},
                    "pending": {"$exists": False},
                },
                {
                    "$set": {
                        "members": list(plan.members),
                        "admins": list(plan.admins),
                        "joined": [
                            {"member": m, "seq": s} for m, s in joined.items() if m in plan.members
                        ]
                        + [{"member": u, "seq": from_seq} for u in plan.added],
                        "title": plan.title,
                        "mver": version,
                        # The event, until it is stored with its eseq.
                        "pending": event,
                    },
                    "$push": {
                        "changes": {
                            "$each": [
                                {
                                    "mver": version,
                                    "from_seq": from_seq,
                                    "added": list(plan.added),
                                    "removed": list(plan.removed),
                                }
                            ],
                            "$slice": -_CHANGES_KEPT,
                        }
                    },
                },
            )
            if done.matched_count == 0:
                continue  # another change, or a message at from_seq: plan again
            return EventResult(_event(self._announce(event)), recipients=plan.notify)
        raise Unavailable("too much contention changing the group")

    def _announce(self, event: dict[str, Any]) -> dict[str, Any]:
        """Store the members event of a committed change with the next eseq
        (once, whoever calls: the changer, or any writer that finds it
        pending), then clear it from the conversation; the stored event."""
        for _ in range(_EVENT_CONFLICTS):
            found = self._events.find_one({"_id": event["_id"]})
            if found is not None:
                break
            top = self._events.find_one(
                {"conversation": event["conversation"]}, {"eseq": 1}, sort=[("eseq", DESCENDING)]
            )
            stored = {**event, "eseq": (top["eseq"] if top else 0) + 1}
            try:
                self._events.insert_one(stored)
            except DuplicateKeyError:
                # Another writer stored it (the next round finds it) or took
                # the eseq (the next round plans again).
                taken = self._events.find_one({"by": event["by"], "cid": event["cid"]}, {"_id": 1})
                if taken is not None and taken["_id"] != event["_id"]:
                    raise Unavailable(f"event cid {event['cid']} is already taken") from None
                continue
            found = stored
            break
        else:
            raise Unavailable("too much contention storing a group change")
        self._conversations.update_one(
            {"_id": event["conversation"], "pending._id": event["_id"]},
            {"$unset": {"pending": ""}},
        )
        return found

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        def fn() -> list[ConversationSummary]:
            convs = list(self._conversations.find({"members": username}, _CONV_FIELDS))
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
            # Not what came before the caller joined.
            wanted = [
                {"conversation": c["_id"], "seq": c["last_seq"]}
                for c in convs
                if c.get("last_seq", 0) >= _joined(c).get(username, 1)
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
                    admins=tuple(_admins(c)),
                    joined=tuple(sorted((m, q) for m, q in _joined(c).items() if q > 1)),
                    e2e=bool(c.get("e2e")),
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

    async def contacts(self, username: str) -> list[str]:
        def fn() -> list[str]:
            # The members of the user's conversations (the members_kind
            # index), each once: distinct unwinds the member arrays.
            names = self._conversations.distinct("members", {"members": username})
            return sorted(n for n in names if n != username)

        return await self._run(fn)

    async def sent_id(self, sender: str, cid: str) -> str | None:
        def fn() -> str | None:
            doc = self._messages.find_one({"sender": sender, "cid": cid}, {"_id": 1})
            return None if doc is None else str(doc["_id"])

        return await self._run(fn)

    async def active_devices(self, users: Sequence[str]) -> list[str]:
        def fn() -> list[str]:
            docs = self._devices.find(
                {"user": {"$in": list(users)}, "removed_ts": None}, {"device": 1}
            )
            return sorted(d["device"] for d in docs)

        if not users:
            return []
        return await self._run(fn)

    # -- end-to-end epochs ---------------------------------------------------------
    #
    # One document per epoch: _id "conversation:epoch", the device that made
    # it, and ``shares`` {recipient device: sealed key} (device ids are
    # A-Z a-z 0-9 _ -: safe as field names).

    async def put_epoch(
        self,
        conversation: str,
        epoch: str,
        user: str,
        device: str,
        shares: Mapping[str, str],
        ts: int,
    ) -> str:
        def fn() -> str:
            key = f"{conversation}:{epoch}"
            for _ in range(_APPEND_CONFLICTS):
                doc = self._epochs.find_one({"_id": key})
                if doc is None:
                    try:
                        self._epochs.insert_one(
                            {
                                "_id": key,
                                "conversation": conversation,
                                "epoch": epoch,
                                "user": user,
                                "device": device,
                                "created_ts": ts,
                                "shares": dict(shares),
                            }
                        )
                    except DuplicateKeyError:
                        continue  # made meanwhile: look again
                    return "created"
                if (doc["user"], doc["device"]) != (user, device):
                    return "conflict"
                have = doc.get("shares") or {}
                if any(have.get(d, s) != s for d, s in shares.items()):
                    return "conflict"
                new = {d: s for d, s in shares.items() if d not in have}
                if not new:
                    return "added"
                # Compare-and-set: a share added meanwhile sends it round again.
                done = self._epochs.update_one(
                    {"_id": key, **{f"shares.{d}": {"$exists": False} for d in new}},
                    {"$set": {f"shares.{d}": s for d, s in new.items()}},
                )
                if done.matched_count == 1:
                    return "added"
            raise Unavailable(f"too much contention adding shares to epoch {epoch}")

        return await self._run(fn)

    async def get_epoch(self, conversation: str, epoch: str) -> Epoch | None:
        def fn() -> Epoch | None:
            doc = self._epochs.find_one({"_id": f"{conversation}:{epoch}"})
            if doc is None:
                return None
            return Epoch(
                conversation,
                epoch,
                doc["user"],
                doc["device"],
                tuple(sorted(doc.get("shares") or {})),
                doc["created_ts"],
            )

        return await self._run(fn)

    async def epoch_shares(
        self, conversation: str, epochs: Sequence[str], devices: Sequence[str]
    ) -> list[EpochShare]:
        def fn() -> list[EpochShare]:
            ids = [f"{conversation}:{e}" for e in epochs]
            mine = set(devices)
            out = []
            for doc in self._epochs.find({"_id": {"$in": ids}}, sort=[("_id", ASCENDING)]):
                for to, share in sorted((doc.get("shares") or {}).items()):
                    if to in mine:
                        out.append(EpochShare(doc["epoch"], doc["user"], doc["device"], to, share))
            return out

        if not epochs or not devices:
            return []
        return await self._run(fn)

    # -- end-to-end devices ------------------------------------------------------

    async def put_device(self, device: Device, limit: int) -> str:
        return await self._run(self._put_device, device, limit)

    def _put_device(self, device: Device, limit: int) -> str:
        """Register ``device``: the insert that claims its id also claims the
        lowest free slot below ``limit`` (unique on (user, device) and on
        (user, slot)), so concurrent registrations cannot exceed the bound.
        A duplicate key sends it round again: the id registered meanwhile is
        answered ``same`` / ``conflict``, a slot taken meanwhile makes it
        pick another. Each slot lost is one more slot taken for good (slots
        are never given back), so ``limit + 2`` rounds always suffice."""
        key = {"user": device.user, "device": device.device}
        keys = {"sig_key": device.sig_key, "dh_key": device.dh_key, "self_sig": device.self_sig}
        for _ in range(max(limit, 0) + 2):
            found = self._devices.find_one(key, {**dict.fromkeys(keys, 1), "removed_ts": 1})
            if found is not None:
                if found.get("removed_ts") is not None or any(
                    found.get(k) != v for k, v in keys.items()
                ):
                    return "conflict"
                # Compare-and-set: a removal that landed since wins (conflict).
                done = self._devices.update_one(
                    {**key, **keys, "removed_ts": None}, {"$set": {"name": device.name}}
                )
                return "same" if done.matched_count == 1 else "conflict"
            if self._devices.find_one({"device": device.device}, {"_id": 1}) is not None:
                return "conflict"  # another user's device id
            taken = {d.get("slot") for d in self._devices.find({"user": device.user}, {"slot": 1})}
            slot = next((s for s in range(limit) if s not in taken), None)
            if slot is None:
                return "full"
            try:
                self._devices.insert_one(
                    {
                        **key,
                        "slot": slot,
                        **keys,
                        "name": device.name,
                        "created_ts": device.created_ts,
                        "removed_ts": None,
                    }
                )
            except DuplicateKeyError:
                continue  # the id or the slot was taken meanwhile: look again
            return "created"
        raise Unavailable(f"too much contention registering device {device.device}")

    async def remove_device(self, user: str, device: str, ts: int) -> bool:
        def fn() -> bool:
            done = self._devices.update_one(
                {"user": user, "device": device, "removed_ts": None},
                {"$set": {"removed_ts": ts}},
            )
            return done.matched_count == 1

        return await self._run(fn)

    async def devices(self, user: str) -> list[Device]:
        def fn() -> list[Device]:
            docs = self._devices.find(
                {"user": user}, sort=[("created_ts", ASCENDING), ("device", ASCENDING)]
            )
            return [_device(d) for d in docs]

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
        # Group messages to check against the changes made since: the
        # membership version each was planned with (a retry's included: its
        # first call may have stopped before checking).
        since: dict[int, int] = {}
        for i in unique:
            doc = stored.get((batch[i].sender, batch[i].cid))
            if doc is not None:
                results[i] = _duplicate(doc)
                if "mver" in doc:
                    since[i] = doc["mver"]
            else:
                pending.append(i)

        # The allocator's first guess: each conversation's last_seq (also
        # tells an unknown conversation apart before anything is written);
        # and a group's members as they are now, whatever the caller saw:
        # who may send, who is owed the message.
        top: dict[str, int] = {}
        groups: dict[str, dict[str, Any]] = {}
        to: dict[int, Sequence[str]] = {}
        names = sorted({batch[i].conversation for i in unique})
        fields = {"last_seq": 1, "kind": 1, "members": 1, "mver": 1, "pending": 1, "e2e": 1}
        e2e_on: set[str] = set()
        for doc in self._conversations.find({"_id": {"$in": names}}, fields):
            top[doc["_id"]] = doc.get("last_seq", 0)
            if doc.get("kind") == "group":
                groups[doc["_id"]] = doc
            if doc.get("e2e"):
                e2e_on.add(doc["_id"])
        if pending:
            missing = [c for c in sorted({batch[i].conversation for i in pending}) if c not in top]
            if missing:
                raise NotFound(f"conversation {missing[0]} does not exist")
            for doc in groups.values():
                if doc.get("pending") is not None:
                    self._announce(doc["pending"])  # a change's event not yet stored
            allowed: list[int] = []
            turned: set[str] = set()
            for i in pending:
                msg = batch[i]
                group = groups.get(msg.conversation)
                if msg.e2e:
                    turned.add(msg.conversation)
                elif msg.conversation in e2e_on or msg.conversation in turned:
                    # A plain body in an end-to-end conversation (or after an
                    # end-to-end message of the same batch): refused.
                    results[i] = Appended(
                        msg.id, msg.conversation, 0, msg.ts, False, refused="e2e_required"
                    )
                    continue
                if group is None:
                    to[i] = msg.recipients
                elif msg.sender in group["members"]:
                    to[i] = sorted(set(group["members"]) - {msg.sender})
                    since[i] = int(group.get("mver", 0))
                else:
                    # Not a member (any more): refused, nothing stored.
                    results[i] = Appended(
                        msg.id, msg.conversation, 0, msg.ts, False, refused="forbidden"
                    )
                    continue
                allowed.append(i)
            pending = allowed

        conflicts = 0
        while pending:
            planned: list[int] = []
            docs: list[dict[str, Any]] = []
            next_seq = dict(top)
            for i in pending:
                msg = batch[i]
                next_seq[msg.conversation] += 1
                planned.append(next_seq[msg.conversation])
                docs.append(_message_doc(msg, next_seq[msg.conversation], to[i], since.get(i)))
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
                    msg.id,
                    msg.conversation,
                    planned[k],
                    msg.ts,
                    False,
                    tuple(dict.fromkeys(to[pending[k]])),
                )
            if failed == len(pending):
                break
            # The item at ``failed`` lost either its (sender, cid) — a
            # concurrent duplicate: answer the winner — or its seq — another
            # writer took it: plan again from the true highest seq.
            i = pending[failed]
            msg = batch[i]
            dup = self._messages.find_one(
                {"sender": msg.sender, "cid": msg.cid},
                {"conversation": 1, "seq": 1, "ts": 1, "refused": 1, "mver": 1},
            )
            rest = pending[failed + 1 :]
            if dup is not None:
                results[i] = _duplicate(dup)
                since.pop(i, None)
                if "mver" in dup:
                    since[i] = dup["mver"]
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

        # Advance each conversation's counter and activity time. $max keeps
        # this monotonic under any interleaving; duplicates are included so
        # that a retry repairs a counter a crash left behind.
        advance: dict[str, tuple[int, int]] = {}
        for res in results:
            if res is not None and res.refused is None:
                seq, ts = advance.get(res.conversation, (0, 0))
                advance[res.conversation] = (max(seq, res.seq), max(ts, res.ts))
        # The first end-to-end message switches its conversation (one way).
        switched = sorted(
            {
                res.conversation
                for msg, res in zip(batch, results, strict=True)
                if msg.e2e and res is not None and res.refused is None
            }
            - e2e_on
        )
        if switched:
            self._conversations.update_many({"_id": {"$in": switched}}, {"$set": {"e2e": True}})
        plain = [
            UpdateOne({"_id": conv}, {"$max": {"last_seq": seq, "last_ts": ts}})
            for conv, (seq, ts) in sorted(advance.items())
            if conv not in groups
        ]
        if plain:
            self._conversations.bulk_write(plain, ordered=True)
        for conv, (seq, ts) in sorted(advance.items()):
            if conv in groups:
                mine = {i: v for i, v in since.items() if batch[i].conversation == conv}
                self._count_in_group(conv, seq, ts, groups[conv], mine, batch, results)

        out: list[Appended] = []
        for i, msg in enumerate(batch):
            res = results[i]
            if res is None:
                res = replace(_need(results[first_of[(msg.sender, msg.cid)]]), duplicate=True)
            out.append(res)
        return out

    def _count_in_group(
        self,
        conv: str,
        seq: int,
        ts: int,
        group: dict[str, Any],
        since: dict[int, int],
        batch: list[NewMessage],
        results: list[Appended | None],
    ) -> None:
        """Advance a group's counter, guarded by the membership version read.
        Each message ``since`` names (stored by this call, or a retry's) that
        was planned with an older version than the group has now is placed
        again: owed to the members for its seq, refused if its sender was
        not one. The guard repeats this for a change that commits meanwhile."""
        version = int(group.get("mver", 0))
        fields = {"members": 1, "mver": 1, "changes": 1}
        doc = None
        if any(v < version for v in since.values()):
            doc = self._conversations.find_one({"_id": conv}, fields)
        for _ in range(_APPEND_CONFLICTS):
            if doc is not None:
                version = int(doc.get("mver", 0))
                for i, v in since.items():
                    res = results[i]
                    if v < version and res is not None and res.refused is None:
                        members = _members_at(doc, v, res.seq)
                        if members is not None:
                            results[i] = self._place(res, batch[i].sender, members)
            done = self._conversations.update_one(
                {"_id": conv, "mver": {"$not": {"$gt": version}}},
                {"$max": {"last_seq": seq, "last_ts": ts}},
            )
            if done.matched_count:
                # From here on, a change plans from a seq past these messages
                # (its compare-and-set on last_seq fails otherwise).
                return
            doc = self._conversations.find_one({"_id": conv}, fields)
            if doc is None:
                raise Unavailable(f"conversation {conv} vanished")
        raise Unavailable("too much contention appending to a group")

    def _place(self, res: Appended, sender: str, members: set[str]) -> Appended:
        """Message ``res``, stored a moment ago, as it must be for the group's
        members ``members`` at its seq."""
        if sender not in members:
            # Removed before this seq: refused after all. The seq stays taken
            # (no gaps) by a tombstone; a retry of it answers refused too.
            self._messages.update_one(
                {"_id": res.id}, {"$set": {**_tombstone(), "refused": "forbidden"}}
            )
            return replace(res, recipients=(), refused="forbidden")
        to = tuple(sorted(members - {sender}))
        if res.recipients is None or set(to) != set(res.recipients):
            self._reassign(res.id, to)
        return replace(res, recipients=to)

    def _reassign(self, message_id: str, to: Sequence[str]) -> None:
        """Make ``to`` the recipients of a message: receipts kept for those
        who stay, fresh ones for those added, none for those dropped. A
        compare-and-set on the receipts read, so that a mark made meanwhile
        is not lost (the reassignment is planned again from it)."""
        fields = {"recipients": 1, "receipts": 1, "status": 1, "undelivered": 1, "unseen": 1}
        wanted = set(to)
        # A receipt moves at most twice: this many rounds always suffice.
        for _ in range(2 * len(wanted) + 4):
            doc = self._messages.find_one({"_id": message_id, "deleted": {"$ne": True}}, fields)
            if doc is None:
                return  # deleted meanwhile: nobody is owed it any more
            old = doc["recipients"]
            if set(old) == wanted:
                return
            added = [m for m in to if m not in old]
            receipts = [r for r in doc["receipts"] if r["member"] in wanted]
            receipts += [_receipt(m) for m in added]
            status = doc.get("status") or {}
            owed = sum(
                r.get(f"{_field(st)}_ts") is not None and not r.get(f"{_field(st)}_acked")
                for r in receipts
                for st in (Status.DELIVERED, Status.SEEN)
            )
            done = self._messages.update_one(
                {"_id": message_id, "recipients": old, "receipts": doc["receipts"]},
                {
                    "$set": {
                        "recipients": [r["member"] for r in receipts],
                        "receipts": receipts,
                        "status": {
                            "delivered_to": [
                                m for m in status.get("delivered_to") or () if m in wanted
                            ],
                            "seen_by": [m for m in status.get("seen_by") or () if m in wanted],
                        },
                        "undelivered": [m for m in doc.get("undelivered") or () if m in wanted]
                        + added,
                        "unseen": [m for m in doc.get("unseen") or () if m in wanted] + added,
                        "rpending": owed,
                    }
                },
            )
            if done.matched_count:
                return
        raise Unavailable("too much contention placing a message")

    def _stored_by_key(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        if not keys:
            return {}
        by_sender: dict[str, list[str]] = {}
        for sender, cid in sorted(keys):
            by_sender.setdefault(sender, []).append(cid)
        query = {
            "$or": [{"sender": s, "cid": {"$in": cids}} for s, cids in sorted(by_sender.items())]
        }
        fields = {
            "conversation": 1,
            "seq": 1,
            "ts": 1,
            "sender": 1,
            "cid": 1,
            "refused": 1,
            "mver": 1,
        }
        return {(d["sender"], d["cid"]): d for d in self._messages.find(query, fields)}

    async def history(
        self, conversation: str, before: int | None, limit: int, viewer: str | None = None
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []

        def fn() -> list[StoredMessage]:
            query: dict[str, Any] = {"conversation": conversation}
            seq: dict[str, int] = {}
            if viewer is not None:
                conv = self._conversations.find_one(
                    {"_id": conversation}, {"members": 1, "joined": 1}
                )
                if conv is None or viewer not in conv["members"]:
                    return []
                start = _joined(conv).get(viewer, 1)
                if start > 1:
                    seq["$gte"] = start
            if before is not None:
                seq["$lt"] = before
            if seq:
                query["seq"] = seq
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
        fields = {"sender": 1, "conversation": 1, "recipients": 1, "receipts": 1, "deleted": 1}
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
                    # The sender's own, or deleted for everyone (an ack that
                    # crossed the deletion): nothing to do, not an error.
                    known = doc["sender"] == mark.user or bool(doc.get("deleted"))
                    results[i] = MarkResult((), known=known)
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
            # Read the highest eseq first, then the group's members and the
            # message with every event up to it applied: the insert of the
            # next eseq below succeeds only if no event of the conversation
            # (a members event included) was stored in between, so the
            # judgement holds at the moment the event is stored.
            top = self._events.find_one(
                {"conversation": ev.conversation}, {"eseq": 1}, sort=[("eseq", DESCENDING)]
            )
            eseq = (top["eseq"] if top else 0) + 1
            group: dict[str, Any] | None = None
            if ev.conversation.startswith(GROUP_PREFIX):
                group = self._conversations.find_one(
                    {"_id": ev.conversation, "kind": "group"},
                    {"members": 1, "admins": 1, "joined": 1, "pending": 1},
                )
                if group is not None and group.get("pending") is not None:
                    # A change committed, its event not stored yet: it goes first.
                    self._announce(group["pending"])
                    continue
            doc = self._settled(ev.message_id, fields)
            target = None
            mine, already = 0, False
            if doc is not None:
                target = Target(
                    doc["conversation"],
                    doc["sender"],
                    doc["ts"],
                    bool(doc.get("deleted")),
                    doc.get("seq", 1),
                )
                own = [r["emoji"] for r in doc.get("reactions") or () if r["user"] == ev.by]
                mine, already = len(own), ev.emoji in own
            to: Sequence[str] = ev.recipients
            visible_from = 1
            moderator = ev.moderator
            if ev.conversation.startswith(GROUP_PREFIX):
                # The group as it is now: owed to its members, acted on by
                # members only (an operator, ``ev.moderator``, from outside),
                # on what they may read; its admins moderate (every member,
                # in a group without admins).
                members = list((group or {}).get("members") or ())
                if ev.by in members:
                    visible_from = _joined(_need(group)).get(ev.by, 1)
                    admins = _admins(_need(group))
                    moderator = moderator or manages(ev.by, admins)
                elif not ev.moderator:
                    target = None
                to = sorted(m for m in members if m != ev.by)
            refusal = judge(
                ev.kind,
                ev.by,
                ev.conversation,
                target,
                ev.ts,
                window_ms=ev.window_ms,
                moderator=moderator,
                visible_from=visible_from,
                reactions_by_user=mine,
                reacted_already=already,
                on=ev.on,
            )
            if refusal is not None:
                return EventResult(None, refused=refusal.code, reason=refusal.reason)
            stored = _event_doc(ev, eseq, to)
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
            return EventResult(
                _event(stored, body), dropped=tuple(dropped), recipients=tuple(stored["owed"])
            )
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
    return Appended(
        doc["_id"],
        doc["conversation"],
        doc["seq"],
        doc["ts"],
        duplicate=True,
        refused=doc.get("refused"),
    )


def _stamp(doc: dict[str, Any] | None, idx: int, status: Status) -> str | None:
    """The token of the update that made ``status`` for receipt ``idx``."""
    receipts = (doc or {}).get("receipts") or []
    if idx >= len(receipts):
        return None
    return receipts[idx].get(f"{_field(status)}_op")


def _need(value: T | None) -> T:
    if value is None:
        raise Internal("a result the store planned is missing")
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


#: Checked by the type checker (``make lint``): the class satisfies the port.
_IS_A_STORE: type[Store] = MongoStore
