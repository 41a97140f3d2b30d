"""The Broker port's outage contract: "unavailable, nothing else escapes".

While its backend is away, every awaited method of a broker raises
:class:`chatd.core.errors.Unavailable` — never the client library's own
error, a socket error, ``ConnectionError``, ``TimeoutError``,
``trio.TooSlowError`` nor anything else — and does so within a bound the
implementation states (:attr:`Down.within`; time the machine kept the test
from running is not counted), alone or with many calls at once, on a broker
in use and on one that meets its backend for the first time in the outage;
once the backend is back, the same call on the same broker goes
through again. Methods whose documented answer to an outage is another are
held to that answer (:data:`OTHER_ANSWERS`): ``route_nowait`` and
``settle_nowait`` never raise (``route_nowait`` reaches this node's own
connections at once, and what it sent is not lost silently: the backend
has it, or the node resyncs once the backend is back — through the port
that resync cannot be told from the one ``run`` makes after a lost
subscription, so this part is weak); ``run`` survives an
outage, resyncs once delivery is live again, and a ``run`` begun during
one starts only once the backend is back; ``aclose`` closes quietly.

Use it by subclassing in a test module and providing a ``down`` fixture
that yields a :class:`Down`: a way to make brokers on one backend, and a
switch that takes that backend away (:mod:`chatd.testing.broker_faults`
has real ones for a server process: killed, hung, partitioned, refused)::

    class TestRedisBrokerOutage(BrokerOutageContract):
        @pytest.fixture(params=sorted(SERVER_FAILURES))
        async def down(self, request):
            with RedisServer() as server:
                async with (
                    server_outage(request.param, server, server.host, server.port) as outage,
                    trio.open_nursery() as nursery,
                ):
                    url = f"redis://{outage.host}:{outage.port}"

                    async def make():
                        return RedisBroker.from_url(url, nursery=nursery, op_timeout=0.25)

                    yield Down(make, outage, within=0.75)
                    nursery.cancel_scope.cancel()

Every method of :class:`chatd.ports.Broker` is in :data:`CALLS` (awaited:
Unavailable), :data:`OTHER_ANSWERS` (another documented answer, with the
test that checks it) or :data:`EXEMPT` (not called in an outage, with why);
``test_every_method_of_the_port_is_covered_or_exempt`` fails for a method
in none of them, so a new one cannot slip through. A broker whose method
lets something else escape lists it in :attr:`Down.escapes` (method ->
reason): that case is then an expected failure, and a failure once it no
longer escapes.

An implementation with no backend that can go away has nothing to take
away and does not run this contract; it is listed in
:data:`WITHOUT_BACKEND` with why, rather than given a faked outage.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import pytest
import trio

from chatd.ports import Broker, QueueEntry, Routed
from chatd.testing.broker_outage_helpers import (
    RunningNode,
    World,
    delivered,
    describe,
    eventually,
    failed,
    owes,
    refused_in_time,
    start,
    switch,
    through,
    timed,
    timed_now,
    world,
)

__all__ = [
    "CALLS",
    "EXEMPT",
    "OTHER_ANSWERS",
    "WITHOUT_BACKEND",
    "BrokerOutageContract",
    "Down",
    "Switch",
    "port_methods",
]


class Switch(Protocol):
    """Takes the backend away and brings it back. Either may block briefly
    (a signal, a process start) or be a coroutine function."""

    def begin(self) -> object: ...

    def end(self) -> object: ...


@dataclass
class Down:
    """Brokers on one backend, and the switch that takes it away."""

    #: A new broker on the backend, ready to use (its tasks run, its
    #: lifetime is the fixture's); every one shares the one backend.
    make: Callable[[], Awaitable[Broker]]
    outage: Switch
    #: Seconds within which every awaited call answers while the backend is
    #: away: the implementation's promise, with a little slack.
    within: float
    #: Seconds within which, once the backend is back, calls go through again.
    recover_within: float = 5.0
    #: Seconds an outage must last for the broker to have noticed it (a
    #: running ``run``, calls sent without waiting).
    noticed_within: float = 1.0
    #: Methods known to let something other than Unavailable escape (or not
    #: to answer in time, or not to recover), with why.
    escapes: Mapping[str, str] = field(default_factory=dict)


Call = Callable[[Broker, World], Awaitable[object]]

#: One call of every awaited method of the port, each with arguments that
#: need the backend (no empty batch, no expired token, no rate of zero: the
#: calls a broker may answer by itself).
CALLS: dict[str, Call] = {
    "route": lambda b, w: b.route([Routed("bob", w.fresh("k"), "p", queued=True)]),
    "queued": lambda b, w: b.queued("bob"),
    "settle": lambda b, w: b.settle("bob", ["m0"]),
    "attach": lambda b, w: b.attach("dave", "n1", w.fresh("c")),
    "detach": lambda b, w: b.detach("bob", "n1", "c1", 7),
    "presence": lambda b, w: b.presence(["bob", "carol"]),
    "devices": lambda b, w: b.devices("bob"),
    "revoke": lambda b, w: b.revoke(w.fresh("t"), w.until),
    "is_revoked": lambda b, w: b.is_revoked("t0"),
    "refresh_begin": lambda b, w: b.refresh_begin(w.fresh("f"), "bob", "d", "j", w.until),
    "refresh_rotate": lambda b, w: b.refresh_rotate("f0", "d0", w.fresh("d"), "j", w.until),
    "refresh_end": lambda b, w: b.refresh_end("f0"),
    "take": lambda b, w: b.take("b0", 1, 1.0, 5),
    "queues": lambda b, w: b.queues(),
    "enqueue": lambda b, w: b.enqueue("carol", [QueueEntry(w.fresh("e"), "q")]),
    "purge": lambda b, w: b.purge("carol"),
    "nodes": lambda b, w: b.nodes(),
    "online_users": lambda b, w: b.online_users(),
    "ping": lambda b, w: b.ping(),
}

#: Methods whose documented answer to an outage is not Unavailable, and
#: the test that holds them to it.
OTHER_ANSWERS: dict[str, str] = {
    "route_nowait": "never raises, reaches this node at once, lost only with a resync "
    "(test_route_nowait_never_raises_and_loses_nothing_silently)",
    "settle_nowait": "never raises; ordered with later calls once back "
    "(test_settle_nowait_never_raises)",
    "run": "survives and resyncs (test_run_survives_an_outage_and_resyncs); begun in an "
    "outage, starts once back (test_run_begun_in_an_outage_starts_once_the_backend_is_back)",
    "aclose": "closes quietly and in time (test_aclose_in_an_outage_is_quiet)",
}

#: Methods not called during an outage, with why.
EXEMPT: dict[str, str] = {
    "__aenter__": "opens the block that owns the broker's tasks; the port promises nothing "
    "about the backend there (a broker connects on first use or in run)",
    "__aexit__": "ends that block: it is aclose, held to its answer in OTHER_ANSWERS",
}

#: Broker implementations that do not run this contract, because they have
#: no backend that can go away; each with why.
WITHOUT_BACKEND: dict[str, str] = {
    "chatd.broker.memory.MemoryBroker": "presence, queues and fan-out live in this "
    "process's memory and die with it: there is no server, socket or client library to "
    "lose, so no outage to make without faking one",
}


def port_methods() -> set[str]:
    """Every method the Broker protocol declares (its own, not the ones
    ``typing.Protocol`` adds)."""
    return {
        name
        for name, value in vars(Broker).items()
        if inspect.isfunction(value) and value.__qualname__ == f"Broker.{name}"
    }


async def _works(down: Down, b: Broker, world: World, *methods: str) -> str | None:
    """None if, the backend back, each of ``methods`` goes through again on
    ``b`` (within :attr:`Down.recover_within`), and a routed item is queued;
    else what went wrong."""
    for method in methods:
        got = await through(partial(CALLS[method], b, world), down.recover_within)
        if failed(got):
            return f"after the outage ended, {method} {describe(got)}"
    key = world.fresh("after")
    got = await through(lambda: b.route([Routed("bob", key, "p", queued=True)]), 1.0)
    if failed(got):
        return f"after the outage ended, route {describe(got)}"
    if not await owes(b, "bob", key):
        return "after the outage ended, a routed item is not queued"
    return None


def _judge(down: Down, method: str, problem: str | None) -> None:
    """Fail on ``problem``, unless ``down.escapes`` lists ``method`` (then an
    expected failure, and a failure if there is no problem any more)."""
    if method in down.escapes:
        if problem is None:
            pytest.fail(f"{method} is listed as escaping but no longer does: unlist it")
        pytest.xfail(f"{down.escapes[method]} [{problem}]")
    assert problem is None, problem


def _limit(down: Down) -> float:
    """When a call that should have answered within the bound is cancelled."""
    return max(2 * down.within, down.within + 1.0)


async def _twice_in_outage(down: Down, call: Callable[[str], None]) -> None:
    """``call(when)`` as the backend goes away and again once the outage is
    met (connections lost), then the backend comes back."""
    await switch(down.outage.begin)
    try:
        call("as the backend went away")
        await trio.sleep(down.noticed_within)
        call("with the backend known to be away")
        await trio.sleep(down.noticed_within)
    finally:
        await switch(down.outage.end)


class BrokerOutageContract:
    @pytest.fixture
    async def down(self) -> Down:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def test_every_method_of_the_port_is_covered_or_exempt(self) -> None:
        methods = port_methods()
        assert {"route", "route_nowait", "run", "ping", "__aenter__"} <= methods  # found at all
        lists = {"CALLS": set(CALLS), "OTHER_ANSWERS": set(OTHER_ANSWERS), "EXEMPT": set(EXEMPT)}
        twice = {
            f"{m} in {a} and {b}"
            for (a, x), (b, y) in itertools.combinations(lists.items(), 2)
            for m in x & y
        }
        assert not twice, twice
        listed = set().union(*lists.values())
        assert not methods - listed, f"port methods in no list: {sorted(methods - listed)}"
        assert not listed - methods, f"listed, not in the port: {sorted(listed - methods)}"

    @pytest.mark.parametrize("method", sorted(CALLS))
    async def test_unavailable_and_nothing_else_while_the_backend_is_away(
        self, down: Down, method: str
    ) -> None:
        """The call raises Unavailable within the bound; once the backend is
        back the same call goes through on the same broker, which works."""
        async with world(down.make) as w:
            await switch(down.outage.begin)
            try:
                got, took = await timed(CALLS[method](w.broker, w), _limit(down))
            finally:
                await switch(down.outage.end)
            problem = refused_in_time(method, got, took, down.within)
            if problem is None:
                problem = await _works(down, w.broker, w, method)
        _judge(down, method, problem)

    async def test_calls_at_once_each_answer_in_time(self, down: Down) -> None:
        """Every awaited method at once, on a broker that met the outage
        already and on a new one that first meets its backend in it: each
        raises Unavailable within the bound (callers do not wait in turn for
        a connection attempt each); once the backend is back both work."""
        problems: list[tuple[str, str]] = []
        async with world(down.make) as w:
            brokers = {"in use": w.broker, "new": await down.make()}
            await switch(down.outage.begin)
            try:
                await timed(w.broker.ping(), _limit(down))  # its connections are lost

                async def one(label: str, b: Broker, method: str) -> None:
                    got, took = await timed(CALLS[method](b, w), _limit(down))
                    problem = refused_in_time(method, got, took, down.within)
                    if problem is not None:
                        problems.append((method, f"{label}: {problem}"))

                async with trio.open_nursery() as nursery:
                    for label, b in brokers.items():
                        for method in CALLS:
                            nursery.start_soon(one, label, b, method)
            finally:
                await switch(down.outage.end)
            for label, b in brokers.items():
                problem = await _works(down, b, w, "ping")
                if problem is not None:
                    problems.append(("ping", f"{label}: {problem}"))
        if problems and all(m in down.escapes for m, _ in problems):
            pytest.xfail(f"listed in escapes: {[p for _, p in problems]}")
        assert not problems, "\n".join(sorted(p for _, p in problems))

    async def test_route_nowait_never_raises_and_loses_nothing_silently(self, down: Down) -> None:
        """While the backend is away — just gone, and known to be gone —
        route_nowait returns at once without raising and the node's own
        connection has the items; once back, the backend has them or the
        node was told to resync. Then route_nowait is in order with a later
        call again."""
        async with world(down.make) as w:
            b, node = w.broker, w.node
            problems: list[str] = []
            keys: list[str] = []

            def route_now(when: str) -> None:
                keys.append(w.fresh("k"))
                got, took = timed_now(lambda: b.route_nowait([Routed("bob", keys[-1], "p", True)]))
                if isinstance(got, BaseException) or took > down.within:
                    problems.append(f"route_nowait {when} {describe(got)} after {took:.2f} s")
                elif keys[-1] not in [i.key for i in node.got]:  # no await since the call
                    problems.append(f"route_nowait {when} did not reach this node at once")

            resyncs = node.resyncs
            await _twice_in_outage(down, route_now)

            async def kept_or_resynced() -> bool:
                return node.resyncs > resyncs or all([await owes(b, "bob", k) for k in keys])

            if not problems and not await eventually(kept_or_resynced, down.recover_within):
                problems.append("items routed in the outage are lost, and no resync came")
            problem = "; ".join(problems) or await _works(down, b, w, "ping")
            if problem is None:
                later = w.fresh("k")
                b.route_nowait([Routed("bob", later, "p", queued=True)])
                if not await owes(b, "bob", later):
                    problem = "once back, route_nowait is not in order with a later queued"
        _judge(down, "route_nowait", problem)

    async def test_settle_nowait_never_raises(self, down: Down) -> None:
        """While the backend is away — just gone, and known to be gone —
        settle_nowait returns at once without raising; once back it is in
        order with a later call again."""
        async with world(down.make) as w:
            b = w.broker
            problems: list[str] = []

            def settle_now(when: str) -> None:
                got, took = timed_now(lambda: b.settle_nowait("bob", ["m0"]))
                if isinstance(got, BaseException) or took > down.within:
                    problems.append(f"settle_nowait {when} {describe(got)} after {took:.2f} s")

            await _twice_in_outage(down, settle_now)
            problem = "; ".join(problems) or await _works(down, b, w, "ping")
            if problem is None:
                later = w.fresh("k")
                await b.route([Routed("bob", later, "p", queued=True)])
                b.settle_nowait("bob", [later])
                if await owes(b, "bob", later):
                    problem = "once back, settle_nowait is not in order with a later queued"
        _judge(down, "settle_nowait", problem)

    async def test_run_survives_an_outage_and_resyncs(self, down: Down) -> None:
        """Two nodes on two brokers: through an outage their run() keeps
        going; once the backend is back each resyncs, and items routed from
        one reach the other live again."""
        problems: list[str] = []
        async with world(down.make) as w, trio.open_nursery() as nursery:
            peer = await down.make()
            n1, n2 = w.node, await start(nursery, peer, "n2")
            await peer.attach("carol", "n2", "c2")
            before = {n1.name: n1.resyncs, n2.name: n2.resyncs}
            await switch(down.outage.begin)
            try:
                await trio.sleep(down.noticed_within)
            finally:
                await switch(down.outage.end)
            problems += [
                f"{n.name}'s run ended in the outage: {n.ended}" for n in (n1, n2) if n.ended
            ]

            async def resynced() -> bool:
                return all(n.resyncs > before[n.name] for n in (n1, n2))

            if not problems and not await eventually(resynced, down.recover_within):
                after = {n.name: n.resyncs for n in (n1, n2)}
                problems.append(f"no resync once the backend was back: {before} -> {after}")
            for sender, node, user in ((peer, n1, "bob"), (w.broker, n2, "carol")):
                if not problems and not await delivered(sender, node, user, w, down.recover_within):
                    problems.append(f"once back, nothing routed to {user} reached {node.name} live")
            problems += [f"{n.name}'s run ended: {n.ended}" for n in (n1, n2) if n.ended]
            nursery.cancel_scope.cancel()
        _judge(down, "run", "; ".join(problems) or None)

    async def test_run_begun_in_an_outage_starts_once_the_backend_is_back(self, down: Down) -> None:
        """run() begun while the backend is away does not say it started
        (delivery is not live) and does not give up; it starts once the
        backend is back."""
        node = RunningNode(await down.make(), "n3")
        started = trio.Event()
        async with trio.open_nursery() as nursery:

            async def begin_run() -> None:
                try:
                    await nursery.start(node.run)
                except RuntimeError:
                    return  # run ended before it started: node.ended says how
                started.set()

            await switch(down.outage.begin)
            try:
                nursery.start_soon(begin_run)
                await trio.sleep(down.noticed_within)
                early = started.is_set()
            finally:
                await switch(down.outage.end)
            with trio.move_on_after(down.recover_within):
                await started.wait()
            problem = None
            if early:
                problem = "run said it started while the backend was away"
            elif node.ended:
                problem = f"run ended: {node.ended}"
            elif not started.is_set():
                problem = f"run did not start within {down.recover_within:g} s of the return"
            nursery.cancel_scope.cancel()
        _judge(down, "run", problem)

    async def test_aclose_in_an_outage_is_quiet(self, down: Down) -> None:
        """Closing a broker in use (a node running, a user attached) while its
        backend is away neither raises nor hangs: a process can shut down."""
        doomed = await down.make()
        async with trio.open_nursery() as nursery:
            await start(nursery, doomed, "n4")
            await doomed.attach("erin", "n4", "c4")
            await switch(down.outage.begin)
            try:
                got, took = await timed(doomed.aclose(), _limit(down))
            finally:
                await switch(down.outage.end)
            nursery.cancel_scope.cancel()
        problem = None
        if failed(got) or took > down.within:
            problem = f"aclose {describe(got)} after {took:.2f} s"
        _judge(down, "aclose", problem)
