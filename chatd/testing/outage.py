"""Backend outages for the contract suites: the backend's own client library
failing, switched on and off by the test.

An :class:`Outage` is a switch; :class:`Flaky` wraps a client object (a
SQLite connection, a MongoDB client) so that while the switch is on, every
call into it raises what the library raises when its backend is away. The
store above it is the real one, unchanged: only what it talks to fails.

* :func:`sqlite_outage`: SQLite has no server to lose; an outage is the
  sqlite3 module raising from every call on every connection the store holds
  (an I/O error, a file that is no longer a database, a closed handle). Each
  kind's exception is one sqlite3 really raised (see :data:`SQLITE_FAILURES`).
* :func:`mongo_client_outage`: a MongoDB client (mongomock's, or pymongo's)
  whose every operation raises the pymongo error of a server that cannot be
  reached or dropped the connection (see :data:`MONGO_FAILURES`).
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymongo.errors import AutoReconnect, NotPrimaryError, ServerSelectionTimeoutError

__all__ = [
    "MONGO_FAILURES",
    "SQLITE_FAILURES",
    "Flaky",
    "Outage",
    "mongo_client_outage",
    "sqlite_outage",
]


class Outage:
    """While :attr:`down`, every call through a :class:`Flaky` raises ``error()``."""

    def __init__(self, error: Callable[[], BaseException]) -> None:
        self._error = error
        self.down = False
        self._grace: int | None = None
        #: Calls refused so far (a test can check the outage was met at all).
        self.refused = 0

    def begin(self) -> None:
        self.down = True
        self._grace = None

    def begin_after(self, calls: int) -> None:
        """Let ``calls`` more calls through, then begin: an outage that starts
        in the middle of a store method (between two statements)."""
        self.down = False
        self._grace = calls

    def end(self) -> None:
        self.down = False
        self._grace = None

    def check(self) -> None:
        if self._grace is not None:
            if self._grace > 0:
                self._grace -= 1
                return
            self.begin()
        if self.down:
            self.refused += 1
            raise self._error()


class Flaky:
    """``target``, with every method call first checking ``outage``.

    Calls named in :attr:`NAVIGATE` (and item access) do no I/O in the
    libraries wrapped here: they are never refused, and what they return
    (a database, a collection) is wrapped in turn. Calls named in
    :attr:`ALWAYS` (closing) go through even during an outage, as closing a
    handle on a dead backend does. Plain attributes go through unchanged.
    """

    NAVIGATE = frozenset({"get_collection", "get_database"})
    ALWAYS = frozenset({"close"})

    def __init__(self, target: Any, outage: Outage) -> None:
        self._target = target
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or name in self.ALWAYS:
            return attr
        if name in self.NAVIGATE:
            return lambda *args, **kwargs: Flaky(attr(*args, **kwargs), self._outage)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._outage.check()
            return attr(*args, **kwargs)

        return call

    def __getitem__(self, key: Any) -> Flaky:
        return Flaky(self._target[key], self._outage)


# -- SQLite -----------------------------------------------------------------------------


def _raised_by(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except Exception as exc:  # what the library raised, kept as it is
        return exc
    raise AssertionError(f"{fn} raised nothing")


def _closed_handle_error() -> BaseException:
    conn = sqlite3.connect(":memory:")
    conn.close()
    return _raised_by(lambda: conn.execute("SELECT 1"))


def _not_a_database_error() -> BaseException:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "garbage.sqlite3"
        path.write_bytes(b"this is not a database, it was replaced" * 200)
        conn = sqlite3.connect(path)
        try:
            return _raised_by(lambda: conn.execute("SELECT * FROM sqlite_master").fetchall())
        finally:
            conn.close()


def _io_error() -> BaseException:
    # SQLITE_IOERR cannot be provoked portably; this is the exception sqlite3
    # raises for it (OperationalError, "disk I/O error").
    return sqlite3.OperationalError("disk I/O error")


#: The kinds of SQLite outage, each a way sqlite3 fails: the exception type
#: and message are sqlite3's own.
SQLITE_FAILURES: dict[str, Callable[[], BaseException]] = {
    "io_error": _io_error,
    "not_a_database": _not_a_database_error,
    "closed_handle": _closed_handle_error,
}


def sqlite_outage(store: Any, kind: str) -> Outage:
    """Wrap every connection ``store`` (a :class:`chatd.store.sqlite.SqliteStore`)
    holds; the returned outage, when begun, fails them all with ``kind``'s
    error. Call before the store is used by anything concurrently."""
    template = SQLITE_FAILURES[kind]()
    outage = Outage(lambda: type(template)(*template.args))
    with store._lock:
        pool = [Flaky(conn, outage) for conn in store._pool]
        by_id = {id(conn): flaky for conn, flaky in zip(store._pool, pool, strict=True)}
        store._free = [by_id[id(conn)] for conn in store._free]
        store._pool = pool
    store._hot = Flaky(store._hot, outage)
    store._checkpointer = Flaky(store._checkpointer, outage)
    return outage


# -- MongoDB ----------------------------------------------------------------------------


#: The kinds of MongoDB outage: the pymongo errors of a server not found
#: within serverSelectionTimeoutMS, of a connection dropped mid-call, and of
#: a primary that stepped down (a failover).
MONGO_FAILURES: dict[str, Callable[[], BaseException]] = {
    "server_selection_timeout": lambda: ServerSelectionTimeoutError(
        "127.0.0.1:27017: [Errno 111] Connection refused, Timeout: 3.0s"
    ),
    "auto_reconnect": lambda: AutoReconnect("127.0.0.1:27017: connection closed"),
    "not_primary": lambda: NotPrimaryError("not primary", {"code": 10107, "ok": 0}),
}


def mongo_client_outage(client: Any, kind: str) -> tuple[Flaky, Outage]:
    """``client`` wrapped (hand the wrapper to ``MongoStore.open(client=...)``),
    and the outage that, when begun, fails its every operation with ``kind``'s
    error."""
    outage = Outage(MONGO_FAILURES[kind])
    return Flaky(client, outage), outage
