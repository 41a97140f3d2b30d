"""One connection's rules, without the socket.

A :class:`Session` knows what phase a connection is in, which frames it may
send there, how fast, and what it has already been offered. The WebSocket
adapter feeds it frames and outgoing items and does what it says.

Phases and the events that move between them, as a table::

    AUTH    --authenticated-->  BACKLOG  --backlog_done-->  LIVE
    (any)   --closed-------->   CLOSED

While in BACKLOG, live items are held back and released after the backlog,
so that a reconnecting device sees each conversation in seq order; an item
offered twice (live and in the backlog) goes out once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from chatd.core.errors import BadRequest, RateLimited, Unauthorized
from chatd.core.frames import Auth, ClientFrame, Delete, Edit, React, Send, Typing
from chatd.core.ratelimit import TokenBucket


class Phase(StrEnum):
    AUTH = "auth"
    BACKLOG = "backlog"
    LIVE = "live"
    CLOSED = "closed"


TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.AUTH, "authenticated"): Phase.BACKLOG,
    (Phase.BACKLOG, "backlog_done"): Phase.LIVE,
    (Phase.AUTH, "closed"): Phase.CLOSED,
    (Phase.BACKLOG, "closed"): Phase.CLOSED,
    (Phase.LIVE, "closed"): Phase.CLOSED,
    (Phase.CLOSED, "closed"): Phase.CLOSED,
}

#: Frames that cost a token: the ones that fan out to other people.
METERED = (Send, Typing, React, Edit, Delete)


class SlowConsumer(Exception):
    """More live items piled up than a connection may hold; close it.

    Nothing is lost: what was owed stays owed and comes with the next ``ready``.
    """


@dataclass(frozen=True, slots=True)
class Outbound:
    """One frame for a device: ``data`` is its JSON text, UTF-8 encoded (made
    once, whatever the number of devices). ``key`` is set when it is owed
    (and must be acked)."""

    data: bytes
    key: str | None = None
    order: tuple = ()


@dataclass
class Session:
    rate: float = 30.0
    burst: float = 60.0
    max_held: int = 10_000
    now: float = 0.0
    phase: Phase = Phase.AUTH
    user: str | None = None
    _bucket: TokenBucket = field(init=False)
    _offered: set[str] = field(default_factory=set)
    _held: list[Outbound] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._bucket = TokenBucket(self.rate, self.burst, self.now)

    # -- phase -------------------------------------------------------------------

    def _move(self, event: str) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise RuntimeError(f"no transition from {self.phase.value} on {event}") from None

    def authenticated(self, user: str) -> None:
        self._move("authenticated")
        self.user = user

    def closed(self) -> None:
        self._move("closed")
        self._held.clear()

    # -- frames ------------------------------------------------------------------

    def check(self, frame: ClientFrame, now: float) -> None:
        """May this frame be handled now? Raises the error to answer with."""
        if self.phase is Phase.AUTH:
            if not isinstance(frame, Auth):
                raise Unauthorized("authenticate first: the first frame must be 'auth'")
            return
        if isinstance(frame, Auth):
            raise BadRequest("already authenticated")
        if isinstance(frame, METERED) and not self._bucket.take(now):
            cid = None if isinstance(frame, Typing) else frame.cid
            raise RateLimited("too many frames; slow down", cid=cid)

    # -- outgoing ----------------------------------------------------------------

    def _fresh(self, item: Outbound) -> bool:
        if item.key is None:
            return True
        if item.key in self._offered:
            return False
        self._offered.add(item.key)
        return True

    def offer(self, item: Outbound) -> list[Outbound]:
        """A live item arrived: what to send now (nothing while the backlog runs)."""
        if self.phase is Phase.BACKLOG:
            if len(self._held) >= self.max_held:
                raise SlowConsumer("too many live frames held during the backlog")
            self._held.append(item)
            return []
        if self.phase is Phase.LIVE:
            return [item] if self._fresh(item) else []
        return []

    def backlog(self, items: list[Outbound]) -> list[Outbound]:
        """Order what is owed (messages by conversation and seq, then receipts)."""
        if self.phase is not Phase.BACKLOG:
            raise RuntimeError("backlog outside the backlog phase")
        return [item for item in sorted(items, key=lambda i: i.order) if self._fresh(item)]

    def finish_backlog(self) -> list[Outbound]:
        """Leave the backlog; returns the live items held meanwhile, minus repeats."""
        self._move("backlog_done")
        held, self._held = self._held, []
        return [item for item in held if self._fresh(item)]

    def settled(self, keys: list[str]) -> None:
        """The device acked these: forget them (a later offer is a new delivery)."""
        for key in keys:
            self._offered.discard(key)
