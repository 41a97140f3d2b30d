"""MongoDB documents <-> chatd's records: how a user, conversation, message,
receipt, event and device is stored, and how a stored one is read back.

Owns every document shape (``docs/mongo.md``, *Collections and documents*).
Pure: no I/O. A reader gives the fields a document lacks their defaults
(documents stored before a feature existed, or read through a narrower
projection), so every stored document stays readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from chatd.core.model import (
    Appended,
    Conversation,
    Device,
    EventKind,
    NewEvent,
    NewMessage,
    Sealed,
    Status,
    StoredEvent,
    StoredMessage,
    User,
)
from chatd.core.names import rid

#: What a deleted message's body is stored as.
ERASED = {"key_id": "", "nonce": b"", "ciphertext": b""}


def field_of(status: Status) -> str:
    return "delivered" if status is Status.DELIVERED else "seen"


def unacked(receipt: dict[str, Any]) -> list[Status]:
    """The statuses receipt element ``receipt`` has reached and its message's
    sender has not acked yet (what it still owes the sender)."""
    return [
        status
        for status in (Status.DELIVERED, Status.SEEN)
        if receipt.get(f"{field_of(status)}_ts") is not None
        and not receipt.get(f"{field_of(status)}_acked")
    ]


# -- records -> documents --------------------------------------------------------


def user_doc(user: User) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": user.username,
        "password_hash": user.password_hash,
        "created_ts": user.created_ts,
        "disabled": user.disabled or user.deleted,
    }
    if user.deleted:
        doc["deleted"] = True
    if user.last_seen is not None:
        doc["last_seen"] = user.last_seen
    return doc


def conversation_doc(
    id: str, kind: str, title: str | None, members: Iterable[str], ts: int
) -> dict[str, Any]:
    # last_ts stays absent until the first message ($max sets it then).
    return {
        "_id": id,
        "kind": kind,
        "title": title,
        "members": sorted(set(members)),
        "created_ts": ts,
        "last_seq": 0,
    }


def group_doc(
    id: str, title: str | None, members: Sequence[str], ts: int, creator: str | None, e2e: bool
) -> dict[str, Any]:
    doc = conversation_doc(id, "group", title, members, ts)
    doc["created_by"] = creator
    if e2e:
        doc["e2e"] = True
    # The creator is the first admin; mver counts membership changes.
    doc["admins"] = [creator] if creator in doc["members"] else []
    doc["mver"] = 0
    return doc


def body_doc(body: Sealed) -> dict[str, Any]:
    return {"key_id": body.key_id, "nonce": body.nonce, "ciphertext": body.ciphertext}


def message_doc(
    msg: NewMessage, seq: int, to: Sequence[str], mver: int | None = None
) -> dict[str, Any]:
    recipients = list(dict.fromkeys(to))  # unique, order kept
    doc: dict[str, Any] = {
        "_id": msg.id,
        "conversation": msg.conversation,
        "seq": seq,
        "sender": msg.sender,
        "cid": msg.cid,
        "ts": msg.ts,
        "recipients": recipients,
        "reply_to": msg.reply_to,
        "body": body_doc(msg.body),
        "status": {"delivered_to": [], "seen_by": []},
        # Per-recipient receipt state, element i belongs to recipients[i].
        "receipts": [receipt_doc(r) for r in recipients],
        # Index keys: who is still owed this message / has not seen it.
        "undelivered": list(recipients),
        "unseen": list(recipients),
        # Receipts of this message its sender has not acked yet.
        "rpending": 0,
    }
    if mver is not None:
        # A group's message: the membership version it was planned with.
        doc["mver"] = mver
    return doc


def receipt_doc(member: str) -> dict[str, Any]:
    return {
        "member": member,
        "delivered_ts": None,
        "seen_ts": None,
        "delivered_acked": False,
        "seen_acked": False,
    }


def event_doc(ev: NewEvent, eseq: int, to: Sequence[str]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": ev.id,
        "conversation": ev.conversation,
        "eseq": eseq,
        "kind": ev.kind.value,
        "message_id": ev.message_id,
        "by": ev.by,
        "cid": ev.cid,
        "ts": ev.ts,
        "emoji": ev.emoji,
        "on": ev.on,
        # Index key: who is still owed this event.
        "owed": list(dict.fromkeys(to)),
    }
    if ev.body is not None and ev.kind is EventKind.EDITED:
        # Until the edit is applied to its message (then unset): what lets
        # any process apply it.
        doc["body"] = body_doc(ev.body)
    return doc


def tombstone() -> dict[str, Any]:
    """The fields of a deleted message: a tombstone that keeps its seq, with
    no receipts, reactions or owed-message keys left (a later mark or ack
    finds no recipient)."""
    return {
        "body": dict(ERASED),
        "deleted": True,
        "reactions": [],
        "recipients": [],
        "receipts": [],
        "status": {"delivered_to": [], "seen_by": []},
        "undelivered": [],
        "unseen": [],
        "rpending": 0,
    }


def applying(ev: dict[str, Any]) -> dict[str, Any]:
    """The update that applies stored event ``ev`` to its message."""
    done = {"applied_eseq": ev["eseq"]}
    kind = EventKind(ev["kind"])
    if kind is EventKind.REACTION:
        entry = {"user": ev["by"], "emoji": ev["emoji"]}
        # $addToSet: one entry per (user, emoji), whatever the order of events.
        return {
            "$set": done,
            ("$addToSet" if ev.get("on", True) else "$pull"): {"reactions": entry},
        }
    if kind is EventKind.EDITED:
        return {"$set": {**done, "body": ev["body"], "edited_ts": ev["ts"]}, "$inc": {"edits": 1}}
    return {"$set": {**done, **tombstone()}}


def erased(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The (user, queue key) entries erasing message ``doc`` leaves stale: the
    message still owed to members, its receipts still owed to its sender."""
    mid, sender = doc["_id"], doc["sender"]
    out = [(member, mid) for member in doc.get("undelivered") or ()]
    for r in doc.get("receipts") or ():
        out += [(sender, rid(mid, r["member"], status)) for status in unacked(r)]
    return out


