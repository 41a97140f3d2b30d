import pytest

from chatd.broker.memory import MemoryBroker
from chatd.testing.broker_contract import BrokerContract


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    async def brokers(self):
        shared = MemoryBroker()
        yield lambda: shared


async def test_queue_is_bounded_dropping_the_oldest():
    from chatd.ports import Routed

    b = MemoryBroker(queue_limit=3)
    await b.route([Routed("bob", f"m{i}", "p", queued=True) for i in range(5)])
    assert [o.key for o in await b.queued("bob")] == ["m2", "m3", "m4"]
