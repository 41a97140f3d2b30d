"""What the Store contract's parts share: record builders and the base
class with the ``store`` fixture a test module overrides."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import pytest

from chatd.core.ids import UlidFactory
from chatd.core.model import (
    EventKind,
    GroupAction,
    NewEvent,
    NewMembership,
    NewMessage,
    Sealed,
    User,
)
from chatd.ports import Store, Writes

_ids = UlidFactory()
T = TypeVar("T")


def present(value: T | None) -> T:
    """``value``, which the contract says is there (a test failure if not)."""
    if value is None:
        raise AssertionError("expected a value, got None")
    return value


def sealed(tag: str = "x", key_id: str = "k1") -> Sealed:
    return Sealed(key_id=key_id, nonce=os.urandom(12), ciphertext=f"ct-{tag}".encode())


def new_message(
    conversation: str,
    sender: str,
    recipients: tuple[str, ...],
    cid: str | None = None,
    ts: int = 1,
    key_id: str = "k1",
) -> NewMessage:
    mid = _ids.new()
    return NewMessage(mid, conversation, sender, cid or mid, ts, sealed(mid, key_id), recipients)


def new_event(
    conversation: str,
    kind: EventKind,
    message_id: str,
    by: str,
    recipients: tuple[str, ...],
    cid: str | None = None,
    ts: int = 10,
    **fields: Any,
) -> NewEvent:
    eid = _ids.new()
    if kind is EventKind.EDITED and "body" not in fields:
        fields["body"] = sealed("edit-" + eid)
    return NewEvent(eid, conversation, kind, message_id, by, cid or eid, ts, recipients, **fields)


async def one_event(store: Store, ev: NewEvent) -> Any:
    [result] = (await store.write(Writes(events=[ev]))).events
    return result


async def users(store: Store, *names: str) -> None:
    for n in names:
        await store.create_user(User(n, "hash-" + n, 1))


class ContractBase:
    """The ``store`` fixture (provided by the subclass in a test module) and
    the set-ups several parts use."""

    @pytest.fixture
    async def store(self) -> Store:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    async def _trio(self, store: Store) -> tuple[str, NewMessage]:
        """alice, bob and carol in a group alice made; alice's first message."""
        await users(store, "alice", "bob", "carol")
        g = await store.create_group("g:ev", None, ["alice", "bob", "carol"], 1, creator="alice")
        msg = new_message(g.id, "alice", ("bob", "carol"), cid="a-1", ts=5)
        await store.append([msg])
        return g.id, msg

    async def _change(
        self, store: Store, by: str, action: GroupAction, *users: str, title: str | None = None
    ) -> Any:
        return await store.change_group(
            NewMembership(_ids.new(), "g:ev", by, 20, action, tuple(users), title)
        )
