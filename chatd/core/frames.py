"""Wire frames: parse what a client sends, build what the server sends.

Parsing is done once, here, into small frozen dataclasses; everything after
this module works with those. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from chatd.core import e2e as e2e_rules
from chatd.core.errors import BadRequest, TooLarge, Unauthorized
from chatd.core.events import MAX_EMOJI_CHARS, is_emoji
from chatd.core.model import ReceiptKey
from chatd.core.names import check_cid, parse_rid

MAX_FRAME_BYTES = 64 * 1024
MAX_BODY_CHARS = 4000
MAX_IDS_PER_FRAME = 1000
MAX_ID_LEN = 128


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    #: The end-to-end device this connection speaks for, if any.
    device: str | None = None


@dataclass(frozen=True, slots=True)
class Send:
    cid: str
    #: The plain text, or None for an end-to-end message (``e2e`` instead).
    body: str | None
    to: str | None = None
    conversation: str | None = None
    reply_to: str | None = None
    #: An end-to-end message's ``e2e`` object (shape checked only).
    e2e: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    ids: tuple[str, ...] = ()
    receipts: tuple[str, ...] = ()
    #: ``receipts`` parsed (the parser fills it; empty when built by hand).
    keys: tuple[ReceiptKey, ...] = ()
    #: Event ids (``eid``) of reaction, edited and deleted events.
    events: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class React:
    cid: str
    id: str
    emoji: str
    on: bool


@dataclass(frozen=True, slots=True)
class Edit:
    cid: str
    id: str
    body: str | None
    e2e: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    cid: str
    id: str


@dataclass(frozen=True, slots=True)
class Seen:
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Typing:
    conversation: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientFrame = Auth | Send | Ack | Seen | Typing | Ping | React | Edit | Delete

#: Frames that act on a stored message and are answered with ``applied``.
EventFrame = React | Edit | Delete


class Oversize(bytes):
    """Stands in for a frame the transport discarded for its size."""


#: What the WebSocket adapter hands over instead of an oversize frame.
OVERSIZE = Oversize()


def frame_size(raw: str | bytes) -> int:
    """Size of a frame in bytes on the wire (UTF-8 for text)."""
    if isinstance(raw, bytes):
        return len(raw)
    if len(raw) * 4 <= MAX_FRAME_BYTES:
        return len(raw)  # cannot be over the limit; skip the encode
    return len(raw.encode("utf-8", "surrogatepass"))


def _str(obj: dict[str, Any], key: str, *, cid: str | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", cid=cid)
    return value


def _ids(obj: dict[str, Any], key: str, *, required: bool) -> tuple[str, ...]:
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise BadRequest(f"'{key}' is required")
        return ()
    value = obj[key]
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a list of strings")
    if len(value) > MAX_IDS_PER_FRAME:
        raise TooLarge(f"'{key}' holds more than {MAX_IDS_PER_FRAME} ids")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_ID_LEN:
            raise BadRequest(f"'{key}' must be a list of non-empty strings")
    # Keep the order, drop repeats: a client may list an id twice.
    return tuple(dict.fromkeys(value))


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    """Parse one client frame; raises :class:`BadRequest` or :class:`TooLarge`.

    The raised error carries the frame's ``cid`` when one could be read, so
    the client knows which message was refused.
    """
    if isinstance(raw, Oversize) or frame_size(raw) > MAX_FRAME_BYTES:
        raise TooLarge(f"frame is over {MAX_FRAME_BYTES} bytes")
    if isinstance(raw, bytes):
        raise BadRequest("binary frames are not accepted; send JSON text frames")
    try:
        # orjson is strict where the stdlib is lenient: no NaN or Infinity, no
        # lone surrogates (which could never be encoded again), depth <= 1024.
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadRequest("frame has no 'type'")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise BadRequest(f"unknown frame type '{kind[:32]}'")
    return parser(obj)


def _parse_auth(obj: dict[str, Any]) -> Auth:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        # A bad token, as far as the contract is concerned: unauthorized.
        raise Unauthorized("'auth' needs a token")
    device = obj.get("device")
    if device is not None and (not isinstance(device, str) or not 1 <= len(device) <= 64):
        raise BadRequest("'device' must be a device id")
    return Auth(token=token, device=device)


def _body(obj: dict[str, Any], cid: str) -> str:
    body = _str(obj, "body", cid=cid)
    if len(body) > MAX_BODY_CHARS:
        raise TooLarge(f"body is over {MAX_BODY_CHARS} characters", cid=cid)
    if not body.strip():
        raise BadRequest("body must not be empty", cid=cid)
    return body


def _message_id(obj: dict[str, Any], key: str, cid: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LEN:
        raise BadRequest(f"'{key}' must be a message id", cid=cid)
    return value


def _content(obj: dict[str, Any], cid: str) -> tuple[str | None, dict[str, Any] | None]:
    """(body, None) of a plain send or edit, (None, e2e) of an end-to-end one."""
    if obj.get("e2e") is None:
        return _body(obj, cid), None
    if obj.get("body") is not None:
        raise BadRequest("'body' and 'e2e' do not go together", cid=cid)
    return None, e2e_rules.check_message(obj["e2e"], cid=cid)


def _parse_send(obj: dict[str, Any]) -> Send:
    # A cid that is not valid is not echoed back: the error then has no cid.
    cid = check_cid(obj.get("cid"))
    body, sealed = _content(obj, cid)
    reply_to = None if obj.get("reply_to") is None else _message_id(obj, "reply_to", cid)
    to = obj.get("to")
    conversation = obj.get("conversation")
    if (to is None) == (conversation is None):
        raise BadRequest("send needs exactly one of 'to' or 'conversation'", cid=cid)
    if to is not None and not isinstance(to, str):
        raise BadRequest("'to' must be a username", cid=cid)
    if conversation is not None and not isinstance(conversation, str):
        raise BadRequest("'conversation' must be a conversation id", cid=cid)
    return Send(cid=cid, body=body, to=to, conversation=conversation, reply_to=reply_to, e2e=sealed)


def _parse_ack(obj: dict[str, Any]) -> Ack:
    receipts = _ids(obj, "receipts", required=False)
    # Checked before anything in the frame is applied.
    keys = tuple(parse_rid(rid) for rid in receipts)
    return Ack(
        ids=_ids(obj, "ids", required=False),
        receipts=receipts,
        keys=keys,
        events=_ids(obj, "events", required=False),
    )


def _parse_react(obj: dict[str, Any]) -> React:
    cid = check_cid(obj.get("cid"))
    mid = _message_id(obj, "id", cid)
    emoji = obj.get("emoji")
    if not isinstance(emoji, str) or not is_emoji(emoji):
        raise BadRequest(
            f"'emoji' must be one emoji (at most {MAX_EMOJI_CHARS} code points)", cid=cid
        )
    on = obj.get("on", True)
    if not isinstance(on, bool):
        raise BadRequest("'on' must be true or false", cid=cid)
    return React(cid=cid, id=mid, emoji=emoji, on=on)


def _parse_edit(obj: dict[str, Any]) -> Edit:
    cid = check_cid(obj.get("cid"))
    mid = _message_id(obj, "id", cid)
    body, sealed = _content(obj, cid)
    return Edit(cid=cid, id=mid, body=body, e2e=sealed)


def _parse_delete(obj: dict[str, Any]) -> Delete:
    cid = check_cid(obj.get("cid"))
    return Delete(cid=cid, id=_message_id(obj, "id", cid))


def _parse_seen(obj: dict[str, Any]) -> Seen:
    return Seen(ids=_ids(obj, "ids", required=True))


def _parse_typing(obj: dict[str, Any]) -> Typing:
    return Typing(conversation=_str(obj, "conversation"))


def _parse_ping(obj: dict[str, Any]) -> Ping:
    return Ping()


#: The client frames: type -> (its record, its parser). The one list;
#: metrics and the connection's counters derive theirs from it.
CLIENT_FRAMES: dict[str, tuple[type, Any]] = {
    "auth": (Auth, _parse_auth),
    "send": (Send, _parse_send),
    "ack": (Ack, _parse_ack),
    "seen": (Seen, _parse_seen),
    "typing": (Typing, _parse_typing),
    "ping": (Ping, _parse_ping),
    "react": (React, _parse_react),
    "edit": (Edit, _parse_edit),
    "delete": (Delete, _parse_delete),
}
CLIENT_TYPES = tuple(CLIENT_FRAMES)
#: Frame record -> its type (what chatd_frames_in_total counts).
TYPE_OF: dict[type, str] = {record: name for name, (record, _) in CLIENT_FRAMES.items()}
_PARSERS = {name: parse for name, (_, parse) in CLIENT_FRAMES.items()}

#: Every server frame type, in the order docs/protocol.md lists them.
SERVER_TYPES = (
    "ready", "sent", "message", "receipt", "typing", "presence", "pong", "error",
    "applied", "reaction", "edited", "deleted", "members", "devices",
)  # fmt: skip


# --- server frames ------------------------------------------------------------
# Built as dicts; ``encode`` turns one into the text frame.


def encode(frame: dict[str, Any]) -> bytes:
    """The frame as compact JSON text, UTF-8 encoded (``type`` comes first)."""
    return orjson.dumps(frame)


def ready(user: str, node: str, **extra: Any) -> dict[str, Any]:
    """``extra``: ``device`` when the ``auth`` named one (None when it is not
    an active device of the user)."""
    return {"type": "ready", "user": user, "node": node, **extra}


def devices(user: str) -> dict[str, Any]:
    """``user``'s set of end-to-end devices changed: fetch it again."""
    return {"type": "devices", "user": user}


