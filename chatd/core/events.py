"""Rules for what members do to stored messages: react, edit, delete.

Plain functions; every store calls :func:`judge` inside the transaction that
applies an event, so the rule lives here once and is decided against what
is stored at that moment (a message deleted a moment ago cannot be edited).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from chatd.core.model import EventKind

#: How long after sending a message its sender may edit it (the default of
#: ``--edit-window``).
EDIT_WINDOW_MS = 48 * 3600 * 1000
#: A reaction is one emoji: at most this many code points (a family or a
#: flag with its modifiers fits).
MAX_EMOJI_CHARS = 16
#: Distinct reactions one user may put on one message.
MAX_REACTIONS_PER_USER = 20

#: Code points an emoji sequence may hold besides its symbols (``So``):
#: keycap bases, the zero-width joiner, variation selectors, tag characters.
_KEYCAP_BASES = frozenset("#*0123456789")
_JOINERS = frozenset({"\u200d", "\ufe0e", "\ufe0f", "\u20e3"})


def is_emoji(text: str) -> bool:
    """One emoji (or emoji sequence): 1-16 code points, at least one a
    symbol (``So``) or the keycap mark U+20E3, the rest skin-tone modifiers, joiners, variation
    selectors, keycap parts or tag characters. No letters, no spaces."""
    if not 1 <= len(text) <= MAX_EMOJI_CHARS:
        return False
    symbol = False
    for ch in text:
        category = unicodedata.category(ch)
        if category == "So" or ch == "\u20e3":  # a symbol, or a keycap (1️⃣)
            symbol = True
        elif category == "Sk" and 0x1F3FB <= ord(ch) <= 0x1F3FF:
            pass  # skin tones
        elif ch in _JOINERS or ch in _KEYCAP_BASES or 0xE0020 <= ord(ch) <= 0xE007F:
            pass
        else:
            return False
    return symbol


@dataclass(frozen=True, slots=True)
class Target:
    """The stored message an event is about, as the store reads it."""

    conversation: str
    sender: str
    ts: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # a wire error code
    reason: str


def judge(
    kind: EventKind,
    by: str,
    conversation: str,
    target: Target | None,
    now: int,
    *,
    window_ms: int | None = None,
    moderator: bool = False,
    reactions_by_user: int = 0,
    reacted_already: bool = False,
    on: bool = True,
) -> Refusal | None:
    """May ``by`` apply this event to ``target`` now? None, or why not.

    * An unknown message, one of another conversation, or a deleted one is
      ``not_found`` (a deleted message takes no reactions or edits, and
      deleting it again changes nothing).
    * Only the sender edits, within ``window_ms`` of sending.
    * The sender deletes; so does a ``moderator`` (a group's creator, an
      operator) for anybody's message.
    * A user puts at most :data:`MAX_REACTIONS_PER_USER` distinct reactions
      on one message.
    """
    if target is None or target.conversation != conversation or target.deleted:
        return Refusal("not_found", "no such message")
    if kind is EventKind.EDITED:
        if target.sender != by:
            return Refusal("forbidden", "only the sender may edit a message")
        if window_ms is not None and now - target.ts > window_ms:
            return Refusal("forbidden", "this message is too old to edit")
    elif kind is EventKind.DELETED:
        if target.sender != by and not moderator:
            return Refusal("forbidden", "only the sender may delete a message")
    elif (
        kind is EventKind.REACTION
        and on
        and not reacted_already
        and reactions_by_user >= MAX_REACTIONS_PER_USER
    ):
        return Refusal("bad_request", f"at most {MAX_REACTIONS_PER_USER} reactions per message")
    return None
