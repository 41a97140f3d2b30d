"""The Store contract and the Mongo-specific guarantees, on MongoDB.

Two backends:

* **mongomock** (classes ``...OnMongomock``, marker ``mongomock``): always
  runs. mongomock is an in-process imitation of MongoDB, not a server; see
  :class:`_Serialized` for the two adjustments made to it, and
  ``docs/mongo.md`` for what it does and does not prove.
* **a real MongoDB** (classes ``...OnMongoDB``): runs only when
  ``CHATD_TEST_MONGO_URL`` is set, e.g. ``mongodb://127.0.0.1:27017``. Every
  test gets a fresh randomly named database, dropped afterwards.

The unreachable-server tests need no server at all: they point a real
pymongo client at a closed port.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pymongo
import pytest
import trio
from pymongo.errors import AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError

from chatd.core.errors import Unavailable
from chatd.core.events import manages
from chatd.core.model import EventKind, GroupAction, Mark, NewMembership, ReceiptKey, Status
from chatd.store import mongo_groups, mongo_messages, mongo_receipts
from chatd.store.mongo import INDEXES, MongoStore, _guard, _members_at
from chatd.testing.store_contract import (
    SplitStore,
    StoreContract,
    new_event,
    new_message,
    one_event,
    users,
)
from harness import mongomock_support

MONGO_URL = os.environ.get("CHATD_TEST_MONGO_URL", "")

needs_server = pytest.mark.skipif(
    not MONGO_URL, reason="set CHATD_TEST_MONGO_URL to run against a real MongoDB"
)

UNREACHABLE = "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300"


# -- backends --------------------------------------------------------------------


class Backend:
    """Opens any number of stores on one database (as several processes
    would), and gives raw access to that database for inspection."""

    def __init__(self, open_store: Callable[[], MongoStore], raw_db: Any) -> None:
        self._open_store = open_store
        self.raw = raw_db
        self._stores: list[MongoStore] = []

    def store(self) -> MongoStore:
        s = self._open_store()
        self._stores.append(s)
        return s

    async def aclose(self) -> None:
        for s in self._stores:
            await s.aclose()


def _db_name() -> str:
    return f"chatd_test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def mongomock_backend():
    client = mongomock_support.client()
    name = _db_name()
    backend = Backend(
        lambda: MongoStore.open(f"mongodb://mongomock.invalid/{name}", client=client),
        client[name],
    )
    yield backend
    await backend.aclose()


@pytest.fixture
async def server_backend():
    name = _db_name()
    admin = pymongo.MongoClient(MONGO_URL, serverSelectionTimeoutMS=5000)
    backend = Backend(lambda: MongoStore.open(MONGO_URL, database=name), admin[name])
    yield backend
    await backend.aclose()
    await trio.to_thread.run_sync(admin.drop_database, name)
    await trio.to_thread.run_sync(admin.close)


# -- the contract ----------------------------------------------------------------


@pytest.mark.mongomock
class TestMongoStoreOnMongomock(StoreContract):
    @pytest.fixture
    async def store(self, mongomock_backend):
        yield mongomock_backend.store()


@pytest.mark.mongomock
class TestMongoStoreTwoStoresOnMongomock(StoreContract):
    """Two store objects on one database, as two replicas have."""

    @pytest.fixture
    async def store(self, mongomock_backend):
        yield SplitStore(mongomock_backend.store(), mongomock_backend.store())


@needs_server
class TestMongoStoreOnMongoDB(StoreContract):
    @pytest.fixture
    async def store(self, server_backend):
        yield server_backend.store()


@needs_server
class TestMongoStoreTwoStoresOnMongoDB(StoreContract):
    @pytest.fixture
    async def store(self, server_backend):
        yield SplitStore(server_backend.store(), server_backend.store())


# -- Mongo-specific --------------------------------------------------------------


class _Hooked:
    """A collection that runs ``hook`` once, just before the first call of
    ``method``: the moment another process's write lands in the real world."""

    def __init__(self, coll: Any, method: str, hook: Callable[[], None]) -> None:
        self._coll = coll
        self._method = method
        self._hook: Callable[[], None] | None = hook

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._coll, name)
        if name != self._method:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._hook is not None:
                hook, self._hook = self._hook, None
                hook()
            return attr(*args, **kwargs)

        return call


def _hook(store: MongoStore, name: str, method: str, hook: Callable[[], None]) -> None:
    """Make ``store``'s collection ``name`` (``Collections``' field) a
    :class:`_Hooked` one: the next ``method`` call on it runs ``hook`` first."""
    store._c = replace(store._c, **{name: _Hooked(getattr(store._c, name), method, hook)})


def _membership(conv: str, by: str, action: GroupAction, *names: str) -> NewMembership:
    return NewMembership(uuid.uuid4().hex, conv, by, 20, action, names)


