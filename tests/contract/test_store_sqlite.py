import pytest

from chatd.store.sqlite import SqliteStore
from chatd.testing.store_contract import StoreContract


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path):
        s = SqliteStore.open(tmp_path)
        yield s
        await s.aclose()


class TestSqliteStoreTwoProcessesView(StoreContract):
    """Two store objects on one file (as two replicas on one data dir have):
    writes go through one, reads through the other."""

    @pytest.fixture
    async def store(self, tmp_path):
        writer = SqliteStore.open(tmp_path)
        reader = SqliteStore.open(tmp_path)
        yield _Split(writer, reader)
        await writer.aclose()
        await reader.aclose()


class _Split:
    _READS = {
        "get_user",
        "get_conversation",
        "conversations_of",
        "shares_conversation",
        "dm_peers",
        "history",
        "get_messages",
        "owed_messages",
        "owed_receipts",
        "ping",
    }

    def __init__(self, writer, reader):
        self._writer = writer
        self._reader = reader

    def __getattr__(self, name):
        return getattr(self._reader if name in self._READS else self._writer, name)
