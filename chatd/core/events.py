"""Rules for what members do to stored messages: react, edit, delete.

Plain functions; every store calls :func:`judge` inside the transaction that
applies an event, so the rule lives here once and is decided against what
is stored at that moment (a message deleted a moment ago cannot be edited).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from chatd.core.e2e import REFUSED, edit_mismatch
from chatd.core.model import EventKind, GroupAction, NewEvent
from chatd.core.names import MAX_GROUP_MEMBERS

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
    seq: int = 1
    #: Its conversation is end-to-end, as stored at that moment.
    e2e: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    #: A wire error code, or an end-to-end reason (``e2e_required``,
    #: ``e2e_off``: a ``bad_request`` with that reason).
    code: str
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
    visible_from: int = 1,
    reactions_by_user: int = 0,
    reacted_already: bool = False,
    on: bool = True,
    sealed: bool = False,
) -> Refusal | None:
    """May ``by`` apply this event to ``target`` now? None, or why not.

    * An unknown message, one of another conversation, a deleted one, or one
      from before the actor joined the group (``visible_from``: the first
      seq the actor may read) is ``not_found`` (a deleted message takes no
      reactions or edits, and deleting it again changes nothing).
    * An edit fits its conversation's mode (``target.e2e``): a plain one
      in an end-to-end conversation is ``e2e_required``, an end-to-end
      (``sealed``) one in a plain conversation ``e2e_off``
      (:func:`chatd.core.e2e.edit_mismatch`).
    * Only the sender edits, within ``window_ms`` of sending.
    * The sender deletes; so does a ``moderator`` (a group's admin, an
      operator) for anybody's message.
    * A user puts at most :data:`MAX_REACTIONS_PER_USER` distinct reactions
      on one message.
    """
    if (
        target is None
        or target.conversation != conversation
        or target.deleted
        or target.seq < visible_from
    ):
        return Refusal("not_found", "no such message")
    if kind is EventKind.EDITED:
        mismatch = edit_mismatch(sealed=sealed, e2e=target.e2e)
        if mismatch is not None:
            return Refusal(mismatch, REFUSED[mismatch])
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


# --- groups that change -----------------------------------------------------------


def judge_event(
    ev: NewEvent,
    target: Target | None,
    *,
    moderator: bool,
    visible_from: int,
    reactions_by_user: int,
    reacted_already: bool,
) -> Refusal | None:
    """:func:`judge` for a :class:`NewEvent` as a store sees it in its commit
    (both stores call this, with what they read of the target)."""
    return judge(
        ev.kind,
        ev.by,
        ev.conversation,
        target,
        ev.ts,
        window_ms=ev.window_ms,
        moderator=moderator,
        visible_from=visible_from,
        reactions_by_user=reactions_by_user,
        reacted_already=reacted_already,
        on=ev.on,
        sealed=ev.e2e,
    )


def manages(user: str, admins: Sequence[str]) -> bool:
    """May a member change the group and moderate its messages? Its admins
    may; in a group without admins (made before they existed) every member."""
    return user in admins or not admins


@dataclass(frozen=True, slots=True)
class MembershipPlan:
    """What a group change does: who joins and leaves, the group after it,
    and who hears of it (every member before and after)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    members: tuple[str, ...]
    admins: tuple[str, ...]
    title: str | None
    notify: tuple[str, ...]


def plan_membership(
    action: GroupAction,
    by: str,
    users: Sequence[str],
    title: str | None,
    *,
    kind: str,
    members: Sequence[str],
    admins: Sequence[str],
    current_title: str | None,
    max_members: int = MAX_GROUP_MEMBERS,
) -> Refusal | MembershipPlan:
    """Judge and plan a change of a group against the group as stored now.

    ``members`` is in join order (the longest-standing first). The rules:

    * Only groups change; only members act. ``leave`` is open to every
      member; every other action needs an admin (or, in a group that has
      none — made before admins existed — any member).
    * ``add`` names at least one user not yet a member, up to
      ``max_members`` in all; ``remove``, ``promote`` name members;
      ``demote`` names admins and may not leave a group without one.
    * When the last admin leaves or is removed, the longest-standing member
      left becomes admin, so a group is never left unmanaged.
    """
    if kind != "group":
        return Refusal("bad_request", "the members of a one-to-one conversation never change")
    if by not in members:
        return Refusal("forbidden", "not a member of this conversation")
    current = list(members)
    admin_set = [a for a in admins if a in current]
    if action is not GroupAction.LEAVE and not manages(by, admin_set):
        return Refusal("forbidden", "only the group's admins may change it")
    added: list[str] = []
    removed: list[str] = []
    new_title = current_title
    if action is GroupAction.LEAVE:
        removed = [by]
    elif action is GroupAction.RENAME:
        new_title = title
    else:
        if not users:
            return Refusal("bad_request", "name at least one user")
        if action is GroupAction.ADD:
            added = [u for u in dict.fromkeys(users) if u not in current]
            if not added:
                return Refusal("bad_request", "they are members already")
            if len(current) + len(added) > max_members:
                return Refusal("bad_request", f"a group has at most {max_members} members")
        else:
            strangers = [u for u in users if u not in current]
            if strangers:
                return Refusal("not_found", f"not a member: {strangers[0]}")
            if action is GroupAction.REMOVE:
                removed = list(dict.fromkeys(users))
            elif action is GroupAction.PROMOTE:
                admin_set = admin_set + [u for u in users if u not in admin_set]
            else:  # DEMOTE
                if any(u not in admin_set for u in users):
                    return Refusal("bad_request", "not an admin")
                admin_set = [a for a in admin_set if a not in users]
                if not admin_set:
                    return Refusal("bad_request", "a group needs at least one admin")
    after = [m for m in current if m not in removed] + added
    had_admins = bool(admin_set)
    admin_set = [a for a in admin_set if a in after]
    if had_admins and not admin_set and after:
        admin_set = [after[0]]
    return MembershipPlan(
        added=tuple(added),
        removed=tuple(removed),
        members=tuple(sorted(after)),
        admins=tuple(sorted(admin_set)),
        title=new_title,
        notify=tuple(sorted(set(current) | set(after))),
    )
