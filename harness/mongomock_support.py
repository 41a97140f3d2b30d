"""mongomock made to behave like a MongoDB server where chatd relies on it.

mongomock is an in-process imitation of MongoDB, not a server: tests that
run on it say so in their names and markers, and ``docs/mongo.md`` says what
they do and do not prove. Used by the store contract tests and by
:mod:`harness.mongomock_serve` (a real ``chatd serve`` process whose
store is MongoStore on mongomock).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any


class Serialized:
    """A mongomock client whose every operation is atomic.

    mongomock checks a filter (or a unique index) and then writes, without a
    lock between the two, so two threads can both pass the same
    compare-and-set or both insert the same unique key. A real server applies
    each single-document write atomically; the store's correctness argument
    rests on exactly that. Each call below holds one lock for its duration,
    and cursors are read out under it. (Stronger than a server in one way: a
    whole ``insert_many``/``bulk_write`` is atomic here; the store never
    relies on that, and the OnMongoDB classes run without this wrapper.)
    """

    def __init__(self, client: Any, lock: threading.RLock | None = None) -> None:
        self._client = client
        self._lock = lock or threading.RLock()

    def __getitem__(self, name: str) -> SerializedDatabase:
        return SerializedDatabase(self._client[name], self._lock)

    def close(self) -> None:
        pass


class SerializedDatabase:
    def __init__(self, db: Any, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock

    def get_collection(self, name: str) -> SerializedCollection:
        return SerializedCollection(self._db.get_collection(name), self._lock)

    __getitem__ = get_collection

    def command(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._db.command(*args, **kwargs)


class SerializedCollection:
    def __init__(self, coll: Any, lock: threading.RLock) -> None:
        self._coll = coll
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._coll, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                out = attr(*args, **kwargs)
                if name in ("find", "aggregate"):
                    out = list(out)
                return out

        return call


def let_mongomock_take_pymongo_411_bulk_updates() -> None:
    """pymongo >= 4.11 passes ``sort=`` when it adds an UpdateOne to a bulk;
    mongomock 4.3 does not take it (mongomock issue #912, fix pending in PR
    #933), so every ``bulk_write`` with an update fails with TypeError. This
    accepts ``sort=None`` (the only value chatd passes) and nothing else."""
    from mongomock.collection import BulkOperationBuilder

    original = BulkOperationBuilder.add_update
    if "sort" in inspect.signature(original).parameters:
        return

    def add_update(
        self: Any,
        selector: Any,
        doc: Any,
        multi: bool = False,
        upsert: bool = False,
        collation: Any = None,
        array_filters: Any = None,
        hint: Any = None,
        sort: Any = None,
    ) -> Any:
        if sort is not None:
            raise NotImplementedError("mongomock: sort in a bulk update")
        return original(
            self,
            selector,
            doc,
            multi,
            upsert,
            collation=collation,
            array_filters=array_filters,
            hint=hint,
        )

    BulkOperationBuilder.add_update = add_update  # type: ignore[method-assign]


def client() -> Serialized:
    """A fresh mongomock client, serialized and patched for pymongo >= 4.11."""
    import mongomock

    let_mongomock_take_pymongo_411_bulk_updates()
    return Serialized(mongomock.MongoClient())
