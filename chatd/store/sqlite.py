"""The embedded store: SQLite in the data dir.

The database runs in WAL mode so readers never block the writer, and every
write transaction starts with ``BEGIN IMMEDIATE``, which makes seq
assignment and the (sender, cid) idempotency index atomic across threads
*and* processes (the tests run several replicas on one data dir).
Production uses MongoDB.

Where the work runs:

* **The hot path** (:meth:`SqliteStore.write`: sends, marks, receipt acks,
  group-committed by the service) runs its statements on the trio thread,
  on a connection of its own, and only the fsync goes to a worker thread.
  A worker thread running the statements costs more than the statements:
  sqlite3 releases the GIL around every step, and each hand-back is a
  futex round trip with the event loop (docs/performance.md measures it).
  That connection uses ``synchronous=NORMAL`` — commit without fsync — and
  :meth:`SqliteStore.write` then calls ``fdatasync`` on the WAL file before
  it returns: the same durability as ``synchronous=FULL``. It never waits
  in SQLite's busy handler (which sleeps, and would stop the event loop):
  a ``BEGIN IMMEDIATE`` that finds another process writing is retried
  after a trio sleep. Auto-checkpoints are off on it; every
  :data:`CHECKPOINT_EVERY` commits a PASSIVE checkpoint runs in a worker
  thread instead.
* **Everything else** (reads, accounts, conversations, administration) is
  a blocking call in a worker thread behind a limiter, on a pooled
  connection with ``synchronous=FULL`` and a busy timeout; its writes are
  serialised with the hot path's by SQLite's own lock (they wait in their
  thread, never in trio's).

Where the code is: this module holds :class:`SqliteStore` (the connections,
the thread hop, the hot path's writer and checkpoints, and the port
methods, each one call into a module below).

* :mod:`chatd.store.sqlite_schema`: the tables, the columns added since,
  the migration, how a connection is opened.
* :mod:`chatd.store.sqlite_tx`: the writes run inside a transaction (the
  hot path's appends, events, marks and acks; a group change).
* :mod:`chatd.store.sqlite_writes`: the other writes, each its own
  transaction (accounts, conversations, devices, epochs, administration).
* :mod:`chatd.store.sqlite_reads`: the reads.
* :mod:`chatd.store.sqlite_rows`: rows to records and the decisions made
  on rows (pure; tested in tests/core/test_sqlite_rows.py).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import outcome
import trio

from chatd.core.errors import Unavailable
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
from chatd.store import sqlite_reads, sqlite_writes
from chatd.store.sqlite_schema import SCHEMA, connect, migrate
from chatd.store.sqlite_tx import (
    ack_rows,
    append_rows,
    event_ack_rows,
    event_rows,
    leave_stale_transaction,
    mark_rows,
    rollback_quietly,
)

T = TypeVar("T")

log = logging.getLogger("chatd.store.sqlite")

#: Hot-path commits between two checkpoints of the WAL into the database.
CHECKPOINT_EVERY = 500
#: How long a hot-path write waits, in total, for another process's write
#: lock before it gives up (Unavailable).
BUSY_WAIT = 30.0


class SqliteStore:
    """The Store port on SQLite. Open with :meth:`open`; close with :meth:`aclose`."""

    def __init__(self, path: Path, pool_size: int = 4) -> None:
        self.path = path
        self._pool = [connect(path) for _ in range(pool_size)]
        self._free = list(self._pool)
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(pool_size)
        self._write_lock = trio.Lock()
        # CREATE ... IF NOT EXISTS throughout: safe when several replicas
        # sharing the data dir start at once (the busy timeout serialises them).
        self._pool[0].executescript(SCHEMA)
        migrate(self._pool[0])
        # The hot path's own connection (see the module docstring).
        self._hot = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        self._hot.execute("PRAGMA synchronous=NORMAL")
        self._hot.execute("PRAGMA wal_autocheckpoint=0")
        self._hot.execute("PRAGMA secure_delete=ON")
        self._wal_path = f"{path}-wal"
        self._wal_fd: int | None = None
        self._commits = 0
        # Checkpoints run on a connection of their own in a worker thread,
        # beside the hot path (never holding it up).
        self._checkpointer = connect(path)
        self._checkpoint_idle = trio.Event()
        self._checkpoint_idle.set()

    @classmethod
    def open(cls, data_dir: Path, pool_size: int = 4, *, create: bool = True) -> SqliteStore:
        """The store in ``data_dir``; with ``create=False`` an existing one only
        (raises FileNotFoundError)."""
        path = data_dir / "chatd.sqlite3"
        if not create and not path.is_file():
            raise FileNotFoundError(f"no {path.name} there")
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(path, pool_size=pool_size)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        async with self._limiter:
            with self._lock:
                conn = self._free.pop()
            try:
                return await trio.to_thread.run_sync(_guard, fn, conn, *args)
            finally:
                with self._lock:
                    self._free.append(conn)

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        # In a worker thread like a read: SQLite serialises it with the hot
        # path's writes (its busy handler sleeps in this thread, not in trio's).
        return await self._run(fn, *args)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._checkpoint_idle.wait()
        for conn in self._pool:
            conn.close()
        self._hot.close()
        self._checkpointer.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # -- the hot path ------------------------------------------------------------

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE on the hot connection, waiting (in trio) while
        another process holds the write lock."""
        delay, waited = 0.0001, 0.0
        while True:
            try:
                leave_stale_transaction(self._hot)
                self._hot.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise Unavailable(f"store error: {exc}") from None
            except sqlite3.Error as exc:  # not a database, a closed handle, ...
                raise Unavailable(f"store error: {exc}") from None
            if waited >= BUSY_WAIT:
                raise Unavailable(f"store is locked by another writer for {BUSY_WAIT:g} s")
            await trio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.002)  # the holder commits without fsync: soon

    def _wal(self) -> int:
        """An fd on the WAL file as it is now (SQLite creates it on first
        use; reopened if it was replaced)."""
        fd = self._wal_fd
        if fd is not None:
            try:
                if os.fstat(fd).st_ino == os.stat(self._wal_path).st_ino:
                    return fd
            except OSError:
                pass
            os.close(fd)
        self._wal_fd = fd = os.open(self._wal_path, os.O_RDONLY)
        return fd

    async def _hot_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one transaction on the hot connection; durable on return."""
        async with self._write_lock:
            await self._begin()
            db = self._hot
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException as exc:
                rollback_quietly(db)
                if isinstance(exc, sqlite3.Error):
                    raise Unavailable(f"store error: {exc}") from None
                raise
            try:
                # Made durable before anyone hears of it; shielded so that a
                # cancelled caller does not leave a commit unsynced for the next.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(os.fdatasync, self._wal())
            except OSError as exc:
                raise Unavailable(f"store could not sync its log: {exc}") from None
            self._commits += 1
            if self._commits % CHECKPOINT_EVERY == 0:
                self._checkpoint_soon()
            return result

    def _checkpoint_soon(self) -> None:
        """Copy the WAL into the database in a worker thread (PASSIVE: it never
        waits for writers or readers); writes go on meanwhile."""
        if not self._checkpoint_idle.is_set():
            return
        self._checkpoint_idle = idle = trio.Event()
        token = trio.lowlevel.current_trio_token()
        conn = self._checkpointer

        def work() -> None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

        def done(result: outcome.Outcome[None]) -> None:
            if isinstance(result, outcome.Error):
                log.warning("WAL checkpoint failed", extra={"reason": str(result.error)})
            token.run_sync_soon(idle.set)

        trio.lowlevel.start_thread_soon(work, done, name="chatd sqlite checkpoint")

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    # -- users ---------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        await self._write(sqlite_writes.create_user, user)

    async def get_user(self, username: str) -> User | None:
        return await self._run(sqlite_reads.get_user, username)

    async def set_last_seen(self, username: str, ts: int) -> None:
        await self._write(sqlite_writes.set_last_seen, username, ts)

    # -- conversations -------------------------------------------------------------

    async def ensure_dm(self, a: str, b: str, ts: int) -> Conversation:
        return await self._write(sqlite_writes.ensure_dm, a, b, ts)

    async def create_group(
        self,
        id: str,
        title: str | None,
        members: Sequence[str],
        ts: int,
        creator: str | None = None,
        e2e: bool = False,
    ) -> Conversation:
        return await self._write(sqlite_writes.create_group, id, title, members, ts, creator, e2e)

    async def change_group(self, change: NewMembership) -> EventResult:
        return await self._write(sqlite_writes.change_group, change)

    async def get_conversation(self, id: str) -> Conversation | None:
        return await self._run(sqlite_reads.conversation, id)

    async def conversations_of(self, username: str) -> list[ConversationSummary]:
        return await self._run(sqlite_reads.conversations_of, username)

    async def shares_conversation(self, a: str, b: str) -> bool:
        return await self._run(sqlite_reads.shares_conversation, a, b)

    async def dm_peers(self, username: str) -> list[str]:
        return await self._run(sqlite_reads.dm_peers, username)

    async def contacts(self, username: str) -> list[str]:
        return await self._run(sqlite_reads.contacts, username)

    # -- end-to-end devices and epochs ---------------------------------------------

    async def put_device(self, device: Device, limit: int) -> str:
        return await self._write(sqlite_writes.put_device, device, limit)

    async def remove_device(self, user: str, device: str, ts: int) -> bool:
        return await self._write(sqlite_writes.remove_device, user, device, ts)

    async def devices(self, user: str) -> list[Device]:
        return await self._run(sqlite_reads.devices, user)

    async def active_devices(self, users: Sequence[str]) -> list[str]:
        if not users:
            return []
        return await self._run(sqlite_reads.active_devices, users)

    async def put_epoch(
        self,
        conversation: str,
        epoch: str,
        user: str,
        device: str,
        shares: Mapping[str, str],
        ts: int,
    ) -> str:
        return await self._write(
            sqlite_writes.put_epoch, conversation, epoch, user, device, shares, ts
        )

    async def get_epoch(self, conversation: str, epoch: str) -> Epoch | None:
        return await self._run(sqlite_reads.get_epoch, conversation, epoch)

    async def epoch_check(self, conversation: str, epoch: str, users: Sequence[str]) -> EpochCheck:
        return await self._run(sqlite_reads.epoch_check, conversation, epoch, users)

    async def epoch_shares(
        self, conversation: str, epochs: Sequence[str], devices: Sequence[str]
    ) -> list[EpochShare]:
        if not epochs or not devices:
            return []
        return await self._run(sqlite_reads.epoch_shares, conversation, epochs, devices)

    # -- messages, events and receipts ---------------------------------------------

    async def write(self, writes: Writes) -> Written:
        """Appends, events, marks, receipt acks, event acks: one transaction,
        one commit (on the trio thread; see the module docstring)."""

        def fn(db: sqlite3.Connection) -> Written:
            appended = append_rows(db, writes.appends) if writes.appends else []
            events = event_rows(db, writes.events) if writes.events else []
            marked = mark_rows(db, writes.marks) if writes.marks else []
            if writes.receipt_acks:
                ack_rows(db, writes.receipt_acks)
            if writes.event_acks:
                event_ack_rows(db, writes.event_acks)
            return Written(appended, marked, events)

        return await self._hot_write(fn)

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        return (await self.write(Writes(appends=batch))).appended

    async def mark(self, batch: Sequence[Mark]) -> list[MarkResult]:
        return (await self.write(Writes(marks=batch))).marked

    async def ack_receipts(self, acks: Sequence[tuple[str, ReceiptKey]]) -> list[None]:
        await self.write(Writes(receipt_acks=acks))
        return [None] * len(acks)

    async def history(
        self, conversation: str, before: int | None, limit: int, viewer: str | None = None
    ) -> list[StoredMessage]:
        return await self._run(sqlite_reads.history, conversation, before, limit, viewer)

    async def get_messages(self, ids: Sequence[str]) -> list[StoredMessage]:
        return await self._run(sqlite_reads.get_messages, ids)

    async def sent_id(self, sender: str, cid: str) -> str | None:
        return await self._run(sqlite_reads.sent_id, sender, cid)

    async def owed_messages(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredMessage]:
        return await self._run(sqlite_reads.owed_messages, username, limit, after)

    async def owed_events(
        self, username: str, limit: int, after: tuple[str, int] | None = None
    ) -> list[StoredEvent]:
        return await self._run(sqlite_reads.owed_events, username, limit, after)

    async def owed_receipts(
        self, username: str, limit: int, after: tuple[str, str] | None = None
    ) -> list[Receipt]:
        return await self._run(sqlite_reads.owed_receipts, username, limit, after)

    # -- administration ------------------------------------------------------------

    async def list_users(self, after: str | None, limit: int) -> list[User]:
        return await self._run(sqlite_reads.list_users, after, limit)

    async def set_disabled(self, username: str, disabled: bool) -> None:
        await self._write(sqlite_writes.set_disabled, username, disabled)

    async def delete_user(self, username: str) -> UserDeleted:
        return await self._write(sqlite_writes.delete_user, username)

    async def stats(self, since: int) -> StoreStats:
        return await self._run(sqlite_reads.stats, since)

    async def count_by_key(self) -> dict[str, int]:
        return await self._run(sqlite_reads.count_by_key)

    async def messages_by_key(
        self, key_id: str, after: str | None, limit: int
    ) -> list[StoredMessage]:
        return await self._run(sqlite_reads.messages_by_key, key_id, after, limit)

    async def reseal(self, batch: Sequence[Reseal]) -> list[bool]:
        if not batch:
            return []
        return await self._write(sqlite_writes.reseal, batch)


def _guard(fn: Callable[..., T], *args: object) -> T:
    """Run a store call; a SQLite failure becomes Unavailable (nothing else leaks)."""
    try:
        return fn(*args)
    except sqlite3.IntegrityError as exc:
        raise Unavailable(f"store refused a write: {exc}") from None
    except sqlite3.Error as exc:
        raise Unavailable(f"store error: {exc}") from None


#: Checked by the type checker (``make lint``): the class satisfies the port.
_IS_A_STORE: type[Store] = SqliteStore