def _crash() -> None:
    raise RuntimeError("the process stopped here")


def _indexes(raw_db: Any, collection: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, info in raw_db.get_collection(collection).index_information().items():
        out[name] = {
            "key": [(k, int(d)) for k, d in info["key"]],
            "unique": bool(info.get("unique", False)),
            "partial": dict(info.get("partialFilterExpression") or {}),
        }
    return out


EXPECTED_INDEXES = {
    "events": {
        "by_cid": {"key": [("by", 1), ("cid", 1)], "unique": True, "partial": {}},
        "conversation_eseq": {
            "key": [("conversation", 1), ("eseq", 1)],
            "unique": True,
            "partial": {},
        },
        "owed_events": {
            "key": [("owed", 1), ("conversation", 1), ("eseq", 1)],
            "unique": False,
            "partial": {},
        },
        "message_eseq": {"key": [("message_id", 1), ("eseq", 1)], "unique": False, "partial": {}},
    },
    "conversations": {
        "members_kind": {"key": [("members", 1), ("kind", 1)], "unique": False, "partial": {}},
    },
    "messages": {
        "sender_cid": {"key": [("sender", 1), ("cid", 1)], "unique": True, "partial": {}},
        "conversation_seq": {
            "key": [("conversation", 1), ("seq", 1)],
            "unique": True,
            "partial": {},
        },
        "owed_messages": {
            "key": [("undelivered", 1), ("conversation", 1), ("seq", 1)],
            "unique": False,
            "partial": {},
        },
        "unread": {"key": [("unseen", 1), ("conversation", 1)], "unique": False, "partial": {}},
        "owed_receipts": {
            "key": [("sender", 1), ("_id", 1)],
            "unique": False,
            "partial": {"rpending": {"$gt": 0}},
        },
    },
    "devices": {
        "user_device": {"key": [("user", 1), ("device", 1)], "unique": True, "partial": {}},
        "user_slot": {"key": [("user", 1), ("slot", 1)], "unique": True, "partial": {}},
        "device_id": {"key": [("device", 1)], "unique": True, "partial": {}},
        "active_devices": {
            "key": [("user", 1), ("removed_ts", 1)],
            "unique": False,
            "partial": {},
        },
    },
}


class MongoSpecific:
    @pytest.fixture
    def backend(self) -> Backend:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    async def test_indexes_exist_after_open(self, backend: Backend) -> None:
        store = backend.store()
        await store.ping()  # open() does no I/O; the first call builds the indexes
        assert {(i.collection, i.name) for i in INDEXES} == {
            (c, n) for c, names in EXPECTED_INDEXES.items() for n in names
        }
        for coll, expected in EXPECTED_INDEXES.items():
            got = _indexes(backend.raw, coll)
            assert set(got) == {"_id_", *expected}
            for name, spec in expected.items():
                assert got[name] == spec, (coll, name)

    async def test_first_write_builds_the_indexes(self, backend: Backend) -> None:
        store = backend.store()
        await users(store, "alice")
        assert "sender_cid" in _indexes(backend.raw, "messages")

    async def test_opening_twice_is_idempotent(self, backend: Backend) -> None:
        first = backend.store()
        await first.ensure_indexes()
        before = {c: _indexes(backend.raw, c) for c in EXPECTED_INDEXES}
        second, third = backend.store(), backend.store()
        async with trio.open_nursery() as n:
            n.start_soon(second.ensure_indexes)
            n.start_soon(third.ensure_indexes)
        assert {c: _indexes(backend.raw, c) for c in EXPECTED_INDEXES} == before
        await users(first, "alice")
        assert (await second.get_user("alice")) is not None

    async def test_documents_have_the_documented_shape(self, backend: Backend) -> None:
        store = backend.store()
        await users(store, "alice", "bob", "carol")
        g = await store.create_group("g:1", "t", ["alice", "bob", "carol"], 1)
        msg = new_message(g.id, "alice", ("bob", "carol"), cid="c1", ts=7)
        await store.append([msg])
        await store.mark([Mark("bob", msg.id, Status.SEEN, 9)])
        doc = backend.raw.get_collection("messages").find_one({"_id": msg.id})
        assert {k: doc[k] for k in ("conversation", "seq", "sender", "cid", "ts")} == {
            "conversation": "g:1",
            "seq": 1,
            "sender": "alice",
            "cid": "c1",
            "ts": 7,
        }
        assert doc["recipients"] == ["bob", "carol"]
        assert doc["body"] == {
            "key_id": msg.body.key_id,
            "nonce": msg.body.nonce,
            "ciphertext": msg.body.ciphertext,
        }
        assert doc["status"] == {"delivered_to": ["bob"], "seen_by": ["bob"]}
        assert doc["undelivered"] == ["carol"] and doc["unseen"] == ["carol"]
        assert doc["rpending"] == 2
        bob, carol = doc["receipts"]
        assert (bob["member"], bob["delivered_ts"], bob["seen_ts"]) == ("bob", 9, 9)
        assert (carol["member"], carol["delivered_ts"], carol["seen_ts"]) == ("carol", None, None)
        conv = backend.raw.get_collection("conversations").find_one({"_id": "g:1"})
        assert conv["members"] == ["alice", "bob", "carol"]
        assert conv["last_seq"] == 1 and conv["last_ts"] == 7
        user = backend.raw.get_collection("users").find_one({"_id": "alice"})
        assert user["password_hash"] == "hash-alice"

    async def test_two_stores_appending_at_once(self, backend: Backend) -> None:
        """Several processes, one conversation, overlapping retries: seq has no
        gaps and no repeats, and every (sender, cid) is stored once."""
        a, b = backend.store(), backend.store()
        await users(a, "alice", "bob")
        dm = await a.ensure_dm("alice", "bob", 1)
        answers: dict[str, list[tuple[str, int, bool]]] = {}

        async def writer(store: MongoStore, tag: str) -> None:
            for j in range(12):
                # Every third cid is sent by both writers (a retry racing itself).
                cid = f"shared-{j}" if j % 3 == 0 else f"{tag}-{j}"
                batch = [new_message(dm.id, "alice", ("bob",), cid=cid)]
                if j % 4 == 0:  # and sometimes twice in one batch
                    batch.append(new_message(dm.id, "alice", ("bob",), cid=cid))
                for res in await store.append(batch):
                    answers.setdefault(cid, []).append((res.id, res.seq, res.duplicate))

        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(writer, a, f"a{i}")
                n.start_soon(writer, b, f"b{i}")
        for cid, got in answers.items():
            assert len({(mid, seq) for mid, seq, _ in got}) == 1, cid
            assert sum(not dup for *_, dup in got) == 1, cid
        seqs = sorted(got[0][1] for got in answers.values())
        assert seqs == list(range(1, len(answers) + 1))
        history = await b.history(dm.id, None, 1000)
        assert [m.seq for m in history] == seqs
        [summary] = await b.conversations_of("bob")
        assert summary.last_seq == len(answers)

    async def test_a_taken_seq_is_planned_again_in_order(self, backend: Backend) -> None:
        """Another process stores seq N+1 between this one's read and insert:
        the batch lands after it, still in batch order, with no gap."""
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob")
        dm = await mine.ensure_dm("alice", "bob", 1)
        await mine.append([new_message(dm.id, "alice", ("bob",))])
        theirs = new_message(dm.id, "bob", ("alice",))
        await other.ensure_indexes()
        _hook(mine, "messages", "insert_many", lambda: mongo_messages.append(other._c, [theirs]))
        batch = [new_message(dm.id, "alice", ("bob",)) for _ in range(3)]
        out = await mine.append(batch)
        assert [a.seq for a in out] == [3, 4, 5] and not any(a.duplicate for a in out)
        history = await mine.history(dm.id, None, 10)
        assert [m.id for m in history[1:]] == [theirs.id] + [m.id for m in batch]

    async def test_a_stale_counter_is_only_a_guess(self, backend: Backend) -> None:
        """A message stored but its conversation's last_seq not yet advanced
        (a crash between the two writes): the next append skips it."""
        store = backend.store()
        await users(store, "alice", "bob")
        dm = await store.ensure_dm("alice", "bob", 1)
        await store.append([new_message(dm.id, "alice", ("bob",))])
        backend.raw.get_collection("conversations").update_one(
            {"_id": dm.id}, {"$set": {"last_seq": 0}}
        )
        [res] = await store.append([new_message(dm.id, "alice", ("bob",))])
        assert res.seq == 2
        [summary] = await store.conversations_of("alice")
        assert summary.last_seq == 2

    async def test_a_duplicate_that_loses_the_race_burns_no_seq(self, backend: Backend) -> None:
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob")
        dm = await mine.ensure_dm("alice", "bob", 1)
        first = new_message(dm.id, "alice", ("bob",), cid="same")
        await other.ensure_indexes()
        _hook(mine, "messages", "insert_many", lambda: mongo_messages.append(other._c, [first]))
        retry = new_message(dm.id, "alice", ("bob",), cid="same")
        after = new_message(dm.id, "alice", ("bob",), cid="next")
        dup, nxt = await mine.append([retry, after])
        assert dup.duplicate and (dup.id, dup.seq) == (first.id, 1)
        # The winner's message and who still owes it, for routing again.
        assert dup.message is not None and dup.message.body == first.body
        assert dup.recipients == ("bob",)
        assert not nxt.duplicate and nxt.seq == 2
        assert [m.id for m in await mine.history(dm.id, None, 10)] == [first.id, after.id]

    async def test_a_mark_that_loses_the_race_reports_only_what_it_made(
        self, backend: Backend
    ) -> None:
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob", "carol")
        g = await mine.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        msg = new_message(g.id, "alice", ("bob", "carol"))
        await mine.append([msg])
        await other.ensure_indexes()
        theirs: list = []
        _hook(
            mine,
            "messages",
            "bulk_write",
            lambda: theirs.extend(
                mongo_receipts.mark(other._c, [Mark("bob", msg.id, Status.DELIVERED, 4)])
            ),
        )
        bob, carol = await mine.mark(
            [Mark("bob", msg.id, Status.SEEN, 5), Mark("carol", msg.id, Status.DELIVERED, 6)]
        )
        [their] = theirs
        assert [(t.member, t.status, t.ts) for t in their.transitions] == [
            ("bob", Status.DELIVERED, 4)
        ]
        # bob's seen was planned from NEW (delivered + seen); the other process
        # delivered first, so only the seen is this call's to report.
        assert [(t.status, t.ts) for t in bob.transitions] == [(Status.SEEN, 5)]
        assert [(t.status, t.ts) for t in carol.transitions] == [(Status.DELIVERED, 6)]
        owed = await mine.owed_receipts("alice", 100)
        assert sorted((r.member, r.status.value, r.ts) for r in owed) == [
            ("bob", "delivered", 4),
            ("bob", "seen", 5),
            ("carol", "delivered", 6),
        ]

    async def test_two_stores_marking_at_once_report_each_move_once(self, backend: Backend) -> None:
        a, b = backend.store(), backend.store()
        await users(a, "alice", "bob", "carol")
        g = await a.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        msgs = [new_message(g.id, "alice", ("bob", "carol")) for _ in range(5)]
        await a.append(msgs)
        made = []

        async def marker(store: MongoStore, status: Status, ts: int) -> None:
            batch = [Mark(u, m.id, status, ts) for m in msgs for u in ("bob", "carol")]
            for res in await store.mark(batch):
                made.extend((t.message_id, t.member, t.status) for t in res.transitions)

        async with trio.open_nursery() as n:
            for store in (a, b, a, b):
                n.start_soon(marker, store, Status.DELIVERED, 5)
                n.start_soon(marker, store, Status.SEEN, 6)
        expected = {(m.id, u, s) for m in msgs for u in ("bob", "carol") for s in Status}
        assert sorted(made) == sorted(expected)
        assert len(await a.owed_receipts("alice", 100)) == len(expected)

    async def test_acks_settle_each_receipt_once(self, backend: Backend) -> None:
        a, b = backend.store(), backend.store()
        await users(a, "alice", "bob", "carol")
        g = await a.create_group("g:1", None, ["alice", "bob", "carol"], 1)
        msg = new_message(g.id, "alice", ("bob", "carol"))
        await a.append([msg])
        # Acking a receipt that does not exist yet settles nothing ahead of time.
        await a.ack_receipts([("alice", ReceiptKey(msg.id, "bob", Status.SEEN))])
        await a.mark([Mark("bob", msg.id, Status.SEEN, 5)])
        await a.mark([Mark("carol", msg.id, Status.DELIVERED, 6)])
        assert len(await a.owed_receipts("alice", 100)) == 3
        acks = [
            ("alice", ReceiptKey(msg.id, "bob", Status.SEEN)),
            ("alice", ReceiptKey(msg.id, "bob", Status.DELIVERED)),
            ("alice", ReceiptKey(msg.id, "bob", Status.SEEN)),
        ]
        async with trio.open_nursery() as n:
            for store in (a, b, a, b):
                n.start_soon(store.ack_receipts, acks)
        doc = backend.raw.get_collection("messages").find_one({"_id": msg.id})
        assert doc["rpending"] == 1
        assert [(r.member, r.status) for r in await b.owed_receipts("alice", 100)] == [
            ("carol", Status.DELIVERED)
        ]
        await b.ack_receipts([("alice", ReceiptKey(msg.id, "carol", Status.DELIVERED))])
        doc = backend.raw.get_collection("messages").find_one({"_id": msg.id})
        assert doc["rpending"] == 0
        assert await a.owed_receipts("alice", 100) == []

    # -- groups that change ------------------------------------------------------

    async def test_group_membership_has_the_documented_shape(self, backend: Backend) -> None:
        store = backend.store()
        await users(store, "alice", "bob", "carol", "dave")
        await store.create_group("g:1", "t", ["alice", "bob", "carol"], 1, creator="alice")
        await store.append([new_message("g:1", "alice", ("bob", "carol"))])
        await store.change_group(_membership("g:1", "alice", GroupAction.ADD, "dave"))
        await store.change_group(_membership("g:1", "alice", GroupAction.REMOVE, "bob"))
        conversations = backend.raw.get_collection("conversations")
        conv = conversations.find_one({"_id": "g:1"})
        assert conv["members"] == ["alice", "carol", "dave"] and conv["admins"] == ["alice"]
        assert conv["joined"] == [{"member": "dave", "seq": 2}]
        assert conv["mver"] == 2 and "pending" not in conv
        assert [(c["mver"], c["from_seq"], c["added"], c["removed"]) for c in conv["changes"]] == [
            (1, 2, ["dave"], []),
            (2, 2, [], ["bob"]),
        ]
        ev = backend.raw.get_collection("events").find_one({"kind": "members", "mver": 2})
        assert (ev["eseq"], ev["action"], ev["users"], ev["message_id"], ev["from_seq"]) == (
            2,
            "remove",
            ["bob"],
            "",
            2,
        )
        assert ev["members"] == ["alice", "carol", "dave"] and ev["admins"] == ["alice"]
        assert sorted(ev["owed"]) == ["alice", "bob", "carol", "dave"]
        for _ in range(9):
            await store.change_group(_membership("g:1", "alice", GroupAction.PROMOTE, "carol"))
            await store.change_group(_membership("g:1", "alice", GroupAction.DEMOTE, "carol"))
        conv = conversations.find_one({"_id": "g:1"})
        assert [c["mver"] for c in conv["changes"]] == list(range(5, 21))  # the latest 16

    async def test_a_group_from_before_admins_is_run_by_its_members(self, backend: Backend) -> None:
        store = backend.store()
        await users(store, "alice", "bob", "carol", "dave")
        await store.ensure_indexes()
        backend.raw.get_collection("conversations").insert_one(
            {
                "_id": "g:old",
                "kind": "group",
                "title": "old",
                "members": ["alice", "bob", "carol"],
                "created_ts": 1,
                "last_seq": 0,
            }
        )
        [sent] = await store.append([new_message("g:old", "bob", ("alice", "carol"))])
        assert sent.seq == 1 and sent.recipients == ("alice", "carol")
        conv = await store.get_conversation("g:old")
        assert conv is not None and conv.admins == () and conv.joined == ()
        added = await store.change_group(_membership("g:old", "carol", GroupAction.ADD, "dave"))
        assert added.refused is None and added.event.admins == ()
        conv = await store.get_conversation("g:old")
        assert conv is not None and conv.members == ("alice", "bob", "carol", "dave")
        assert (
            conv.visible_from("dave") == 2 and "bob" in conv.members and manages("bob", conv.admins)
        )

    async def test_a_change_between_read_and_insert_places_the_message_again(
        self, backend: Backend
    ) -> None:
        """Another process removes bob and adds dave after this append read the
        group and before its insert: the message sits after both changes (its
        seq is their first), so it is owed to dave and not to bob."""
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob", "carol", "dave")
        g = await mine.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        await mine.append([new_message(g.id, "alice", ("bob", "carol"))])
        await other.ensure_indexes()

        def changes() -> None:
            mongo_groups.change_group(
                other._c, _membership(g.id, "alice", GroupAction.REMOVE, "bob")
            )
            mongo_groups.change_group(other._c, _membership(g.id, "alice", GroupAction.ADD, "dave"))

        _hook(mine, "messages", "insert_many", changes)
        late = new_message(g.id, "carol", ("alice", "bob"))
        [done] = await mine.append([late])
        assert done.refused is None and done.seq == 2 and done.recipients == ("alice", "dave")
        doc = backend.raw.get_collection("messages").find_one({"_id": late.id})
        assert doc["recipients"] == ["alice", "dave"] and doc["undelivered"] == ["alice", "dave"]
        assert [r["member"] for r in doc["receipts"]] == ["alice", "dave"]
        assert [m.id for m in await other.owed_messages("dave", 10)] == [late.id]
        assert late.id not in [m.id for m in await other.owed_messages("bob", 10)]
        assert [m.seq for m in await other.history(g.id, None, 10, viewer="dave")] == [2]

    async def test_a_retry_places_a_message_its_first_call_left_unchecked(
        self, backend: Backend
    ) -> None:
        """The change lands between the read and the insert, and the process
        stops before it checks: the client's retry (a duplicate) places it."""
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob", "carol", "dave")
        g = await mine.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        await other.ensure_indexes()

        def changes() -> None:
            mongo_groups.change_group(
                other._c, _membership(g.id, "alice", GroupAction.REMOVE, "bob")
            )
            mongo_groups.change_group(other._c, _membership(g.id, "alice", GroupAction.ADD, "dave"))

        _hook(mine, "messages", "insert_many", changes)
        _hook(mine, "conversations", "update_one", _crash)
        msg = new_message(g.id, "carol", ("alice", "bob"), cid="c-1")
        with pytest.raises(RuntimeError):
            await mine.append([msg])
        assert [m.id for m in await other.owed_messages("bob", 10)] == [msg.id]
        [again] = await other.append([new_message(g.id, "carol", ("alice", "bob"), cid="c-1")])
        assert again.duplicate and again.id == msg.id and again.refused is None
        # Owed, as placed: alice as before, dave afresh; not bob.
        assert again.recipients == ("alice", "dave")
        assert again.message is not None and again.message.body == msg.body
        assert await other.owed_messages("bob", 10) == []
        assert [m.id for m in await other.owed_messages("dave", 10)] == [msg.id]
        [summary] = await other.conversations_of("dave")
        assert summary.last_seq == 1

    async def test_a_sender_removed_between_read_and_insert_is_refused(
        self, backend: Backend
    ) -> None:
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob", "carol")
        g = await mine.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        first = new_message(g.id, "alice", ("bob", "carol"))
        await mine.append([first])
        await other.ensure_indexes()
        _hook(
            mine,
            "messages",
            "insert_many",
            lambda: mongo_groups.change_group(
                other._c, _membership(g.id, "alice", GroupAction.REMOVE, "carol")
            ),
        )
        late = new_message(g.id, "carol", ("alice", "bob"), cid="late")
        [done] = await mine.append([late])
        assert done.refused == "forbidden"
        # Its seq stays taken (no gaps), by a tombstone nobody is owed.
        [tomb] = await other.get_messages([late.id])
        assert tomb.seq == 2 and tomb.deleted
        assert [m.id for m in await other.owed_messages("bob", 10)] == [first.id]
        [again] = await other.append([new_message(g.id, "carol", ("alice",), cid="late")])
        assert again.duplicate and again.refused == "forbidden"
        [after] = await other.append([new_message(g.id, "alice", ("bob",))])
        assert after.seq == 3 and after.recipients == ("bob",)

    async def test_a_change_after_the_insert_leaves_the_message_before_it(
        self, backend: Backend
    ) -> None:
        """The change commits after the message is stored (before this call
        advances the counter): it starts at the next seq, and the message
        keeps the members it was stored for."""
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob", "carol", "dave")
        g = await mine.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        await other.ensure_indexes()

        def changes() -> None:
            mongo_groups.change_group(other._c, _membership(g.id, "alice", GroupAction.ADD, "dave"))
            mongo_groups.change_group(
                other._c, _membership(g.id, "alice", GroupAction.REMOVE, "bob")
            )

        _hook(mine, "conversations", "update_one", changes)
        msg = new_message(g.id, "carol", ("alice", "bob"))
        [done] = await mine.append([msg])
        assert done.refused is None and done.seq == 1 and done.recipients == ("alice", "bob")
        conv = await other.get_conversation(g.id)
        assert conv is not None and conv.visible_from("dave") == 2
        assert await other.owed_messages("dave", 10) == []
        assert [m.id for m in await other.owed_messages("bob", 10)] == [msg.id]
        [summary] = await other.conversations_of("alice")
        assert summary.last_seq == 1

    async def test_placing_a_message_again_keeps_the_receipts_of_who_stays(
        self, backend: Backend
    ) -> None:
        mine, other = backend.store(), backend.store()
        await users(mine, "alice", "bob", "carol", "dave")
        g = await mine.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        msg = new_message(g.id, "alice", ("bob", "carol"))
        await mine.append([msg])
        await mine.mark([Mark("bob", msg.id, Status.SEEN, 5)])
        await other.ensure_indexes()
        # carol's mark lands between the read and the compare-and-set: the
        # reassignment is planned again and keeps it.
        _hook(
            mine,
            "messages",
            "update_one",
            lambda: mongo_receipts.mark(other._c, [Mark("carol", msg.id, Status.DELIVERED, 6)]),
        )
        mongo_groups.reassign(mine._c, msg.id, ("carol", "dave"))
        doc = backend.raw.get_collection("messages").find_one({"_id": msg.id})
        assert doc["recipients"] == ["carol", "dave"]
        carol, dave = doc["receipts"]
        assert (carol["member"], carol["delivered_ts"], carol["seen_ts"]) == ("carol", 6, None)
        assert (dave["member"], dave["delivered_ts"], dave["seen_ts"]) == ("dave", None, None)
        assert doc["status"] == {"delivered_to": ["carol"], "seen_by": []}
        assert doc["undelivered"] == ["dave"] and doc["unseen"] == ["carol", "dave"]
        assert doc["rpending"] == 1
        owed = await other.owed_receipts("alice", 10)
        assert [(r.member, r.status) for r in owed] == [("carol", Status.DELIVERED)]
        [res] = await other.mark([Mark("dave", msg.id, Status.SEEN, 7)])
        assert {t.status for t in res.transitions} == {Status.DELIVERED, Status.SEEN}

    async def test_a_change_whose_event_was_not_stored_is_finished_by_the_next_writer(
        self, backend: Backend
    ) -> None:
        """A process stops between committing a change and storing its members
        event: the change holds, and the next writer in the group stores the
        event (before its own), so members events follow the changes."""
        crashed, other = backend.store(), backend.store()
        await users(other, "alice", "bob", "carol", "dave", "erin")
        g = await other.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        msg = new_message(g.id, "alice", ("bob", "carol"))
        await other.append([msg])
        await crashed.ensure_indexes()
        _hook(crashed, "events", "insert_one", _crash)
        with pytest.raises(RuntimeError):
            mongo_groups.change_group(
                crashed._c, _membership(g.id, "alice", GroupAction.ADD, "dave")
            )
        conversations = backend.raw.get_collection("conversations")
        assert "pending" in conversations.find_one({"_id": g.id})
        conv = await other.get_conversation(g.id)
        assert conv is not None and "dave" in conv.members
        assert await other.owed_events("dave", 10) == []
        # The next append stores it.
        [sent] = await other.append([new_message(g.id, "bob", ("alice",))])
        assert set(sent.recipients) == {"alice", "carol", "dave"}
        assert [(e.eseq, e.action) for e in await other.owed_events("dave", 10)] == [(1, "add")]
        assert "pending" not in conversations.find_one({"_id": g.id})
        # And the next event, before itself.
        _hook(crashed, "events", "insert_one", _crash)
        with pytest.raises(RuntimeError):
            mongo_groups.change_group(
                crashed._c, _membership(g.id, "alice", GroupAction.ADD, "erin")
            )
        react = new_event(g.id, EventKind.REACTION, msg.id, "bob", ("alice",), emoji="👍")
        done = await one_event(other, react)
        assert done.event.eseq == 3 and set(done.recipients) == {"alice", "carol", "dave", "erin"}
        owed = await other.owed_events("erin", 10)
        assert [(e.eseq, e.kind) for e in owed] == [(2, EventKind.MEMBERS), (3, EventKind.REACTION)]
        assert "pending" not in conversations.find_one({"_id": g.id})

    async def test_appends_racing_changes_follow_the_members_at_their_seq(
        self, backend: Backend
    ) -> None:
        """Three processes: members come and go while they send and react.
        Every stored message is owed to exactly the members at its seq (per
        the members events), sent by one of them, or refused; every reaction
        to the members after the members events before it; seq and eseq have
        no gaps."""
        a, b, c = backend.store(), backend.store(), backend.store()
        everyone = ("alice", "bob", "carol", "dave", "erin")
        await users(a, *everyone)
        g = await a.create_group("g:1", None, ["alice", "bob", "carol"], 1, creator="alice")
        first = new_message(g.id, "alice", ("bob", "carol"))
        await a.append([first])
        answers = []

        async def reactor(store: MongoStore, who: str, n: int) -> None:
            for j in range(n):
                ev = new_event(
                    g.id, EventKind.REACTION, first.id, who, ("alice",), emoji="👍", on=j % 2 == 0
                )
                await one_event(store, ev)

        async def sender(store: MongoStore, who: str, n: int) -> None:
            for _ in range(n):
                answers.extend(await store.append([new_message(g.id, who, ("alice",))]))

        async def changer(store: MongoStore) -> None:
            steps = [
                (GroupAction.ADD, "dave"),
                (GroupAction.REMOVE, "bob"),
                (GroupAction.ADD, "erin"),
                (GroupAction.REMOVE, "carol"),
                (GroupAction.ADD, "bob"),
                (GroupAction.REMOVE, "dave"),
                (GroupAction.ADD, "carol"),
            ]
            for action, name in steps:
                done = await store.change_group(_membership(g.id, "alice", action, name))
                assert done.refused is None

        async with trio.open_nursery() as n:
            for store, who in ((a, "bob"), (b, "carol"), (c, "dave"), (a, "erin"), (b, "alice")):
                n.start_soon(sender, store, who, 12)
            for store, who in ((c, "bob"), (a, "carol"), (b, "erin")):
                n.start_soon(reactor, store, who, 8)
            n.start_soon(changer, c)

        events = list(backend.raw.get_collection("events").find({}, sort=[("eseq", 1)]))
        assert [e["eseq"] for e in events] == list(range(1, len(events) + 1))
        members = {"alice", "bob", "carol"}
        for e in events:
            if e["kind"] == "members":
                members = set(e["members"])
            else:
                assert e["by"] in members and sorted(e["owed"]) == sorted(members - {e["by"]})
        changes = [e for e in events if e["kind"] == "members"]
        assert len(changes) == 7

        def members_at(seq: int) -> set[str]:
            members = {"alice", "bob", "carol"}
            for e in changes:
                if e["from_seq"] <= seq:
                    members = set(e["members"])
            return members

        docs = list(backend.raw.get_collection("messages").find({}, sort=[("seq", 1)]))
        assert [d["seq"] for d in docs] == list(range(1, len(docs) + 1))
        for d in docs:
            members = members_at(d["seq"])
            if d.get("refused"):
                assert d["sender"] not in members and d["recipients"] == [], d["seq"]
            else:
                assert d["sender"] in members, d["seq"]
                assert sorted(d["recipients"]) == sorted(members - {d["sender"]}), d["seq"]
        stored = {d["_id"]: d for d in docs}
        for ans in answers:
            if ans.refused is not None and ans.seq == 0:
                assert ans.id not in stored
            else:
                doc = stored[ans.id]
                assert ans.seq == doc["seq"] and bool(ans.refused) == bool(doc.get("refused"))
                if ans.refused is None:
                    assert sorted(ans.recipients) == sorted(doc["recipients"])
        conv = await a.get_conversation(g.id)
        assert conv is not None and conv.members == ("alice", "bob", "carol", "erin")
        joined = {e["users"][0]: e["from_seq"] for e in changes if e["action"] == "add"}
        assert {m: conv.visible_from(m) for m in conv.members} == {
            m: joined.get(m, 1) for m in conv.members
        }


@pytest.mark.mongomock
class TestMongoSpecificOnMongomock(MongoSpecific):
    @pytest.fixture
    def backend(self, mongomock_backend):
        return mongomock_backend


@needs_server
class TestMongoSpecificOnMongoDB(MongoSpecific):
    @pytest.fixture
    def backend(self, server_backend):
        return server_backend


# -- no server needed --------------------------------------------------------------


async def test_unreachable_server_is_unavailable_quickly_from_ping() -> None:
    store = MongoStore.open(UNREACHABLE)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await store.ping()
        assert time.monotonic() - started < 2
    finally:
        await store.aclose()


async def test_unreachable_server_is_unavailable_quickly_from_append() -> None:
    store = MongoStore.open(UNREACHABLE)
    try:
        for _ in range(2):  # the failed index build is retried, not remembered
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await store.append([new_message("dm:alice:bob", "alice", ("bob",))])
            assert time.monotonic() - started < 2
    finally:
        await store.aclose()


async def test_database_and_options_come_from_the_uri() -> None:
    stores = [
        MongoStore.open("mongodb://127.0.0.1:1/"),
        MongoStore.open("mongodb://127.0.0.1:1/fromuri?serverSelectionTimeoutMS=700"),
        MongoStore.open("mongodb://127.0.0.1:1/fromuri", database="explicit"),
        MongoStore.open("mongodb://127.0.0.1:1", serverSelectionTimeoutMS=900),
    ]
    try:
        assert [s.database for s in stores] == ["chatd", "fromuri", "explicit", "chatd"]
        timeouts = [s._client.options.server_selection_timeout for s in stores]
        assert timeouts == [3.0, 0.7, 3.0, 0.9]
        assert stores[0]._client.write_concern.document == {
            "w": "majority",
            "j": True,
            "wtimeout": 10000,
        }
    finally:
        for s in stores:
            await s.aclose()


def test_an_injected_client_takes_no_client_options() -> None:
    import mongomock

    with pytest.raises(TypeError):
        MongoStore.open("mongodb://x/db", client=mongomock.MongoClient(), w=1)


def test_a_bad_uri_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        MongoStore.open("http://not-mongo")


@pytest.mark.parametrize(
    "error",
    [
        ServerSelectionTimeoutError("no servers"),
        AutoReconnect("connection reset"),
        NetworkTimeout("timed out"),
        pymongo.errors.ConnectionFailure("refused"),
        pymongo.errors.OperationFailure("not primary"),
        pymongo.errors.PyMongoError("something"),
    ],
)
def test_pymongo_errors_become_unavailable(error: Exception) -> None:
    def fail() -> None:
        raise error

    with pytest.raises(Unavailable):
        _guard(fail)


def test_members_at_a_seq_undoes_the_changes_that_start_after_it() -> None:
    doc = {
        "members": ["alice", "carol", "dave"],
        "mver": 3,
        "changes": [
            {"mver": 2, "from_seq": 5, "added": ["dave"], "removed": []},
            {"mver": 3, "from_seq": 7, "added": [], "removed": ["bob"]},
        ],
    }
    assert _members_at(doc, 1, 7) == {"alice", "carol", "dave"}
    assert _members_at(doc, 1, 6) == {"alice", "bob", "carol", "dave"}
    assert _members_at(doc, 2, 4) == {"alice", "bob", "carol", "dave"}  # mver 2 came before
    # Before every change kept, with one not kept (mver 1): unknown.
    assert _members_at(doc, 0, 6) == {"alice", "bob", "carol", "dave"}
    assert _members_at(doc, 0, 4) is None
