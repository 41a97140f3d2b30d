"""The chat service: one place where a request meets the rules and the ports.

Both adapters (HTTP in :mod:`chatd.net.http`, WebSocket in :mod:`chatd.net.ws`)
call into :class:`ChatService`; it applies the core rules, talks to the
store and the broker, and never touches a socket. Follow one message:
:meth:`ChatService.send` → store (group-committed) → ``sent`` to the
sender → :meth:`Broker.route` → :meth:`Hub.dispatch` on every node holding
a recipient → the recipient's connection.

:class:`ChatService` is one facade over rooms of its own (each a mixin on
the shared :class:`~chatd.service.base.ServiceBase`):

=========================  ==================================================
``base.py``                the constructor and state; the group commit
                           (``_write``, ``flush``, ``after_writes``) and
                           ``_route``
``accounts.py``            register, login, refresh, authenticate, logout,
                           kick, the attempt limits, the sockets cap
``conversations.py``       conversations, open_dm, create_group,
                           change_group, history, user_info
``e2e.py``                 devices, epochs, shares, the checks of ``e2e``
``messages.py``            send, act, publish_event, ack, seen, typing
``connections.py``         attach, detach, presence, backlog, resync, the
                           users of dead nodes
this file                  run, stop, metrics and readiness
=========================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import trio

from chatd.core.errors import ChatError, Forbidden, NotFound
from chatd.service.accounts import AccountsMixin
from chatd.service.base import Done, EventAck, WriteRequest, WriteResult
from chatd.service.connections import ConnectionsMixin
from chatd.service.conversations import HISTORY_DEFAULT, HISTORY_MAX
from chatd.service.messages import MessagesMixin

__all__ = [
    "HISTORY_DEFAULT",
    "HISTORY_MAX",
    "ChatService",
    "Done",
    "EventAck",
    "Forbidden",
    "NotFound",
    "Readiness",
    "WriteRequest",
    "WriteResult",
]


@dataclass(frozen=True)
class Readiness:
    ok: bool
    checks: dict[str, str]


class ChatService(AccountsMixin, MessagesMixin, ConnectionsMixin):
    """The application: every public method the adapters and ``chatctl``
    call. Built with ``ChatService(store=..., broker=..., ...)`` (the
    parameters: :class:`~chatd.service.base.ServiceBase`)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writers and the broker's delivery until :meth:`stop`.

        On stop, the writers finish what is queued before returning, so every
        ``send`` in flight is stored.
        """
        try:
            async with trio.open_nursery() as outer:
                await outer.start(
                    partial(self.broker.run, gone=self.gone),
                    self.node,
                    self.hub.dispatch,
                    self.resync,
                )
                outer.start_soon(self._resync_loop)
                outer.start_soon(self._departures_loop)
                async with trio.open_nursery() as writers:
                    await writers.start(self._writes.run)
                    task_status.started()
                    await self._stop.wait()
                    self._writes.close()
                outer.cancel_scope.cancel()
        finally:
            self.stopped.set()

    def stop(self) -> None:
        self._stop.set()

    async def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition of this node (owed queues sampled first)."""
        await self.metrics.sample_queues(self.broker.queues)
        return self.metrics.render()

    async def readiness(self) -> Readiness:
        checks: dict[str, str] = {}
        for name, port in (("store", self.store), ("broker", self.broker)):
            try:
                with trio.fail_after(2):
                    await port.ping()
                checks[name] = "ok"
            except (ChatError, trio.TooSlowError) as exc:
                checks[name] = f"unavailable: {getattr(exc, 'message', 'timeout')}"
        return Readiness(all(v == "ok" for v in checks.values()), checks)
