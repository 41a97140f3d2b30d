"""The Broker outage contract (chatd.testing.broker_outage) on every broker
whose backend can go away: the Redis broker on a throwaway ``redis-server``
(a free loopback port, never the machine's Redis), with every kind of real
failure :mod:`chatd.testing.broker_faults` knows (killed, hung,
partitioned, refused). The memory broker has no backend to lose: it is
listed in WITHOUT_BACKEND, and the last test checks that every broker
implementation is run here or listed there."""

import importlib
import pkgutil

import pytest
import trio

import chatd.broker
from chatd.broker.redis import RedisBroker
from chatd.testing.broker_faults import SERVER_FAILURES, server_outage
from chatd.testing.broker_outage import (
    WITHOUT_BACKEND,
    BrokerOutageContract,
    Down,
    port_methods,
)
from harness.redis_server import RedisServer

#: Short timings, so that giving up on a silent server takes a quarter second.
TUNING = {
    "op_timeout": 0.25,
    "connect_timeout": 0.1,
    "backoff_min": 0.02,
    "backoff_max": 0.1,
    "presence_ttl": 1.0,
    "heartbeat_interval": 0.1,
}
#: The broker's promise (docs/redis.md, Outages): Unavailable at once when
#: refused, within connect_timeout when not accepted, within op_timeout when
#: accepted and not answered; plus slack. The contract does not count the
#: time the machine kept the test from running, as far as it can see it;
#: on two CPUs shared with other test runs, 0.25 s of slack still failed a
#: case in a few hundred, 0.5 s none.
WITHIN = max(TUNING["op_timeout"], TUNING["connect_timeout"]) + 0.5
#: A running node's keepalive asks every heartbeat_interval and gives up
#: after op_timeout: an outage this long has been noticed.
NOTICED = TUNING["heartbeat_interval"] + TUNING["op_timeout"] + 0.25


class TestRedisBrokerOutage(BrokerOutageContract):
    @pytest.fixture(params=sorted(SERVER_FAILURES))
    async def down(self, request):
        with RedisServer() as server:
            async with (
                server_outage(request.param, server, server.host, server.port) as outage,
                trio.open_nursery() as nursery,
            ):
                url = f"redis://{outage.host}:{outage.port}"
                made: list[RedisBroker] = []

                async def make() -> RedisBroker:
                    broker = RedisBroker.from_url(url, nursery=nursery, **TUNING)
                    made.append(broker)
                    return broker

                yield Down(make, outage, within=WITHIN, recover_within=3.0, noticed_within=NOTICED)
                outage.end()
                for broker in made:
                    await broker.aclose()
                nursery.cancel_scope.cancel()


#: The implementations run above.
RUN_HERE = {f"{RedisBroker.__module__}.{RedisBroker.__qualname__}"}


def test_every_broker_runs_the_outage_contract_or_has_no_backend():
    """A class in chatd.broker with every method of the port is a broker: it
    is run here, or listed (with why) as having no backend to lose."""
    methods = port_methods()
    found = set()
    for info in pkgutil.iter_modules(chatd.broker.__path__):
        module = importlib.import_module(f"chatd.broker.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and value.__module__ == module.__name__
                and methods <= set(dir(value))
            ):
                found.add(f"{value.__module__}.{value.__qualname__}")
    # The control: the search finds the two brokers there are.
    assert {"chatd.broker.memory.MemoryBroker", "chatd.broker.redis.RedisBroker"} <= found
    assert not RUN_HERE & set(WITHOUT_BACKEND)
    assert found == RUN_HERE | set(WITHOUT_BACKEND)
