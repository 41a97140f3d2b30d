"""The production store: MongoDB, through pymongo's blocking client.

Every call runs in a worker thread (``trio.to_thread.run_sync``) behind a
bounded :class:`trio.CapacityLimiter`; one store call is one thread hop, and
inside it batches travel as one ``insert_many`` / ``bulk_write`` where the
outcome can still be known per item.

No multi-document transactions are needed (``docs/mongo.md`` has the full
argument). Every guarantee rests on what a single MongoDB write does
atomically; the module that keeps one says how in its docstring:

* ``mongo.py`` (here): :class:`MongoStore`, opening the client, the thread
  hop, creating the indexes before the first operation, and the port
  methods, each one call of a function below; every pymongo/BSON failure
  becomes :class:`Unavailable` (:func:`_guard`).
* ``mongo_schema.py``: the collections, :data:`INDEXES`, what each read
  projects.
* ``mongo_docs.py``: document shapes <-> chatd's records.
* ``mongo_plan.py``, ``mongo_plan_receipts.py``: the pure planning (seq
  assignment, compare-and-set plans, resolving a bulk-write error, picking
  winners, judging an event), tested table-driven.
* ``mongo_messages.py``: **seq and idempotency** (one insert claims both),
  and the message reads.
* ``mongo_groups.py``: **group membership** changes, and placing the
  messages a change raced.
* ``mongo_events.py``: **events** (reactions, edits, deletions).
* ``mongo_receipts.py``: **receipts** and **owed receipts**.
* ``mongo_conversations.py``: making and reading conversations.
* ``mongo_e2e.py``: **end-to-end devices** and epochs.
* ``mongo_admin.py``: users and the operator's commands.

Errors: every pymongo/BSON failure becomes :class:`Unavailable`; a taken
username (and a taken group id) is :class:`Conflict`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import bson.errors
import pymongo
import trio
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

from chatd.core.errors import ChatError, Unavailable
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
    NewMembership,
    NewMessage,
    Receipt,
    ReceiptKey,
    StoredEvent,
    StoredMessage,
    User,
)
from chatd.ports import Reseal, Store, StoreStats, UserDeleted, Writes, Written
from chatd.store import (
    mongo_admin,
    mongo_conversations,
    mongo_e2e,
    mongo_events,
    mongo_groups,
    mongo_messages,
    mongo_receipts,
)
from chatd.store.mongo_plan import members_at as _members_at
from chatd.store.mongo_schema import INDEXES, Collections, Index

__all__ = ["CLIENT_DEFAULTS", "INDEXES", "Index", "MongoStore", "_guard", "_members_at"]

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


def _uri_options(uri: str) -> tuple[str | None, set[str]]:
    """The database named in the URI's path and the (lower-cased) option names
    in its query, read without resolving anything (``mongodb+srv`` included)."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    rest, _, query = rest.partition("?")
    _, slash, path = rest.partition("/")
    database = unquote(path) if slash and path else None
    return database, {k.lower() for k, _ in parse_qsl(query, keep_blank_values=True)}


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
        self._c = Collections.of(self._db)
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
        await self._run(mongo_admin.create_user, self._c, user)

    async def get_user(self, username: str) -> User | None:
        return await self._run(mongo_admin.get_user, self._c, username)

    async def set_last_seen(self, username: str, ts: int) -> None:
        await self._run(mongo_admin.set_last_seen, self._c, username, ts)

    # -- conversations -----------------------------------------------------------

    async def ensure_dm(self, a: str, b: str, ts: int) -> Conversation:
        return await self._run(mongo_conversations.ensure_dm, self._c, a, b, ts)

    async def create_group(
        self,
        id: str,
        title: str | None,
        members: Sequence[str],
        ts: int,
        creator: str | None = None,
        e2e: bool = False,
    ) -> Conversation:
        return await self._run(
            mongo_conversations.create_group, self._c, id, title, members, ts, creator, e2e
        )

    async def get_conversation(self, id: str) -> Conversation | None:
        return await self._run(mongo_conversations.get_conversation, self._c, id)

    async def change_group(self, change: NewMembership) -> EventResult:
        return await self._run(mongo_groups.change_group, self._c, change)

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        return await self._run(mongo_conversations.conversations_of, self._c, username)

    async def shares_conversation(self, a: str, b: str) -> bool:
        return await self._run(mongo_conversations.shares_conversation, self._c, a, b)

    async def dm_peers(self, username: str) -> list[str]:
        return await self._run(mongo_conversations.dm_peers, self._c, username)

    async def contacts(self, username: str) -> list[str]:
        return await self._run(mongo_conversations.contacts, self._c, username)

    # -- end-to-end --------------------------------------------------------------

    async def active_devices(self, users: Sequence[str]) -> list[str]:
        if not users:
            return []
        return await self._run(mongo_e2e.active_devices, self._c, users)

    async def put_epoch(
        self,
        conversation: str,
        epoch: str,
        user: str,
        device: str,
        shares: Mapping[str, str],
        ts: int,
    ) -> str:
        return await self._run(
            mongo_e2e.put_epoch, self._c, conversation, epoch, user, device, shares, ts
        )

    async def get_epoch(self, conversation: str, epoch: str) -> Epoch | None:
        return await self._run(mongo_e2e.get_epoch, self._c, conversation, epoch)

    async def epoch_check(self, conversation: str, epoch: str, users: Sequence[str]) -> EpochCheck:
        return await self._run(mongo_e2e.epoch_check, self._c, conversation, epoch, users)

    async def epoch_shares(
        self, conversation: str, epochs: Sequence[str], devices: Sequence[str]
    ) -> list[EpochShare]:
        if not epochs or not devices:
            return []
        return await self._run(mongo_e2e.epoch_shares, self._c, conversation, epochs, devices)

    async def put_device(self, device: Device, limit: int) -> str:
        return await self._run(mongo_e2e.put_device, self._c, device, limit)

    async def remove_device(self, user: str, device: str, ts: int) -> bool:
        return await self._run(mongo_e2e.remove_device, self._c, user, device, ts)

    async def devices(self, user: str) -> list[Device]:
        return await self._run(mongo_e2e.devices, self._c, user)

    # -- messages ----------------------------------------------------------------

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        if not batch:
            return []
        return await self._run(mongo_messages.append, self._c, list(batch))

    async def sent_id(self, sender: str, cid: str) -> str | None:
        return await self._run(mongo_messages.sent_id, self._c, sender, cid)

    async def history(
        self, conversation: str, before: int | None, limit: int, viewer: str | None = None
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        return await self._run(mongo_messages.history, self._c, conversation, before, limit, viewer)

    async def get_messages(self, ids: Sequence[str]) -> list[StoredMessage]:
        if not ids:
            return []
        return await self._run(mongo_messages.get_messages, self._c, ids)

    async def owed_messages(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        return await self._run(mongo_messages.owed_messages, self._c, username, limit, after)

    # -- receipts and events -----------------------------------------------------

    async def mark(self, batch: Sequence[Mark]) -> list[MarkResult]:
        if not batch:
            return []
        return await self._run(mongo_receipts.mark, self._c, list(batch))

    async def ack_receipts(self, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
        if not acks:
            return []
        return await self._run(mongo_receipts.ack_receipts, self._c, acks)

    async def owed_receipts(
        self, username: str, limit: int, after: tuple[str, str] | None = None
    ) -> list[Receipt]:
        if limit <= 0:
            return []
        return await self._run(mongo_receipts.owed_receipts, self._c, username, limit, after)

    async def write(self, writes: Writes) -> Written:
        # No multi-document transaction: the five steps are applied in order,
        # each durable (majority write concern) before the next; each is
        # idempotent, so a retry after a failure in between is safe.
        appended = await self.append(writes.appends) if writes.appends else []
        events = (
            await self._run(mongo_events.apply_events, self._c, list(writes.events))
            if writes.events
            else []
        )
        marked = await self.mark(writes.marks) if writes.marks else []
        if writes.receipt_acks:
            await self.ack_receipts(writes.receipt_acks)
        if writes.event_acks:
            await self._run(mongo_events.ack_events, self._c, list(writes.event_acks))
        return Written(appended, marked, events)

    async def owed_events(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredEvent]:
        if limit <= 0:
            return []
        return await self._run(mongo_events.owed_events, self._c, username, limit, after)

    # -- administration ----------------------------------------------------------

    async def list_users(self, after: str | None, limit: int) -> list[User]:
        if limit <= 0:
            return []
        return await self._run(mongo_admin.list_users, self._c, after, limit)

    async def set_disabled(self, username: str, disabled: bool) -> None:
        await self._run(mongo_admin.set_disabled, self._c, username, disabled)

    async def delete_user(self, username: str) -> UserDeleted:
        return await self._run(mongo_admin.delete_user, self._c, username)

    async def stats(self, since: int) -> StoreStats:
        return await self._run(mongo_admin.stats, self._c, since)

    async def count_by_key(self) -> dict[str, int]:
        return await self._run(mongo_admin.count_by_key, self._c)

    async def messages_by_key(
        self, key_id: str, after: str | None, limit: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        return await self._run(mongo_admin.messages_by_key, self._c, key_id, after, limit)

    async def reseal(self, batch: Sequence[Reseal]) -> list[bool]:
        if not batch:
            return []
        return await self._run(mongo_admin.reseal, self._c, batch)


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
