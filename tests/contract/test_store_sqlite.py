import os
import sqlite3

import pytest
import trio

from chatd.core.model import User
from chatd.ports import Writes
from chatd.store import sqlite as sqlite_mod
from chatd.store.sqlite import SqliteStore
from chatd.testing.store_contract import SplitStore, StoreContract, new_message


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


# -- the hot path: statements on the trio thread, fsync in a worker ------------------------


async def _dm(store: SqliteStore) -> str:
    for name in ("alice", "bob"):
        await store.create_user(User(name, "h", 1))
    return (await store.ensure_dm("alice", "bob", 1)).id


async def test_every_write_syncs_the_wal_before_it_returns(tmp_path, monkeypatch):
    store = SqliteStore.open(tmp_path)
    try:
        dm = await _dm(store)
        synced: list[int] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            synced.append(os.fstat(fd).st_ino)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        for i in range(3):
            await store.write(Writes(appends=[new_message(dm, "alice", ("bob",), cid=f"c{i}")]))
            assert len(synced) == i + 1  # synced before write() returned
        assert set(synced) == {os.stat(f"{tmp_path}/chatd.sqlite3-wal").st_ino}
    finally:
        await store.aclose()


async def test_a_write_waits_for_another_writer_without_stopping_trio(tmp_path):
    """Another process holds SQLite's write lock: the hot path waits for it in
    trio (other tasks run meanwhile), not in SQLite's busy handler."""
    store = SqliteStore.open(tmp_path)
    other = sqlite3.connect(tmp_path / "chatd.sqlite3", isolation_level=None)
    try:
        dm = await _dm(store)
        other.execute("BEGIN IMMEDIATE")
        done = trio.Event()
        ticks = 0

        async def write() -> None:
            await store.write(Writes(appends=[new_message(dm, "alice", ("bob",))]))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            for _ in range(20):
                await trio.sleep(0.01)
                ticks += 1
            assert not done.is_set() and ticks == 20  # trio kept running
            other.execute("COMMIT")
            with trio.fail_after(5):
                await done.wait()
        assert len(await store.owed_messages("bob", 10)) == 1
    finally:
        other.close()
        await store.aclose()


@pytest.mark.parametrize("every", [5, 10**9])
async def test_checkpoints_copy_the_wal_into_the_database(tmp_path, monkeypatch, every):
    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_EVERY", every)
    store = SqliteStore.open(tmp_path)
    try:
        dm = await _dm(store)
        before = (tmp_path / "chatd.sqlite3").stat().st_size
        for i in range(30):
            batch = [new_message(dm, "alice", ("bob",), cid=f"c{i}-{j}") for j in range(20)]
            await store.write(Writes(appends=batch))
        with trio.fail_after(10):
            await store._checkpoint_idle.wait()
        after = (tmp_path / "chatd.sqlite3").stat().st_size
        # Only a checkpoint moves pages from the WAL into the database file.
        assert (after > before) == (every == 5)
    finally:
        await store.aclose()


async def test_a_deleted_body_is_overwritten_on_disk(tmp_path):
    """Once checkpointed, the database file no longer holds the ciphertext
    of a message deleted for everyone (before the deletion it does). The
    store also runs with secure_delete on, for cells SQLite moves or frees."""
    from chatd.core.model import EventKind, NewMessage, Sealed
    from chatd.testing.store_contract import new_event

    store = SqliteStore.open(tmp_path)
    path = tmp_path / "chatd.sqlite3"

    def checkpointed_bytes() -> bytes:
        raw = sqlite3.connect(path, isolation_level=None)
        try:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
        return path.read_bytes()

    try:
        dm = await _dm(store)
        secret = os.urandom(48)
        msg = NewMessage(
            "01TESTMESSAGE0000000000000",
            dm,
            "alice",
            "c1",
            1,
            Sealed("k1", b"n" * 12, secret),
            ("bob",),
        )
        await store.write(Writes(appends=[msg]))
        assert secret in checkpointed_bytes()
        ev = new_event(dm, EventKind.DELETED, msg.id, "alice", ("bob",))
        [done] = (await store.write(Writes(events=[ev]))).events
        assert done.refused is None
        assert secret not in checkpointed_bytes()
    finally:
        await store.aclose()
