"""The hub (issue 13: tests in the middle): who on this node gets a routed
item, owed or not, rendered once per route; kicks; and ``render`` for plain
and end-to-end bodies and a key the keyring lacks. Plain objects, no I/O."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

import pytest

from chatd import crypto
from chatd.core.e2e import stored_text
from chatd.core.envelope import KickEnvelope, MessageEnvelope, TypingEnvelope, encode
from chatd.core.model import Sealed, StoredMessage
from chatd.core.session import Outbound
from chatd.hub import CLOSE_UNAUTHORIZED, Hub, render
from chatd.ports import Routed

RING = crypto.Keyring(keys={"k1": secrets.token_bytes(32)}, active="k1")


@dataclass
class Conn:
    id: str
    user: str | None
    token_id: str | None = None
    device: str | None = None
    got: list[Outbound] = field(default_factory=list)
    closed: list[tuple[int, str]] = field(default_factory=list)

    def offer(self, item: Outbound) -> None:
        self.got.append(item)

    def reply(self, item: Outbound) -> None:
        self.got.append(item)

    def close_soon(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def hold(self) -> None: ...

    def release(self) -> None: ...


class CountingKeys:
    """Keys that count how often a body is opened."""

    def __init__(self, ring: crypto.Keyring) -> None:
        self.ring = ring
        self.opened = 0

    @property
    def active(self) -> str:
        return self.ring.active

    def seal(self, plaintext: str, message_id: str, conversation: str) -> Sealed:
        return self.ring.seal(plaintext, message_id, conversation)

    def open(self, sealed: Sealed, message_id: str, conversation: str) -> str:
        self.opened += 1
        return self.ring.open(sealed, message_id, conversation)


def message(text: str, *, ring: crypto.Keyring = RING) -> StoredMessage:
    return StoredMessage(
        "m1", "dm:alice:bob", 3, "alice", 99, ring.seal(text, "m1", "dm:alice:bob")
    )


def frame(out: Outbound | None) -> dict:
    assert out is not None
    return json.loads(out.data)


def test_a_user_gets_it_on_every_device_but_the_excluded_one():
    hub = Hub(RING)
    phone, laptop, other = Conn("c1", "bob"), Conn("c2", "bob"), Conn("c3", "carol")
    for c in (phone, laptop, other):
        hub.add(c)
    env = MessageEnvelope(message(stored_text(body="hi")))
    hub.dispatch(Routed("bob", "m1", encode(env), True, exclude="c2", envelope=env))
    assert [frame(o)["body"] for o in phone.got] == ["hi"]
    assert laptop.got == [] and other.got == []
    assert phone.got[0].key == "m1"  # owed: the device must ack it
    assert hub.count() == 3 and sorted(hub.users()) == ["bob", "carol"]
    hub.remove(phone)
    hub.remove(laptop)
    assert hub.connections("bob") == [] and hub.users() == ["carol"]


def test_one_route_opens_a_body_once_and_keys_only_the_owed_copy():
    keys = CountingKeys(RING)
    hub = Hub(keys)
    bob, alice_laptop = Conn("c1", "bob"), Conn("c2", "alice")
    hub.add(bob)
    hub.add(alice_laptop)
    env = MessageEnvelope(message(stored_text(body="hi")))
    # The recipient's copy (owed) and the sender's other device's (not).
    hub.dispatch(Routed("bob", "m1", "", True, envelope=env))
    hub.dispatch(Routed("alice", "m1", "", False, envelope=env))
    assert keys.opened == 1
    assert bob.got[0].key == "m1" and alice_laptop.got[0].key is None
    assert bob.got[0].data == alice_laptop.got[0].data


def test_a_payload_from_another_node_is_decoded_and_garbage_dropped():
    hub = Hub(RING)
    bob = Conn("c1", "bob")
    hub.add(bob)
    hub.dispatch(Routed("bob", "t", encode(TypingEnvelope("dm:alice:bob", "alice")), False))
    hub.dispatch(Routed("bob", "x", "not json at all", False))
    assert [frame(o)["type"] for o in bob.got] == ["typing"]


def test_a_kick_closes_the_sockets_of_one_token_or_all():
    hub = Hub(RING)
    a, b = Conn("c1", "bob", token_id="t1"), Conn("c2", "bob", token_id="t2")
    hub.add(a)
    hub.add(b)
    hub.dispatch(Routed("bob", "k", "", False, envelope=KickEnvelope("t1", "logged out")))
    assert a.closed == [(CLOSE_UNAUTHORIZED, "logged out")] and b.closed == []
    hub.dispatch(Routed("bob", "k", "", False, envelope=KickEnvelope(None, "disabled")))
    assert b.closed == [(CLOSE_UNAUTHORIZED, "disabled")]


def test_only_an_authenticated_connection_joins():
    with pytest.raises(ValueError):
        Hub(RING).add(Conn("c1", None))


def test_render_an_end_to_end_message_carries_its_object_and_no_body():
    e2e = {"v": 1, "device": "d" * 8, "epoch": "e" * 8, "iv": "i", "ct": "c", "sig": "s"}
    out = frame(render(MessageEnvelope(message(stored_text(e2e=e2e))), RING, needs_ack=True))
    assert out["e2e"] == e2e and "body" not in out
    # A plain body that happens to begin like the mark stays a plain body.
    tricky = "\x00e2e:{}"
    plain = frame(render(MessageEnvelope(message(stored_text(body=tricky))), RING, needs_ack=True))
    assert plain["body"] == tricky and "e2e" not in plain


def test_render_without_the_key_delivers_nothing():
    other = crypto.Keyring(keys={"k9": secrets.token_bytes(32)}, active="k9")
    env = MessageEnvelope(message(stored_text(body="hi"), ring=other))
    assert render(env, RING, needs_ack=True) is None


def test_each_owed_item_is_keyed_as_queue_key_says():
    """owed.*_item build their keys inline (they run per routed item); they
    must stay what queue_key, which the backlog and chatctl use, gives."""
    from chatd import queue_items
    from chatd.core.model import EventKind, Receipt, Status, StoredEvent

    items = [
        queue_items.message_item(message("hi")),
        queue_items.receipt_item(Receipt("m1", "dm:alice:bob", "alice", "bob", Status.SEEN, 5)),
        queue_items.event_item(
            StoredEvent("e1", "dm:alice:bob", 1, EventKind.DELETED, "m1", "bob", 5)
        ),
    ]
    for key, _payload, env in items:
        assert key == queue_items.queue_key(env)
