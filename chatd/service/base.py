"""What every room of the service shares: its state and its two ways out.

:class:`ServiceBase` holds the constructor (the ports, the settings, the
one-to-one conversation cache, the presence and resync bookkeeping) and the
two paths every room writes through: the group commit (:meth:`_write`, one
:class:`~chatd.batching.Batcher` whose batches :meth:`_write_batch` turns
into one ``Store.write``) and routing through the broker (:meth:`_route`).
The rooms (``accounts``, ``conversations``, ``e2e``, ``messages``,
``connections``) build on it; :class:`chatd.service.ChatService` joins them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from chatd import crypto
from chatd.auth import Passwords, Tokens
from chatd.batching import Batcher
from chatd.core import e2e as e2e_rules
from chatd.core import frames
from chatd.core.errors import BadRequest, ChatError, Forbidden, NotFound, Unavailable
from chatd.core.ids import UlidFactory
from chatd.core.model import (
    Appended,
    Conversation,
    EventResult,
    Mark,
    MarkResult,
    NewEvent,
    NewMessage,
    ReceiptKey,
)
from chatd.core.session import Outbound
from chatd.hashing import Hasher
from chatd.hub import Connection, Hub
from chatd.metrics import Metrics
from chatd.ports import Broker, Clock, Routed, Store, SystemClock, Writes
from chatd.rates import UserRates

log = logging.getLogger("chatd.service")


@dataclass(frozen=True, slots=True)
class EventAck:
    """``user``'s device got the event ``event_id``."""

    user: str
    event_id: str


#: What goes through the one group commit: a send, an event, a mark, a
#: (sender, receipt) ack, an event ack.
WriteRequest = NewMessage | NewEvent | Mark | tuple[str, ReceiptKey] | EventAck
WriteResult = Appended | EventResult | MarkResult | None


#: A write's callback: its results, or the error that failed its batch.
Done = Callable[[list[WriteResult] | ChatError], None]


#: A store's refusal code → the error a client gets.
REFUSALS: dict[str, type[ChatError]] = {
    "not_found": NotFound,
    "forbidden": Forbidden,
    "bad_request": BadRequest,
}


def refusal(code: str | None, message: str, cid: str | None = None) -> ChatError:
    """The error a store's refusal ``code`` answers: an end-to-end reason
    (``e2e_required``, ``e2e_off``) is a ``bad_request`` carrying it, any
    other code its error (NotFound when unknown)."""
    if code in e2e_rules.REFUSED:
        return BadRequest(e2e_rules.REFUSED[code], cid=cid, reason=code)
    return REFUSALS.get(code or "", NotFound)(message, cid=cid)


def error_frame(exc: ChatError) -> Outbound:
    """The ``error`` frame that answers ``exc``."""
    return Outbound(frames.encode(frames.error(exc.code, exc.message, exc.cid, **exc.extra)))


