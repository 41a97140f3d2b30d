"""What travels through the broker: compact JSON strings, bodies still sealed.

The broker never sees a plaintext body: a message envelope carries the same
AES-GCM ciphertext the store holds, and the replica that hands it to a
socket opens it. Receipts, typing and presence carry no body at all.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson

from chatd.core.model import EventKind, Receipt, Sealed, Status, StoredEvent, StoredMessage


@dataclass(frozen=True, slots=True)
class MessageEnvelope:
    message: StoredMessage


@dataclass(frozen=True, slots=True)
class ReceiptEnvelope:
    receipt: Receipt


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    """A reaction, edit or deletion (an edit carries its sealed body)."""

    event: StoredEvent


@dataclass(frozen=True, slots=True)
class TypingEnvelope:
    conversation: str
    sender: str


@dataclass(frozen=True, slots=True)
class PresenceEnvelope:
    user: str
    online: bool
    last_seen: int | None


@dataclass(frozen=True, slots=True)
class DevicesEnvelope:
    """``user``'s end-to-end devices changed (a device added or removed)."""

    user: str


@dataclass(frozen=True, slots=True)
class KickEnvelope:
    """Close the user's sockets on every node (4001): those authenticated
    with the token ``token_id``, or all of them when it is None (the account
    was disabled or deleted)."""

    token_id: str | None
    reason: str


Envelope = (
    MessageEnvelope
    | ReceiptEnvelope
    | EventEnvelope
    | TypingEnvelope
    | PresenceEnvelope
    | DevicesEnvelope
    | KickEnvelope
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(env: Envelope) -> str:
    match env:
        case MessageEnvelope(message=m):
            obj = {
                "k": "m",
                "id": m.id,
                "c": m.conversation,
                "q": m.seq,
                "f": m.sender,
                "t": m.ts,
                "kid": m.body.key_id,
                "n": _b64(m.body.nonce),
                "x": _b64(m.body.ciphertext),
            }
            if m.reply_to is not None:
                obj["re"] = m.reply_to
            if m.edited_ts is not None:
                obj["et"] = m.edited_ts
        case EventEnvelope(event=e):
            obj = {
                "k": "e",
                "e": e.id,
                "c": e.conversation,
                "q": e.eseq,
                "v": e.kind.value,
                "id": e.message_id,
                "by": e.by,
                "t": e.ts,
            }
            if e.kind is EventKind.REACTION:
                obj["em"] = e.emoji
                obj["on"] = e.on
            if e.kind is EventKind.MEMBERS:
                obj["ac"] = e.action
                obj["us"] = list(e.users)
                obj["ms"] = list(e.members)
                obj["ad"] = list(e.admins)
                obj["ti"] = e.title
            if e.body is not None:
                obj["kid"] = e.body.key_id
                obj["n"] = _b64(e.body.nonce)
                obj["x"] = _b64(e.body.ciphertext)
        case ReceiptEnvelope(receipt=r):
            obj = {
                "k": "r",
                "id": r.message_id,
                "c": r.conversation,
                "f": r.sender,
                "by": r.member,
                "s": r.status.value,
                "t": r.ts,
            }
        case TypingEnvelope():
            obj = {"k": "t", "c": env.conversation, "f": env.sender}
        case PresenceEnvelope():
            obj = {"k": "p", "u": env.user, "on": env.online, "ls": env.last_seen}
        case KickEnvelope():
            obj = {"k": "x", "j": env.token_id, "r": env.reason}
        case DevicesEnvelope():
            obj = {"k": "d", "u": env.user}
        case _:
            raise TypeError(f"not an envelope: {env!r}")
    return orjson.dumps(obj).decode("utf-8")


def decode(payload: str | bytes) -> Envelope:
    """Decode a broker payload; raises ValueError when it is not one."""
    try:
        obj = orjson.loads(payload)
        kind = obj["k"]
        if kind == "m":
            return MessageEnvelope(
                StoredMessage(
                    id=obj["id"],
                    conversation=obj["c"],
                    seq=int(obj["q"]),
                    sender=obj["f"],
                    ts=int(obj["t"]),
                    body=Sealed(
                        key_id=obj["kid"],
                        nonce=base64.b64decode(obj["n"]),
                        ciphertext=base64.b64decode(obj["x"]),
                    ),
                    reply_to=obj.get("re"),
                    edited_ts=obj.get("et"),
                )
            )
        if kind == "e":
            body = None
            if "x" in obj:
                body = Sealed(
                    key_id=obj["kid"],
                    nonce=base64.b64decode(obj["n"]),
                    ciphertext=base64.b64decode(obj["x"]),
                )
            return EventEnvelope(
                StoredEvent(
                    id=obj["e"],
                    conversation=obj["c"],
                    eseq=int(obj["q"]),
                    kind=EventKind(obj["v"]),
                    message_id=obj["id"],
                    by=obj["by"],
                    ts=int(obj["t"]),
                    emoji=obj.get("em"),
                    on=bool(obj.get("on", True)),
                    body=body,
                    action=obj.get("ac"),
                    users=tuple(obj.get("us", ())),
                    members=tuple(obj.get("ms", ())),
                    admins=tuple(obj.get("ad", ())),
                    title=obj.get("ti"),
                )
            )
        if kind == "r":
            return ReceiptEnvelope(
                Receipt(
                    message_id=obj["id"],
                    conversation=obj["c"],
                    sender=obj["f"],
                    member=obj["by"],
                    status=Status(obj["s"]),
                    ts=int(obj["t"]),
                )
            )
        if kind == "t":
            return TypingEnvelope(conversation=obj["c"], sender=obj["f"])
        if kind == "p":
            return PresenceEnvelope(user=obj["u"], online=bool(obj["on"]), last_seen=obj["ls"])
        if kind == "x":
            return KickEnvelope(token_id=obj["j"], reason=str(obj["r"]))
        if kind == "d":
            return DevicesEnvelope(user=obj["u"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a broker envelope: {exc}") from None
    raise ValueError(f"unknown envelope kind {kind!r}")
