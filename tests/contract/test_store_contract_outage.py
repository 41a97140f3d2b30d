"""The Store outage contract (chatd.testing.store_contract.outage) on every
implementation: SQLite, and MongoStore on mongomock, each with every kind of
failure :mod:`chatd.testing.outage` knows for its backend."""

import pytest

from chatd.store.mongo import MongoStore
from chatd.store.sqlite import SqliteStore
from chatd.testing.outage import (
    MONGO_FAILURES,
    SQLITE_FAILURES,
    mongo_client_outage,
    sqlite_outage,
)
from chatd.testing.store_contract import Down, StoreOutageContract
from harness import mongomock_support


class TestSqliteStoreOutage(StoreOutageContract):
    @pytest.fixture(params=sorted(SQLITE_FAILURES))
    async def down(self, tmp_path, request):
        store = SqliteStore.open(tmp_path)
        outage = sqlite_outage(store, request.param)
        yield Down(store, outage)
        outage.end()
        await store.aclose()


@pytest.mark.mongomock
class TestMongoStoreOutageOnMongomock(StoreOutageContract):
    @pytest.fixture(params=sorted(MONGO_FAILURES))
    async def down(self, request):
        client, outage = mongo_client_outage(mongomock_support.client(), request.param)
        store = MongoStore.open("mongodb://mongomock.invalid/chatd_outage", client=client)
        yield Down(store, outage)
        outage.end()
        await store.aclose()
