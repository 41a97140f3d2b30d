"""Connections: attach and detach (presence), the backlog, resync, dead nodes' users.

A device that connects gets everything owed to it from the store, page by
page (:data:`BACKLOG_PAGE`), with the broker's queue as the fast path; when
the broker lost live delivery for a while, the owed items are offered again
(paced). A user of a dead node is announced offline here.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import trio

from chatd import queue_items
from chatd.core.envelope import (
    EventEnvelope,
    MessageEnvelope,
    PresenceEnvelope,
    ReceiptEnvelope,
    encode,
)
from chatd.core.errors import ChatError, Internal, Unavailable
from chatd.core.session import Outbound
from chatd.hub import Connection, render, render_payload
from chatd.ports import Routed
from chatd.service.base import ServiceBase, log

#: The backlog is read from the store in pages of this many items, so a
#: device that was away for long gets everything without one huge read.
BACKLOG_PAGE = 500


class ConnectionsMixin(ServiceBase):
    """Connections here and in presence; what is owed to them, and resync."""

    async def attach(self, conn: Connection) -> None:
        """Register a connection here and in presence; announce a first device."""
        if conn.user is None:
            raise Internal("attach of a connection that is not authenticated")
        self.hub.add(conn)
        try:
            first = await self.broker.attach(conn.user, self.node, conn.id)
        except Unavailable as exc:
            # The device still gets live traffic routed to this node by
            # whoever can reach it; the broker re-asserts presence once back.
            log.warning("broker unavailable; presence deferred", extra={"reason": exc.message})
            return
        if first:
            await self._announce(conn.user, online=True, last_seen=None)

    async def detach(self, conn: Connection) -> None:
        if conn.user is None:
            return
        self.hub.remove(conn)
        now = self.clock.now_ms()
        try:
            last = await self.broker.detach(conn.user, self.node, conn.id, now)
        except Unavailable as exc:
            log.warning("broker unavailable; presence deferred", extra={"reason": exc.message})
            return
        if last:
            await self.store.set_last_seen(conn.user, now)
            await self._announce(conn.user, online=False, last_seen=now)

    async def _announce(self, user: str, online: bool, last_seen: int | None) -> None:
        peers = await self.store.dm_peers(user)
        if peers:
            env = PresenceEnvelope(user, online, last_seen)
            payload = encode(env)
            await self._route([Routed(p, "presence", payload, False, None, env) for p in peers])

    async def backlog(self, user: str, emit: Callable[[list[Outbound]], Awaitable[None]]) -> None:
        """Offer everything owed to ``user``, page by page, through ``emit``.

        The store is the authority: its pages (messages by conversation and
        seq, then receipts) are what is owed. The broker's queue is the fast
        path: entries the store no longer lists as owed are stale and are
        settled here; if the store cannot be read, the queue's entries are
        offered and Unavailable is raised so the device hears the backlog may
        be incomplete.
        """
        try:
            queued = {o.key: o.payload for o in await self.broker.queued(user)}
        except Unavailable as exc:
            log.warning("broker unavailable; backlog from the store", extra={"reason": exc.message})
            queued = {}
        try:
            await self._stored_backlog(user, emit, queued)
        except Unavailable:
            items = [
                out
                for p in queued.values()
                if (out := render_payload(p, self.keyring, needs_ack=True)) is not None
            ]
            if items:
                await emit(items)
            raise
        if queued:
            await self._settle(user, list(queued))

    async def _stored_backlog(
        self,
        user: str,
        emit: Callable[[list[Outbound]], Awaitable[None]],
        queued: dict[str, str],
    ) -> None:
        pages = self.store, user, BACKLOG_PAGE
        await self._offer_pages(queue_items.message_pages(*pages), MessageEnvelope, emit, queued)
        await self._offer_pages(queue_items.event_pages(*pages), EventEnvelope, emit, queued)
        await self._offer_pages(queue_items.receipt_pages(*pages), ReceiptEnvelope, emit, queued)

    async def _offer_pages(
        self,
        pages: AsyncIterator[Sequence[Any]],
        wrap: Callable[[Any], MessageEnvelope | EventEnvelope | ReceiptEnvelope],
        emit: Callable[[list[Outbound]], Awaitable[None]],
        queued: dict[str, str],
    ) -> None:
        """Render each page of owed items and emit it; what the store lists
        is not stale in the queue (even an item that cannot be opened now:
        it stays owed and queued)."""
        async for page in pages:
            items = []
            for item in page:
                env = wrap(item)
                queued.pop(queue_items.queue_key(env), None)
                out = render(env, self.keyring, needs_ack=True)
                if out is not None:
                    items.append(out)
            if items:
                await emit(items)

    async def _settle(self, user: str, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self.broker.settle(user, keys)
        except Unavailable as exc:
            # The store already records the ack; a stale queue entry is only
            # offered again and acked again.
            log.warning("broker unavailable; queue settle skipped", extra={"reason": exc.message})

    def resync(self, users: Iterable[str] | None = None) -> None:
        """The broker lost live delivery for a while (for ``users``, or for
        every local user): re-offer what is owed."""
        if users is None:
            self._resync_users = None
        elif self._resync_users is not None:
            self._resync_users.update(users)
        self._resync_wanted.set()

    async def _resync_loop(self) -> None:
        """Re-offer owed items, paced: after a random delay of up to
        ``resync_jitter`` seconds (nodes that lost Redis together do not all
        read the store at once), ``resync_concurrency`` users at a time."""
        while True:
            await self._resync_wanted.wait()
            if self.resync_jitter:
                await trio.sleep(random.uniform(0, self.resync_jitter))
            self._resync_wanted = trio.Event()
            wanted, self._resync_users = self._resync_users, set()
            users = self.hub.users() if wanted is None else sorted(wanted)
            log.info("resync: offering owed items again", extra={"users": len(users)})
            failed = await self.reoffer(users)
            self.metrics.resyncs.inc(len(users))
            if failed:
                await trio.sleep(1)
                self.resync(failed)

    async def reoffer(self, users: Sequence[str]) -> list[str]:
        """Offer what is owed to each of ``users`` to their connections here,
        ``resync_concurrency`` users at a time; the users whose store or queue
        could not be read."""
        failed: list[str] = []
        pending = iter(users)

        async def worker() -> None:
            for user in pending:
                if not self.hub.connections(user):
                    continue

                async def emit(items: list[Outbound], user: str = user) -> None:
                    for conn in self.hub.connections(user):
                        for item in items:
                            conn.offer(item)

                try:
                    await self.backlog(user, emit)
                except ChatError as exc:
                    if not failed:
                        log.warning("resync failed; retrying", extra={"reason": exc.message})
                    failed.append(user)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.resync_concurrency, len(users))):
                nursery.start_soon(worker)
        return failed

    def gone(self, user: str, last_seen: int) -> None:
        """A dead node's user is online nowhere now (the broker says so on
        one surviving node): announce them offline."""
        self._departures.append((user, last_seen))
        self._departed.set()

    async def _departures_loop(self) -> None:
        while True:
            await self._departed.wait()
            self._departed = trio.Event()
            batch, self._departures = self._departures, []
            for user, last_seen in batch:
                try:
                    await self.store.set_last_seen(user, last_seen)
                    await self._announce(user, online=False, last_seen=last_seen)
                except ChatError as exc:
                    log.warning(
                        "could not announce a dead node's user offline",
                        extra={"user": user, "reason": exc.message},
                    )
