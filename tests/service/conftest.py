"""The service's fixture: a real ChatService on SQLite and the memory broker,
with alice, bob and carol registered."""

import os

import pytest

from chatd.auth import Passwords, Tokens
from chatd.broker.memory import MemoryBroker
from chatd.crypto import Keyring
from chatd.service import ChatService
from chatd.store.sqlite import SqliteStore


def _service(store: SqliteStore, keyring: Keyring, node: str) -> ChatService:
    return ChatService(
        store=store,
        broker=MemoryBroker(),
        keyring=keyring,
        tokens=Tokens("x" * 32, 3600),
        passwords=Passwords(),
        node=node,
    )


@pytest.fixture
async def svc(tmp_path, nursery):
    store = SqliteStore.open(tmp_path)
    s = _service(store, Keyring({"k1": os.urandom(32)}, "k1"), "n1")
    await nursery.start(s.run)
    for name in ("alice", "bob", "carol"):
        await s.register(name, "password123")
    yield s
    s.stop()
    await s.stopped.wait()
    await store.aclose()


@pytest.fixture
async def replica(svc, tmp_path, nursery):
    """A second replica beside ``svc``: its own ChatService (and caches) on
    its own store object over the same database, with the same keyring."""
    store = SqliteStore.open(tmp_path)
    s = _service(store, svc.keyring, "n2")
    await nursery.start(s.run)
    yield s
    s.stop()
    await s.stopped.wait()
    await store.aclose()
