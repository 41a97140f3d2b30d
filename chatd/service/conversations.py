"""Conversations and groups: list, open a one-to-one, create and change a group, history.

Also the conversation lookups the other rooms use (the one-to-one cache,
:meth:`~ConversationsMixin.member_conversation`), how a stored message is
shown (:meth:`~ConversationsMixin._message_json`), and looking up a user one
shares a conversation with.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from chatd import crypto, queue_items
from chatd.core.e2e import Content, parse_stored
from chatd.core.errors import BadRequest, Forbidden, NotFound
from chatd.core.model import Conversation, GroupAction, NewMembership, StoredMessage, User
from chatd.core.names import (
    GROUP_PREFIX,
    MAX_GROUP_MEMBERS,
    MAX_TITLE,
    is_conversation_id,
    normalize_username,
)
from chatd.ports import Routed
from chatd.service.base import REFUSALS, ServiceBase, log

HISTORY_DEFAULT = 50
HISTORY_MAX = 200


class ConversationsMixin(ServiceBase):
    """Conversations, groups, history, user lookups."""

    def _remember(self, conv: Conversation) -> Conversation:
        self._conversations[conv.id] = conv
        self._conversations.move_to_end(conv.id)
        while len(self._conversations) > self._conversation_cache:
            self._conversations.popitem(last=False)
        return conv

    def _now_e2e(self, conv: Conversation) -> Conversation:
        """``conv`` is end-to-end: a send switched it, the store refused a
        plain body or edit in it, or it was made so. The one place the
        service learns it: its cached copy, if any, says so from now on,
        and the end-to-end copy is returned.

        The cache is only a hint. The switch is one way, so a cached
        end-to-end mode is never wrong; a cached plain one may be stale
        (another replica switched the conversation), and then a plain send
        or edit goes on to the store, which judges it against the mode in
        its transaction and refuses it (``e2e_required``): a stale copy
        never lets plain content into an end-to-end conversation."""
        cached = self._conversations.get(conv.id)
        if cached is not None and not cached.e2e:
            self._conversations[conv.id] = replace(cached, e2e=True)
        return conv if conv.e2e else replace(conv, e2e=True)

    async def _conversation(self, id: str) -> Conversation | None:
        """The conversation; one-to-one ones from the cache (their members
        never change; their mode only turns end-to-end, see
        :meth:`_now_e2e`), groups from the store every time (theirs do, on
        any replica)."""
        conv = self._conversations.get(id)
        if conv is None:
            conv = await self.store.get_conversation(id)
            if conv is not None and conv.kind == "dm":
                self._remember(conv)
        return conv

    async def member_conversation(self, user: str, id: str, cid: str | None = None) -> Conversation:
        """The conversation, if ``user`` is a member: NotFound / Forbidden otherwise."""
        if not is_conversation_id(id):
            raise NotFound("no such conversation", cid=cid)
        conv = await self._conversation(id)
        if conv is None:
            raise NotFound("no such conversation", cid=cid)
        if user not in conv.members:
            raise Forbidden("not a member of this conversation", cid=cid)
        return conv

    async def conversations(self, user: str) -> list[dict[str, Any]]:
        return [
            {
                "id": s.id,
                "kind": s.kind,
                "title": s.title,
                "members": list(s.members),
                "admins": list(s.admins),
                "joined": dict(s.joined),
                "e2e": s.e2e,
                "last_seq": s.last_seq,
                "last_ts": s.last_ts,
                "unread": s.unread,
                "last_message": (
                    self._message_json(s.last_message, viewer=user) if s.last_message else None
                ),
            }
            for s in await self.store.conversations_of(user)
        ]

    def _message_json(self, m: StoredMessage, viewer: str) -> dict[str, Any]:
        """A message as history shows it to ``viewer``: the contract's fields,
        then the sender's ``cid`` (to the sender only), ``reply_to``,
        ``edited_ts``, ``reactions`` (counts, whether the viewer is among
        them, and who) and ``deleted`` (a tombstone has ``body`` null). An
        end-to-end message has its ``e2e`` object instead of ``body``."""
        content = Content(None) if m.deleted else self._open(m)
        out: dict[str, Any] = {
            "id": m.id,
            "conversation": m.conversation,
            "seq": m.seq,
            "from": m.sender,
            **content.fields(),
            "ts": m.ts,
            "delivered_to": list(m.delivered_to),
            "seen_by": list(m.seen_by),
            "cid": m.cid if viewer == m.sender else None,
            "reply_to": m.reply_to,
            "edited_ts": m.edited_ts,
            "reactions": [
                {"emoji": emoji, "count": len(users), "mine": viewer in users, "users": list(users)}
                for emoji, users in m.reactions
            ],
        }
        if m.deleted:
            out["deleted"] = True
        return out

    async def history(
        self, user: str, id: str, before: int | None, limit: int | None
    ) -> list[dict[str, Any]]:
        await self.member_conversation(user, id)
        if before is not None and before < 1:
            raise BadRequest("'before' must be a positive seq")
        limit = HISTORY_DEFAULT if limit is None else limit
        if not 1 <= limit <= HISTORY_MAX:
            raise BadRequest(f"'limit' must be 1-{HISTORY_MAX}")
        page = await self.store.history(id, before, limit, viewer=user)
        return [self._message_json(m, viewer=user) for m in page]

    def _open(self, m: StoredMessage) -> Content:
        try:
            return parse_stored(self.keyring.open(m.body, m.id, m.conversation))
        except crypto.KeyringError as exc:
            log.error("cannot open message body", extra={"id": m.id, "reason": str(exc)})
            return Content(None)

    async def open_dm(self, user: str, peer: object) -> Conversation:
        """The one-to-one conversation of ``user`` and ``peer``, made now if
        it does not exist yet (so that an end-to-end client can fetch the
        peer's devices before its first message)."""
        name = normalize_username(peer)
        if name == user:
            raise BadRequest("cannot start a conversation with yourself")
        if await self.store.get_user(name) is None:
            raise NotFound(f"no user '{name}'")
        return await self.store.ensure_dm(user, name, self.clock.now_ms())

    async def create_group(
        self, user: str, members: object, title: object, e2e: object = False
    ) -> Conversation:
        if not isinstance(e2e, bool):
            raise BadRequest("'e2e' must be true or false")
        if not isinstance(members, list) or not members:
            raise BadRequest("'members' must be a non-empty list of usernames")
        if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE):
            raise BadRequest(f"'title' must be a string of at most {MAX_TITLE} characters")
        names = {normalize_username(m) for m in members} | {user}
        if len(names) > MAX_GROUP_MEMBERS:
            raise BadRequest(f"a group has at most {MAX_GROUP_MEMBERS} members")
        if len(names) < 2:
            raise BadRequest("a group needs at least one other member")
        for name in sorted(names - {user}):
            if await self.store.get_user(name) is None:
                raise NotFound(f"no user '{name}'")
        conv = await self.store.create_group(
            GROUP_PREFIX + self.ids.new(),
            title.strip() if isinstance(title, str) else None,
            sorted(names),
            self.clock.now_ms(),
            creator=user,
            e2e=e2e,
        )
        return self._now_e2e(conv) if e2e else conv

    async def change_group(
        self, user: str, id: str, action: GroupAction, users: object = (), title: object = None
    ) -> dict[str, Any]:
        """Add or remove members, leave, rename, make or unmake admins: judged
        and applied by the store against the group as it is then; a
        ``members`` event goes (owed) to every member before and after, on
        every replica. Answers the group after the change."""
        if not is_conversation_id(id):
            raise NotFound("no such conversation")
        names: list[str] = []
        if action in (GroupAction.ADD, GroupAction.REMOVE, GroupAction.PROMOTE, GroupAction.DEMOTE):
            if not isinstance(users, list | tuple) or not users:
                raise BadRequest("'members' must be a non-empty list of usernames")
            if len(users) > MAX_GROUP_MEMBERS:
                raise BadRequest(f"a group has at most {MAX_GROUP_MEMBERS} members")
            names = list(dict.fromkeys(normalize_username(u) for u in users))
        if action is GroupAction.ADD:
            for name in names:
                found = await self.store.get_user(name)
                if found is None or found.deleted:
                    raise NotFound(f"no user '{name}'")
        if action is GroupAction.RENAME:
            if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE):
                raise BadRequest(f"'title' must be a string of at most {MAX_TITLE} characters")
            title = (title.strip() or None) if isinstance(title, str) else None
        change = NewMembership(
            self.ids.new(),
            id,
            user,
            self.clock.now_ms(),
            action,
            tuple(names),
            title if isinstance(title, str) else None,
        )
        done = await self.store.change_group(change)
        if done.refused is not None or done.event is None:
            raise REFUSALS.get(done.refused or "", NotFound)(done.reason or "refused")
        e = done.event
        self.metrics.events[e.kind.value].inc()
        log.info(
            "group changed",
            extra={"conversation": id, "by": user, "action": action.value, "users": names},
        )
        key, payload, env = queue_items.event_item(e)
        await self._route([Routed(u, key, payload, True, None, env) for u in done.recipients or ()])
        return {
            "id": id,
            "kind": "group",
            "title": e.title,
            "members": list(e.members),
            "admins": list(e.admins),
            "eid": e.id,
            "eseq": e.eseq,
            "ts": e.ts,
            "by": e.by,
            "action": e.action,
            "users": list(e.users),
        }

    async def _visible_user(self, caller: str, name: str) -> User:
        """The user ``name`` if ``caller`` may look them up (themselves, or
        someone they share a conversation with); NotFound otherwise, the
        same answer for a stranger as for nobody."""
        try:
            name = normalize_username(name)
        except BadRequest:
            raise NotFound("no such user") from None
        user = await self.store.get_user(name)
        if user is None or (
            name != caller and not await self.store.shares_conversation(caller, name)
        ):
            raise NotFound("no such user")
        return user

    async def user_info(self, caller: str, name: str) -> dict[str, Any]:
        user = await self._visible_user(caller, name)
        name = user.username
        presence = (await self.broker.presence([name]))[name]
        seen = [t for t in (presence.last_seen, user.last_seen) if t is not None]
        return {
            "username": name,
            "online": presence.online,
            "last_seen": max(seen) if seen else None,
        }