# -- documents -> records --------------------------------------------------------


def to_sealed(body: dict[str, Any]) -> Sealed:
    return Sealed(
        key_id=body["key_id"], nonce=bytes(body["nonce"]), ciphertext=bytes(body["ciphertext"])
    )


def to_message(doc: dict[str, Any]) -> StoredMessage:
    """A message document as read (the fields it lacks take their defaults:
    documents stored before replies and events, or a narrower projection)."""
    status = doc.get("status") or {}
    reactions: dict[str, list[str]] = {}
    for r in doc.get("reactions") or ():
        reactions.setdefault(r["emoji"], []).append(r["user"])
    return StoredMessage(
        id=doc["_id"],
        conversation=doc["conversation"],
        seq=doc["seq"],
        sender=doc["sender"],
        ts=doc["ts"],
        body=to_sealed(doc["body"]),
        delivered_to=tuple(sorted(status.get("delivered_to", ()))),
        seen_by=tuple(sorted(status.get("seen_by", ()))),
        cid=doc.get("cid"),
        reply_to=doc.get("reply_to"),
        edited_ts=doc.get("edited_ts"),
        edits=int(doc.get("edits") or 0),
        deleted=bool(doc.get("deleted", False)),
        reactions=tuple((e, tuple(sorted(u))) for e, u in sorted(reactions.items())),
    )


def to_user(doc: dict[str, Any]) -> User:
    return User(
        username=doc["_id"],
        password_hash=doc["password_hash"],
        created_ts=doc["created_ts"],
        last_seen=doc.get("last_seen"),
        disabled=bool(doc.get("disabled", False)),
        deleted=bool(doc.get("deleted", False)),
    )


def to_device(doc: dict[str, Any]) -> Device:
    return Device(
        user=doc["user"],
        device=doc["device"],
        sig_key=doc["sig_key"],
        dh_key=doc["dh_key"],
        name=doc["name"],
        self_sig=doc["self_sig"],
        created_ts=doc["created_ts"],
        removed_ts=doc.get("removed_ts"),
    )


def joined_of(doc: dict[str, Any]) -> dict[str, int]:
    """member -> the first seq they may read, for the members of a group who
    joined after it began (everyone else reads from seq 1)."""
    members = set(doc.get("members") or ())
    return {j["member"]: j["seq"] for j in doc.get("joined") or () if j["member"] in members}


def admins_of(doc: dict[str, Any]) -> list[str]:
    """A group's admins (none in a document made before admins existed)."""
    members = set(doc.get("members") or ())
    return sorted(a for a in doc.get("admins") or () if a in members)


def to_conversation(doc: dict[str, Any]) -> Conversation:
    return Conversation(
        id=doc["_id"],
        kind=doc["kind"],
        members=tuple(sorted(doc["members"])),
        title=doc.get("title"),
        created_ts=doc["created_ts"],
        created_by=doc.get("created_by"),
        admins=tuple(admins_of(doc)),
        joined=tuple(sorted((m, seq) for m, seq in joined_of(doc).items() if seq > 1)),
        e2e=bool(doc.get("e2e")),
    )


def to_event(doc: dict[str, Any], body: Sealed | None = None) -> StoredEvent:
    return StoredEvent(
        id=doc["_id"],
        conversation=doc["conversation"],
        eseq=doc["eseq"],
        kind=EventKind(doc["kind"]),
        message_id=doc["message_id"],
        by=doc["by"],
        ts=doc["ts"],
        emoji=doc.get("emoji"),
        on=bool(doc.get("on", True)),
        body=body,
        action=doc.get("action"),
        users=tuple(doc.get("users") or ()),
        members=tuple(doc.get("members") or ()),
        admins=tuple(doc.get("admins") or ()),
        title=doc.get("title"),
    )


def to_duplicate(doc: dict[str, Any]) -> Appended:
    """A retry's answer from its first message's document, as the duplicate
    lookup read it: that message as stored. Who still owes it is set at the
    end of the append, after any placing
    (:func:`chatd.store.mongo_plan.still_owed`)."""
    return Appended(
        doc["_id"],
        doc["conversation"],
        doc["seq"],
        doc["ts"],
        duplicate=True,
        refused=doc.get("refused"),
        message=to_message(doc),
    )
