"""UserRates: an account's send rate, leased from the broker's shared bucket."""

from __future__ import annotations

import pytest

from chatd.broker.memory import MemoryBroker
from chatd.core.errors import RateLimited
from chatd.rates import LEASE_LIFE, UserRates


class CountingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.takes = 0

    async def take(self, bucket, want, rate, burst):
        self.takes += 1
        return await super().take(bucket, want, rate, burst)


async def test_a_lease_serves_several_messages_then_the_bucket_says_no():
    broker = CountingBroker()
    rates = UserRates(broker, rate=0.001, burst=12, lease=5)
    for _ in range(12):
        await rates.admit("alice")
    assert broker.takes == 3  # 12 messages, leases of 5, 5 and 2
    with pytest.raises(RateLimited, match="this account"):
        await rates.admit("alice")
    await rates.admit("bob")  # another account, another bucket


def test_a_lease_not_spent_soon_is_dropped():
    rates = UserRates(MemoryBroker(), rate=10, burst=40, lease=10)
    rates._held["alice"] = (5, 100.0)
    assert rates.take_local("alice", 100.0 + LEASE_LIFE / 2)
    assert not rates.take_local("alice", 100.0 + LEASE_LIFE * 2)
    assert "alice" not in rates._held


async def test_no_limit_needs_no_broker():
    broker = CountingBroker()
    rates = UserRates(broker, rate=0, burst=1)
    for _ in range(100):
        await rates.admit("alice")
    assert broker.takes == 0
