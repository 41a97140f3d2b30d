"""Rate limits shared by every replica: buckets kept by the broker
(:meth:`chatd.ports.Broker.take`; Redis when several replicas share one).

:class:`UserRates` limits what one account sends, whatever its number of
devices and replicas. Asking the broker for every message would put a
Redis round trip on the hot path, so a node *leases* a few tokens at a
time for each user who sends and spends them locally; a lease not spent
within a second is dropped (so a user cannot save tokens up on several
replicas). A node that cannot reach the broker lets the message through:
the per-connection limit (:class:`chatd.core.ratelimit.TokenBucket` in the
session) still applies.
"""

from __future__ import annotations

import logging

import trio

from chatd.core.errors import RateLimited, Unavailable
from chatd.ports import Broker

log = logging.getLogger("chatd.rates")

#: Seconds a leased token may wait to be spent.
LEASE_LIFE = 1.0
#: Users with leased tokens kept before the stale ones are swept.
SWEEP_OVER = 10_000


class UserRates:
    def __init__(self, broker: Broker, rate: float, burst: float, lease: int | None = None) -> None:
        self.broker = broker
        self.rate = rate
        self.burst = max(1, int(burst))
        self.lease = lease or max(1, min(10, self.burst // 4))
        #: user -> (tokens leased and not spent, when leased)
        self._held: dict[str, tuple[int, float]] = {}

    def take_local(self, user: str, now: float) -> bool:
        """Spend a leased token, if this node holds a fresh one."""
        if self.rate <= 0:
            return True
        held = self._held.get(user)
        if held is None:
            return False
        tokens, at = held
        if tokens <= 0 or now - at > LEASE_LIFE:
            del self._held[user]
            return False
        if tokens == 1:
            del self._held[user]
        else:
            self._held[user] = (tokens - 1, at)
        return True

    async def admit(self, user: str) -> None:
        """Let one message of ``user`` through, or raise RateLimited."""
        now = trio.current_time()
        if self.take_local(user, now):
            return
        try:
            taken = await self.broker.take(f"u:{user}:send", self.lease, self.rate, self.burst)
        except Unavailable as exc:
            log.warning(
                "rate bucket unavailable; message let through", extra={"reason": exc.message}
            )
            return
        if taken.granted <= 0:
            raise RateLimited(
                f"too many messages from this account; retry in {taken.retry_after:.1f} s"
            )
        if taken.granted > 1:
            if len(self._held) > SWEEP_OVER:
                self._held = {u: h for u, h in self._held.items() if now - h[1] <= LEASE_LIFE}
            self._held[user] = (taken.granted - 1, now)
