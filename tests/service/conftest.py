"""The service's fixture: a real ChatService on SQLite and the memory broker,
with alice, bob and carol registered."""

import os

import pytest

from chatd.auth import Passwords, Tokens
from chatd.broker.memory import MemoryBroker
from chatd.crypto import Keyring
from chatd.service import ChatService
from chatd.store.sqlite import SqliteStore


@pytest.fixture
async def svc(tmp_path, nursery):
    store = SqliteStore.open(tmp_path)
    s = ChatService(
        store=store,
        broker=MemoryBroker(),
        keyring=Keyring({"k1": os.urandom(32)}, "k1"),
        tokens=Tokens("x" * 32, 3600),
        passwords=Passwords(),
        node="n1",
    )
    await nursery.start(s.run)
    for name in ("alice", "bob", "carol"):
        await s.register(name, "password123")
    yield s
    s.stop()
    await s.stopped.wait()
    await store.aclose()
