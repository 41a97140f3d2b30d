"""Messages and events: send, act (react, edit, delete), ack, seen, typing.

Each frame is queued on the group commit (:meth:`ServiceBase._write`) with a
callback that answers the connection (``sent``, ``applied``, or an ``error``
with the ``cid``) and then routes what was stored, through the broker,
without waiting (:meth:`MessagesMixin.publish_event` does it for an event).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from chatd import queue_items
from chatd.core import frames
from chatd.core.delivery import recipients, settled_rids, target_of
from chatd.core.e2e import E2E_REQUIRED, stored_text
from chatd.core.envelope import Envelope, TypingEnvelope, encode
from chatd.core.errors import BadRequest, ChatError, Forbidden, Internal, NotFound
from chatd.core.model import (
    Appended,
    Conversation,
    EventKind,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMessage,
    Status,
    StoredMessage,
)
from chatd.core.names import parse_rid
from chatd.core.session import Outbound
from chatd.hub import Connection
from chatd.ports import Routed
from chatd.service.base import EventAck, WriteRequest, WriteResult, error_frame, log, refusal
from chatd.service.e2e import EndToEndMixin, e2e_off, e2e_required

R = TypeVar("R", Appended, EventResult)


def _one_result(
    result: list[WriteResult] | ChatError, conn: Connection, cid: str, kind: type[R]
) -> R | None:
    """In a one-request write's callback: the connection's write is done;
    its result, or None once a failed batch was answered with the cid."""
    conn.release()
    if isinstance(result, ChatError):
        conn.reply(error_frame(result.with_cid(cid)))
        return None
    done = result[0]
    if not isinstance(done, kind):
        raise Internal(f"a write result is not an {kind.__name__}")
    return done


class MessagesMixin(EndToEndMixin):
    """The frames a connection sends once it is ready (bar ``auth``)."""

    async def send(self, conn: Connection, frame: frames.Send) -> None:
        """Store a message, answer ``sent`` on ``conn``, then route it.

        Returns once the message is queued for the group commit (it waits
        only to look up a conversation it has not seen yet, and when the
        commit queue is full); ``sent`` and the routing follow from the
        commit's callback, ``sent`` first, so that it always precedes the
        receipts of the same message on the sender's connection. A failed
        write answers an ``error`` with the ``cid``. A retry (a stored
        (sender, cid)) is answered with the first ``sent`` and routes the
        first message, as stored, again to the members who still owe it
        (:attr:`Appended.message`): its first routing may never have happened.
        """
        if conn.user is None:
            raise Internal("send on a connection that is not authenticated")
        sender = conn.user
        target = target_of(frame, sender)
        if target.peer is not None:
            conv = self._conversations.get(target.conversation)
            if conv is None:
                if await self.store.get_user(target.peer) is None:
                    raise NotFound(f"no user '{target.peer}'", cid=frame.cid)
                conv = self._remember(
                    await self.store.ensure_dm(sender, target.peer, self.clock.now_ms())
                )
        else:
            conv = await self.member_conversation(sender, target.conversation, frame.cid)
        to = recipients(conv.members, sender)
        if frame.reply_to is not None:
            await self._message_in(frame.reply_to, conv, sender, frame.cid)
        try:
            text = await self._content(
                conn, conv, frame.body, frame.e2e, frame.cid, may_switch=True
            )
        except (BadRequest, Forbidden):
            # A retry of a message stored before a device or the mode
            # changed is answered with its first ``sent``, as any retry.
            if await self.store.sent_id(sender, frame.cid) is None:
                raise
            text = stored_text(body=frame.body) if frame.body is not None else ""
        mid = self.ids.new()
        ts = self.clock.now_ms()
        sealed = self.keyring.seal(text, mid, conv.id)
        cid = frame.cid
        reply_to = frame.reply_to
        sealed_send = frame.e2e is not None

        def stored(result: list[WriteResult] | ChatError) -> None:
            done = _one_result(result, conn, cid, Appended)
            if done is None:
                return
            if done.refused == E2E_REQUIRED:
                # Switched on another replica since this one cached it.
                self._now_e2e(conv)
                conn.reply(error_frame(e2e_required(cid)))
                return
            if done.refused is not None:
                conn.reply(error_frame(Forbidden("not a member of this conversation", cid=cid)))
                return
            conn.reply(
                Outbound(
                    frames.encode(frames.sent(cid, done.id, done.conversation, done.seq, done.ts))
                )
            )
            if done.duplicate:
                self.metrics.messages_duplicate.inc()
                # The call that stored it may have stopped (a replica killed)
                # before it routed it: route it again, as stored (the retry
                # may carry other content, sealed under another id), to whom
                # still owes it. Deleted for everyone since: nothing to route.
                first = done.message
                if first is not None and not first.deleted:
                    self._route_message(first, done.recipients or (), conn)
                return
            self.metrics.messages_stored.inc()
            if sealed_send:
                self._now_e2e(conv)  # stored: the conversation is end-to-end
            self._route_message(
                StoredMessage(
                    done.id, conv.id, done.seq, sender, done.ts, sealed, reply_to=reply_to
                ),
                to if done.recipients is None else done.recipients,
                conn,
            )

        await self._write(
            [NewMessage(mid, conv.id, sender, cid, ts, sealed, to, reply_to, sealed_send)],
            conn,
            stored,
        )

    def _route_message(self, m: StoredMessage, owed_to: Sequence[str], conn: Connection) -> None:
        """Route a stored message: owed (queued until acked) to ``owed_to``,
        and a copy, not owed, to its sender's other devices (not ``conn``)."""
        self._route_owed(queue_items.message_item(m), owed_to, m.sender, conn.id)

    def _route_owed(
        self,
        item: tuple[str, str, Envelope],
        owed_to: Sequence[str],
        author: str,
        exclude: str | None,
    ) -> None:
        """Route a stored message or event (``item``: its queue key, payload
        and envelope): owed to ``owed_to``, and a copy, not owed, to its
        author's other devices (not the connection ``exclude``)."""
        key, payload, env = item
        items = [Routed(r, key, payload, True, None, env) for r in owed_to]
        items.append(Routed(author, key, payload, False, exclude, env))
        self.broker.route_nowait(items)

    async def _message_in(self, id: str, conv: Conversation, user: str, cid: str) -> StoredMessage:
        """The stored message ``id`` of ``conv`` that ``user`` may read (not
        deleted, not from before they joined), or NotFound."""
        found = await self.store.get_messages([id])
        if (
            not found
            or found[0].conversation != conv.id
            or found[0].deleted
            or found[0].seq < conv.visible_from(user)
        ):
            raise NotFound("no such message in this conversation", cid=cid)
        return found[0]

    async def act(self, conn: Connection, frame: frames.EventFrame) -> None:
        """A react, edit or delete: store the event, answer ``applied`` on
        ``conn``, then route it (owed) to the other members and (not owed)
        to the actor's other devices; a deletion settles the queue entries
        it made stale. Refusals are answered with the ``cid``, like a send."""
        if conn.user is None:
            raise Internal("an event on a connection that is not authenticated")
        user = conn.user
        found = await self.store.get_messages([frame.id])
        try:
            if not found:
                raise NotFound("no such message")
            conv = await self.member_conversation(user, found[0].conversation)
        except Forbidden:
            # Someone else's message: as if it did not exist.
            raise NotFound("no such message", cid=frame.cid) from None
        except NotFound as exc:
            raise exc.with_cid(frame.cid) from None
        ts = self.clock.now_ms()
        eid = self.ids.new()
        to = recipients(conv.members, user)
        match frame:
            case frames.React():
                ev = NewEvent(
                    eid,
                    conv.id,
                    EventKind.REACTION,
                    frame.id,
                    user,
                    frame.cid,
                    ts,
                    to,
                    emoji=frame.emoji,
                    on=frame.on,
                )
            case frames.Edit():
                conv = await self._edit_mode(conv, frame)
                text = await self._content(
                    conn, conv, frame.body, frame.e2e, frame.cid, may_switch=False
                )
                ev = NewEvent(
                    eid,
                    conv.id,
                    EventKind.EDITED,
                    frame.id,
                    user,
                    frame.cid,
                    ts,
                    to,
                    body=self.keyring.seal(text, frame.id, conv.id),
                    window_ms=self.edit_window_ms,
                    e2e=frame.e2e is not None,
                )
            case frames.Delete():
                # A group's admins may delete others' messages: the store
                # decides that against the group as it is then.
                ev = NewEvent(eid, conv.id, EventKind.DELETED, frame.id, user, frame.cid, ts, to)
        cid = frame.cid

        def stored(result: list[WriteResult] | ChatError) -> None:
            done = _one_result(result, conn, cid, EventResult)
            if done is None:
                return
            if done.refused == E2E_REQUIRED:
                # Switched on another replica since this one cached it.
                self._now_e2e(conv)
            self.publish_event(done, to, cid=cid, conn=conn)

        await self._write([ev], conn, stored)

    async def _edit_mode(self, conv: Conversation, frame: frames.Edit) -> Conversation:
        """``conv`` with the mode an edit is checked against. The service's
        copy answers, bar one case: an end-to-end edit in a one-to-one
        conversation its cache holds as plain, which another replica may
        have switched since; the store says (and an end-to-end answer is
        learned, :meth:`_now_e2e`). A group was read just now. A plain edit
        needs no read: a stale plain copy lets it reach the store, which
        refuses it in an end-to-end conversation."""
        if frame.e2e is None or conv.e2e or conv.id not in self._conversations:
            return conv
        fresh = await self.store.get_conversation(conv.id)
        return self._now_e2e(conv) if fresh is not None and fresh.e2e else conv

    async def _content(
        self,
        conn: Connection,
        conv: Conversation,
        body: str | None,
        e2e: dict[str, Any] | None,
        cid: str,
        *,
        may_switch: bool,
    ) -> str:
        """The text a send or an edit stores: its ``e2e`` object, checked
        (only a send may switch a plain conversation: an edit gets
        ``e2e_off``), or its plain body, refused in an end-to-end
        conversation (``e2e_required``)."""
        if e2e is not None:
            if not may_switch and not conv.e2e:
                raise e2e_off(cid)
            await self._check_e2e(conn, conv, e2e, cid)
            return stored_text(e2e=e2e)
        if conv.e2e:
            raise e2e_required(cid)
        return stored_text(body=body)

    def publish_event(
        self,
        done: EventResult,
        to: Sequence[str],
        *,
        cid: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """After an event's write: answer the actor's connection (if any),
        route the event (to whom the store said, else ``to``), settle what a
        deletion made stale."""
        if done.refused is not None or done.event is None:
            error = refusal(done.refused, done.reason or "refused", cid)
            if conn is not None:
                conn.reply(error_frame(error))
            return
        e = done.event
        if conn is not None and cid is not None:
            conn.reply(
                Outbound(
                    frames.encode(
                        frames.applied(
                            cid, e.kind.value, e.id, e.conversation, e.message_id, e.eseq, e.ts
                        )
                    )
                )
            )
        if done.duplicate:
            return
        self.metrics.events[e.kind.value].inc()
        if e.kind is EventKind.DELETED:
            log.info(
                "message deleted for everyone",
                extra={"id": e.message_id, "conversation": e.conversation, "by": e.by},
            )
        owed_to = to if done.recipients is None else done.recipients
        self._route_owed(queue_items.event_item(e), owed_to, e.by, conn.id if conn else None)
        for user, keys in queue_items.by_user(done.dropped).items():
            self.broker.settle_nowait(user, keys)

    async def ack(self, conn: Connection, frame: frames.Ack) -> None:
        """Apply an ``ack`` (marks and receipt acks: one write). Message ids
        the user may not ack are answered with ``not_found``, after the
        write."""
        if conn.user is None:
            raise Internal("ack on a connection that is not authenticated")
        user = conn.user
        keys = frame.keys or tuple(parse_rid(r) for r in frame.receipts)
        settle = [r for k in keys for r in settled_rids(k)] + list(frame.events)
        acks: list[WriteRequest] = [(user, k) for k in keys]
        acks += [EventAck(user, e) for e in frame.events]
        await self._mark_many(conn, frame.ids, Status.DELIVERED, acks, settle)

    async def seen(self, conn: Connection, frame: frames.Seen) -> None:
        if conn.user is None:
            raise Internal("seen on a connection that is not authenticated")
        await self._mark_many(conn, frame.ids, Status.SEEN, [], [])

    async def _mark_many(
        self,
        conn: Connection,
        ids: Sequence[str],
        status: Status,
        receipt_acks: list[WriteRequest],
        settle: list[str],
    ) -> None:
        """Apply marks (and receipt acks, in the same write); then route the
        receipts they made, settle the user's queue entries of what became
        delivered just now (only those can still sit there: an entry left by
        a failed settle is dropped by the next backlog) and of ``settle``,
        and refuse the ids the user may not mark."""
        user = conn.user
        if user is None:
            raise Internal("marks on a connection that is not authenticated")
        if not ids and not receipt_acks:
            return
        now = self.clock.now_ms()
        requests: list[WriteRequest] = [Mark(user, i, status, now) for i in ids]
        requests += receipt_acks

        def written(result: list[WriteResult] | ChatError) -> None:
            conn.release()
            if isinstance(result, ChatError):
                conn.reply(error_frame(result))
                return
            results = [r for r in result if isinstance(r, MarkResult)]
            unknown = [i for i, r in zip(ids, results, strict=True) if not r.known]
            delivered: list[str] = []
            routed: list[Routed] = []
            for r in results:
                if r.transitions:
                    self.metrics.transitions(r.transitions)
                for t in r.transitions:
                    if t.status is Status.DELIVERED:
                        delivered.append(t.message_id)
                    key, payload, env = queue_items.receipt_item(t)
                    routed.append(Routed(t.sender, key, payload, True, None, env))
            if routed:
                self.broker.route_nowait(routed)
            if delivered or settle:
                self.broker.settle_nowait(user, delivered + settle)  # one call for the frame
            if unknown:
                error = NotFound("no such message for you")
                conn.reply(
                    Outbound(frames.encode(frames.error(error.code, error.message, ids=unknown)))
                )

        await self._write(requests, conn, written)

    async def typing(self, conn: Connection, frame: frames.Typing) -> None:
        if conn.user is None:
            raise Internal("typing on a connection that is not authenticated")
        conv = await self.member_conversation(conn.user, frame.conversation)
        env = TypingEnvelope(conv.id, conn.user)
        payload = encode(env)
        others = recipients(conv.members, conn.user)
        if others:
            await self._route([Routed(m, "typing", payload, False, None, env) for m in others])
