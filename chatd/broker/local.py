"""What one broker instance holds in memory about its own nodes.

Owns the process-local side of the Redis broker, shared by the presence,
queue and delivery modules: the nodes :meth:`RedisBroker.run` serves here
(their ``deliver`` and ``resync``), their live-delivery subscriptions, and
every connection attached through this instance.

Guarantees: nothing here is read from or written to Redis; it is what the
broker writes back when Redis lost it (re-assert), and what lets ``route``
hand items to this node's connections without a round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatd.ports import Deliver, Resync

if TYPE_CHECKING:
    from chatd.broker.delivery import Subscriptions


class Local:
    def __init__(self) -> None:
        #: incarnation -> (deliver, resync) of the nodes run() serves here.
        self.nodes: dict[str, tuple[Deliver, Resync]] = {}
        #: incarnation -> when its run() started (ms since the epoch).
        self.started: dict[str, int] = {}
        #: incarnation -> its live-delivery subscriptions (while run() is live).
        self.subs: dict[str, Subscriptions] = {}
        #: user -> {conn: incarnation}: the connections attached through here.
        self.by_user: dict[str, dict[str, str]] = {}
        #: (user, conn) -> incarnation, for every connection attached through here.
        self.conns: dict[tuple[str, str], str] = {}
        #: " inc1 inc2 ": the incarnations route() delivers to itself.
        self.skip = " "

    def serve(self, inc: str, deliver: Deliver, resync: Resync, started: int) -> None:
        """run() serves ``inc`` here from now on."""
        self.started[inc] = started
        self.nodes[inc] = (deliver, resync)
        self.skip = " " + " ".join(self.nodes) + " "

    def leave(self, inc: str) -> None:
        """run() of ``inc`` ended."""
        self.started.pop(inc, None)
        del self.nodes[inc]
        self.skip = " " + " ".join(self.nodes) + " "

    def users_of(self, inc: str) -> list[str]:
        """The users with a connection through ``inc``."""
        return [u for u, conns in self.by_user.items() if inc in conns.values()]

    def resync_all(self) -> None:
        for _deliver, resync in list(self.nodes.values()):
            resync()