def sent(cid: str, id: str, conversation: str, seq: int, ts: int) -> dict[str, Any]:
    return {
        "type": "sent",
        "cid": cid,
        "id": id,
        "conversation": conversation,
        "seq": seq,
        "ts": ts,
    }


def message(
    id: str,
    conversation: str,
    seq: int,
    sender: str,
    body: str | None,
    ts: int,
    reply_to: str | None = None,
    edited_ts: int | None = None,
    e2e: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``message``: with ``body``, or (end-to-end) with ``e2e`` and no body."""
    frame: dict[str, Any] = {
        "type": "message",
        "id": id,
        "conversation": conversation,
        "seq": seq,
        "from": sender,
        "body": body,
        "ts": ts,
    }
    if e2e is not None:
        del frame["body"]
        frame["e2e"] = e2e
    # Only when set: the frame of a plain message stays as small as before.
    if reply_to is not None:
        frame["reply_to"] = reply_to
    if edited_ts is not None:
        frame["edited_ts"] = edited_ts
    return frame


#: The ``action`` an ``applied`` answer names, per event kind.
ACTIONS = {"reaction": "react", "edited": "edit", "deleted": "delete"}


def applied(
    cid: str, kind: str, eid: str, conversation: str, id: str, eseq: int, ts: int
) -> dict[str, Any]:
    """The answer to a react, edit or delete: stored (like ``sent``)."""
    return {
        "type": "applied",
        "cid": cid,
        "action": ACTIONS[kind],
        "eid": eid,
        "conversation": conversation,
        "id": id,
        "eseq": eseq,
        "ts": ts,
    }


def event(
    kind: str,
    eid: str,
    conversation: str,
    eseq: int,
    id: str,
    by: str,
    ts: int,
    *,
    emoji: str | None = None,
    on: bool = True,
    body: str | None = None,
    e2e: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``reaction``, ``edited`` (``body``, or ``e2e`` end-to-end) or
    ``deleted`` event frame."""
    frame: dict[str, Any] = {
        "type": kind,
        "eid": eid,
        "conversation": conversation,
        "eseq": eseq,
        "id": id,
        "by": by,
        "ts": ts,
    }
    if kind == "reaction":
        frame["emoji"] = emoji
        frame["on"] = on
    elif kind == "edited" and e2e is not None:
        frame["e2e"] = e2e
    elif kind == "edited":
        frame["body"] = body
    return frame


def members(
    eid: str,
    conversation: str,
    eseq: int,
    by: str,
    ts: int,
    action: str,
    users: list[str],
    members: list[str],
    admins: list[str],
    title: str | None,
) -> dict[str, Any]:
    """A ``members`` event: a group changed (``id`` is null: no message)."""
    return {
        "type": "members",
        "eid": eid,
        "conversation": conversation,
        "eseq": eseq,
        "id": None,
        "by": by,
        "ts": ts,
        "action": action,
        "users": users,
        "members": members,
        "admins": admins,
        "title": title,
    }


def receipt(rid: str, id: str, conversation: str, status: str, by: str, ts: int) -> dict[str, Any]:
    return {
        "type": "receipt",
        "rid": rid,
        "id": id,
        "conversation": conversation,
        "status": status,
        "by": by,
        "ts": ts,
    }


def typing(conversation: str, sender: str) -> dict[str, Any]:
    return {"type": "typing", "conversation": conversation, "from": sender}


def presence(user: str, online: bool, last_seen: int | None) -> dict[str, Any]:
    return {"type": "presence", "user": user, "online": online, "last_seen": last_seen}


def pong() -> dict[str, Any]:
    return {"type": "pong"}


def error(code: str, message: str, cid: str | None = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if cid is not None:
        frame["cid"] = cid
    frame.update(extra)
    return frame
