"""``python -m harness.mongomock_serve serve …``: a real ``chatd serve``
process whose store is MongoStore on mongomock (in this process's memory).

For the end-to-end suite where no MongoDB server exists: everything but the
database server is real. The data lives only as long as the process, so a
restart starts empty. Tests using it are labelled ``mongomock``.
"""

from __future__ import annotations

from chatd import wiring
from chatd.cli import main
from chatd.config import Config
from chatd.ports import Store
from harness import mongomock_support


def _mongomock_store(config: Config, create: bool) -> Store:
    from chatd.store.mongo import MongoStore

    return MongoStore.open("mongodb://mongomock.invalid/chatd", client=mongomock_support.client())


wiring.STORES["mongo"] = _mongomock_store

if __name__ == "__main__":
    main()
