"""The local connection registry of one node, and how broker payloads become
frames for devices.

The broker calls :meth:`Hub.dispatch` for every item addressed to a user
with a connection here; the hub renders the payload once (opening sealed
bodies with the keyring) and offers it to each of that user's connections.
"""

from __future__ import annotations

import logging
from typing import Protocol

from chatd import crypto
from chatd.core import frames
from chatd.core.delivery import event_order, message_order, receipt_order
from chatd.core.e2e import split_stored
from chatd.core.envelope import (
    DevicesEnvelope,
    Envelope,
    EventEnvelope,
    KickEnvelope,
    MessageEnvelope,
    PresenceEnvelope,
    ReceiptEnvelope,
    TypingEnvelope,
    decode,
)
from chatd.core.model import EventKind
from chatd.core.names import rid
from chatd.core.session import Outbound
from chatd.ports import Routed

log = logging.getLogger("chatd.hub")

#: The close code of a socket whose token or account is no longer valid.
CLOSE_UNAUTHORIZED = 4001


class Connection(Protocol):
    id: str
    user: str | None
    #: The end-to-end device this connection speaks for (named in ``auth``
    #: and active then), or None.
    device: str | None

    def offer(self, item: Outbound) -> None:
        """Take a live item; must not block (a full connection closes itself)."""
        ...

    def reply(self, item: Outbound) -> None:
        """A direct answer to this device; never held or deduplicated."""
        ...

    def close_soon(self, code: int, reason: str) -> None: ...

    def hold(self) -> None:
        """A write for this connection was queued (its answer is to come)."""
        ...

    def release(self) -> None:
        """That write's callback ran."""
        ...


def render(env: Envelope, keyring: crypto.Keys, needs_ack: bool) -> Outbound | None:
    """The frame a device gets for an envelope; None if it cannot be opened.

    ``needs_ack``: the item is in the user's queue (:attr:`Routed.queued`), so
    the outbound carries its key and the device must ack it."""
    match env:
        case MessageEnvelope(message=m):
            try:
                body = keyring.open(m.body, m.id, m.conversation)
            except crypto.KeyringError as exc:
                # An operator problem (a key missing from the keyring); the
                # message stays owed and is offered again once the key is back.
                log.error("cannot open message body", extra={"id": m.id, "reason": str(exc)})
                return None
            text, sealed = split_stored(body)
            data = frames.encode(
                frames.message(
                    m.id,
                    m.conversation,
                    m.seq,
                    m.sender,
                    text,
                    m.ts,
                    m.reply_to,
                    m.edited_ts,
                    sealed,
                )
            )
            return Outbound(data, m.id if needs_ack else None, message_order(m.conversation, m.seq))
        case EventEnvelope(event=e) if e.kind is EventKind.MEMBERS:
            frame = frames.members(
                e.id,
                e.conversation,
                e.eseq,
                e.by,
                e.ts,
                e.action or "",
                list(e.users),
                list(e.members),
                list(e.admins),
                e.title,
            )
            return Outbound(
                frames.encode(frame),
                e.id if needs_ack else None,
                event_order(e.conversation, e.eseq),
            )
        case EventEnvelope(event=e):
            text, sealed = None, None
            if e.body is not None:
                try:
                    text, sealed = split_stored(keyring.open(e.body, e.message_id, e.conversation))
                except crypto.KeyringError as exc:
                    log.error("cannot open an edit", extra={"id": e.id, "reason": str(exc)})
                    return None
            frame = frames.event(
                e.kind.value,
                e.id,
                e.conversation,
                e.eseq,
                e.message_id,
                e.by,
                e.ts,
                emoji=e.emoji,
                on=e.on,
                body=text,
                e2e=sealed,
            )
            return Outbound(
                frames.encode(frame),
                e.id if needs_ack else None,
                event_order(e.conversation, e.eseq),
            )
        case ReceiptEnvelope(receipt=r):
            receipt_id = rid(r.message_id, r.member, r.status)
            frame = frames.receipt(
                receipt_id, r.message_id, r.conversation, r.status.value, r.member, r.ts
            )
            return Outbound(
                frames.encode(frame),
                receipt_id if needs_ack else None,
                receipt_order(r.ts, receipt_id),
            )
        case TypingEnvelope():
            return Outbound(frames.encode(frames.typing(env.conversation, env.sender)))
        case PresenceEnvelope():
            return Outbound(frames.encode(frames.presence(env.user, env.online, env.last_seen)))
        case DevicesEnvelope():
            return Outbound(frames.encode(frames.devices(env.user)))
    return None


def render_payload(payload: str, keyring: crypto.Keys, needs_ack: bool) -> Outbound | None:
    """The frame for a broker payload; None (logged) if it cannot be decoded or opened."""
    try:
        env = decode(payload)
    except ValueError as exc:
        log.error("dropping an undecodable broker payload", extra={"reason": str(exc)})
        return None
    return render(env, keyring, needs_ack)


class Hub:
    def __init__(self, keyring: crypto.Keys) -> None:
        self.keyring = keyring
        self._by_user: dict[str, dict[str, Connection]] = {}
        #: The last envelope rendered: (envelope, its owed frame, its key).
        self._last: tuple[Envelope, Outbound | None, str | None] | None = None

    def add(self, conn: Connection) -> None:
        if conn.user is None:
            raise ValueError("only an authenticated connection joins the hub")
        self._by_user.setdefault(conn.user, {})[conn.id] = conn

    def remove(self, conn: Connection) -> None:
        if conn.user is None:
            return
        conns = self._by_user.get(conn.user)
        if conns is not None:
            conns.pop(conn.id, None)
            if not conns:
                del self._by_user[conn.user]

    def connections(self, user: str) -> list[Connection]:
        return list(self._by_user.get(user, {}).values())

    def users(self) -> list[str]:
        return list(self._by_user)

    def all(self) -> list[Connection]:
        return [c for conns in self._by_user.values() for c in conns.values()]

    def count(self) -> int:
        return sum(len(c) for c in self._by_user.values())

    def dispatch(self, item: Routed) -> None:
        conns = self._by_user.get(item.user)
        if not conns:
            return
        targets = [c for c in conns.values() if c.id != item.exclude]
        if not targets:
            return
        env = item.envelope
        if env is None:
            try:
                env = decode(item.payload)
            except ValueError as exc:
                log.error("dropping an undecodable broker payload", extra={"reason": str(exc)})
                return
        if isinstance(env, KickEnvelope):
            self._kick(targets, env)
            return
        out = self._render(env, item.queued)
        if out is None:
            return
        for conn in targets:
            conn.offer(out)

    def _kick(self, conns: list[Connection], env: KickEnvelope) -> None:
        for conn in conns:
            if env.token_id is None or getattr(conn, "token_id", None) == env.token_id:
                log.info("closing a socket", extra={"user": conn.user, "reason": env.reason})
                conn.close_soon(CLOSE_UNAUTHORIZED, env.reason)

    def _render(self, env: Envelope, needs_ack: bool) -> Outbound | None:
        """:func:`render`, remembering the last envelope: the items of one
        route (a message for the recipient and for the sender's other
        devices) are rendered, and a body opened, once."""
        last = self._last
        if last is not None and last[0] is env:
            out = last[1]
            if out is None:
                return None
            if (out.key is not None) == needs_ack:
                return out
            return Outbound(out.data, last[2] if needs_ack else None, out.order)
        out = render(env, self.keyring, needs_ack=True)
        self._last = (env, out, out.key if out is not None else None)
        if out is not None and not needs_ack:
            return Outbound(out.data, None, out.order)
        return out
