import pytest

from chatd.store.sqlite import SqliteStore
from chatd.testing.store_contract import SplitStore, StoreContract


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
        yield SplitStore(writer, reader)
        await writer.aclose()
        await reader.aclose()
