"""Names on the wire: usernames, client ids, conversation ids."""

from __future__ import annotations

import re

from chatd.core.errors import BadRequest
from chatd.core.model import ReceiptKey, Status

_USERNAME = re.compile(r"[a-z0-9_.\-]{3,32}")
MAX_CID = 64
DM_PREFIX = "dm:"
GROUP_PREFIX = "g:"
MAX_TITLE = 100
MAX_GROUP_MEMBERS = 256


def normalize_username(raw: object) -> str:
    """Case-fold a username and check it; raises :class:`BadRequest`."""
    if not isinstance(raw, str):
        raise BadRequest("username must be a string")
    name = raw.lower()
    if not _USERNAME.fullmatch(name):
        raise BadRequest("username must be 3-32 characters of a-z 0-9 _ . -")
    return name


def is_username(raw: str) -> bool:
    return bool(_USERNAME.fullmatch(raw))


def check_cid(raw: object) -> str:
    """A client message id: 1-64 printable characters."""
    if not isinstance(raw, str) or not 1 <= len(raw) <= MAX_CID or not raw.isprintable():
        raise BadRequest("cid must be 1-64 printable characters")
    return raw


def dm_id(a: str, b: str) -> str:
    """The deterministic id of the one-to-one conversation of ``a`` and ``b``."""
    first, second = sorted((a, b))
    return f"{DM_PREFIX}{first}:{second}"


def dm_members(conversation: str) -> tuple[str, str] | None:
    """The two members named by a ``dm:`` id, or None if it is not a valid one."""
    if not conversation.startswith(DM_PREFIX):
        return None
    parts = conversation[len(DM_PREFIX) :].split(":")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (is_username(a) and is_username(b)) or a >= b:
        return None
    return a, b


def is_conversation_id(raw: str) -> bool:
    if raw.startswith(DM_PREFIX):
        return dm_members(raw) is not None
    return raw.startswith(GROUP_PREFIX) and 3 <= len(raw) <= 64 and raw.isprintable()


def rid(message_id: str, member: str, status: Status) -> str:
    """The receipt id: one per message, member and status."""
    return f"{message_id}:{member}:{status.value}"


def parse_rid(raw: str) -> ReceiptKey:
    parts = raw.split(":")
    if len(parts) != 3 or not parts[0] or not is_username(parts[1]):
        raise BadRequest(f"'{raw[:80]}' is not a receipt id")
    try:
        status = Status(parts[2])
    except ValueError:
        raise BadRequest(f"'{raw[:80]}' is not a receipt id") from None
    return ReceiptKey(message_id=parts[0], member=parts[1], status=status)