class ServiceBase:
    """The service's state and shared paths; see :class:`chatd.service.ChatService`."""

    def __init__(
        self,
        *,
        store: Store,
        broker: Broker,
        keyring: crypto.Keys,
        tokens: Tokens,
        passwords: Passwords,
        node: str,
        clock: Clock | None = None,
        cpu_threads: int = 2,
        metrics: Metrics | None = None,
        commit_window: float = 0.0,
        resync_concurrency: int = 8,
        resync_jitter: float = 0.0,
        rate: float = 0.0,
        burst: float = 1.0,
        login_limits: tuple[float, float, float] = (0.0, 0.0, 0.0),
        max_sockets_per_user: int = 0,
        refresh_ttl: int = 30 * 86_400,
        edit_window: int = 48 * 3600,
    ) -> None:
        self.store = store
        self.broker = broker
        self.keyring = keyring
        self.tokens = tokens
        self.passwords = passwords
        self.node = node
        self.clock = clock or SystemClock()
        self.hub = Hub(keyring)
        self.ids = UlidFactory(clock_ms=self.clock.now_ms)
        self.metrics = metrics or Metrics(node)
        self.metrics.watch(self.hub.count, lambda: self.keyring.active)
        # argon2 is CPU-bound: a small limiter keeps logins from starving the
        # worker threads the store needs.
        self.hasher = Hasher(threads=cpu_threads)
        # The members of a one-to-one conversation never change, so it is
        # safe to cache; this saves a store round trip on every send and
        # typing there. Groups are read each time (see _conversation).
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._conversation_cache = 10_000
        # Every write goes through one group commit: the sends, acks and seen
        # reports of a scheduler pass share one store transaction.
        self._writes: Batcher[WriteRequest, WriteResult] = Batcher(
            "write", self._write_batch, window=commit_window
        )
        self.metrics.count(
            "chatd_store_writes",
            "Store writes (one commit each) made by the group commit.",
            lambda: self._writes.batches,
        )
        self.metrics.count(
            "chatd_store_write_requests",
            "Sends, marks and receipt acks written; divided by chatd_store_writes_total:"
            " requests per commit.",
            lambda: self._writes.items,
        )
        #: Sends per account, across its devices and every replica.
        self.rates = UserRates(broker, rate, burst)
        #: Per minute: logins per address, logins per username, registrations per address.
        self.login_limits = login_limits
        self.max_sockets_per_user = max_sockets_per_user
        self.refresh_ttl = refresh_ttl
        self.edit_window_ms = edit_window * 1000
        self._stop = trio.Event()
        self._resync_wanted = trio.Event()
        #: Users to resync (None: every local user).
        self._resync_users: set[str] | None = set()
        self.resync_concurrency = max(1, resync_concurrency)
        self.resync_jitter = max(0.0, resync_jitter)
        #: Users of dead nodes to announce offline (see gone).
        self._departures: list[tuple[str, int]] = []
        self._departed = trio.Event()
        self.stopped = trio.Event()

    async def _write_batch(self, requests: list[WriteRequest]) -> list[WriteResult]:
        """One Store.write for a batch of mixed requests; results in request order."""
        appends = [r for r in requests if isinstance(r, NewMessage)]
        marks = [r for r in requests if isinstance(r, Mark)]
        acks = [r for r in requests if isinstance(r, tuple)]
        events = [r for r in requests if isinstance(r, NewEvent)]
        event_acks = [(r.user, r.event_id) for r in requests if isinstance(r, EventAck)]
        done = await self.store.write(Writes(appends, marks, acks, events, event_acks))
        appended, marked, evented = iter(done.appended), iter(done.marked), iter(done.events)
        out: list[WriteResult] = []
        for r in requests:
            if isinstance(r, NewMessage):
                out.append(next(appended))
            elif isinstance(r, Mark):
                out.append(next(marked))
            elif isinstance(r, NewEvent):
                out.append(next(evented))
            else:
                out.append(None)
        return out

    async def _write(self, requests: list[WriteRequest], conn: Connection, done: Done) -> None:
        """Queue ``requests`` for the group commit; ``done`` gets the results.
        Waits only while the commit queue is full (back pressure)."""
        if self._writes.full:
            await self._writes.wait_for_room()
        conn.hold()
        try:
            self._writes.submit_nowait(requests, done)
        except ChatError:
            conn.release()
            raise

    async def flush(self) -> None:
        """Wait until every write queued so far is done (their callbacks ran)."""
        await self._writes.flush()

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every write queued so far is done (its
        callbacks ran): a connection's later answers keep their frames' order."""
        self._writes.call_after(callback)

    async def _route(self, items: list[Routed]) -> None:
        try:
            await self.broker.route(items)
        except Unavailable as exc:
            # Already stored: the store keeps it owed and the next ``ready``
            # offers it. Live delivery waits for the broker to come back.
            log.warning("broker unavailable; delivery deferred", extra={"reason": exc.message})
