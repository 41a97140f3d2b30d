"""What the broker outage contract (:mod:`chatd.testing.broker_outage`) is
made of: the world a broker is in when its backend goes away, nodes whose
``run`` is watched, and calls that are timed, bounded and judged."""

from __future__ import annotations

import inspect
import itertools
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from chatd.core.errors import Unavailable
from chatd.ports import Broker, QueueEntry, Routed
from chatd.testing.broker_contract import Node


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class RunningNode(Node):
    """A node whose ``run`` is watched: :attr:`ended` records how it ended
    (an exception, or ``"returned"``)."""

    def __init__(self, broker: Broker, name: str) -> None:
        super().__init__(broker, name)
        self.ended: list[object] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.broker.run(self.name, self.deliver, self.resync, task_status=task_status)
        except Exception as exc:
            self.ended.append(exc)
        else:
            self.ended.append("returned")


async def start(nursery: trio.Nursery, broker: Broker, name: str) -> RunningNode:
    node = RunningNode(broker, name)
    await nursery.start(node.run)
    return node


@dataclass
class World:
    """A broker in use when the outage begins: node ``n1`` runs on it with
    bob attached (connection ``c1``); bob owes ``m0``, carol ``e0``; token
    ``t0`` is revoked, family ``f0`` (digest ``d0``) begun, bucket ``b0``
    used."""

    broker: Broker
    node: RunningNode
    until: int = field(default_factory=lambda: now_ms() + 600_000)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter):04d}"

    async def fill(self) -> None:
        b = self.broker
        await b.attach("bob", "n1", "c1")
        await b.route([Routed("bob", "m0", "p0", queued=True)])
        await b.enqueue("carol", [QueueEntry("e0", "q0")])
        await b.revoke("t0", self.until)
        await b.refresh_begin("f0", "bob", "d0", "j0", self.until)
        await b.take("b0", 1, 1.0, 5)


@asynccontextmanager
async def world(make: Callable[[], Awaitable[Broker]]) -> AsyncIterator[World]:
    """A broker in use, with node n1 running on it until the block ends."""
    broker = await make()
    async with trio.open_nursery() as nursery:
        w = World(broker, await start(nursery, broker, "n1"))
        await w.fill()
        try:
            yield w
        finally:
            nursery.cancel_scope.cancel()


async def switch(action: Callable[[], object]) -> None:
    """Call a switch's ``begin`` or ``end`` (plain or a coroutine function)."""
    result = action()
    if inspect.isawaitable(result):
        await result


#: What a call that did not answer in time gave (it was cancelled).
HUNG = object()


async def outcome(call: Awaitable[object]) -> object:
    """What ``call`` raised (an Exception, kept as it is), or what it returned."""
    try:
        return await call
    except Exception as exc:
        return exc


class _Starvation:
    """How long the machine kept this process from running, as a thread of
    its own sees it: it sleeps in short steps and adds up how late it woke
    (beyond one GIL switch interval). A busy machine makes it late; a call
    that blocks the event loop in a system call does not (the GIL is free
    meanwhile), so it is never excused by this."""

    STEP = 0.005

    def __init__(self) -> None:
        self.lost = 0.0
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="starvation", daemon=True).start()

    def _run(self) -> None:
        grace = self.STEP + sys.getswitchinterval()
        while True:
            begun = time.perf_counter()
            time.sleep(self.STEP)
            late = time.perf_counter() - begun - grace
            if late > 0:
                with self._lock:
                    self.lost += late

    def total(self) -> float:
        with self._lock:
            return self.lost


_starvation: _Starvation | None = None


def starved() -> float:
    """Seconds the machine kept this process from running so far (see
    :class:`_Starvation`; it starts counting on the first call)."""
    global _starvation
    if _starvation is None:
        _starvation = _Starvation()
    return _starvation.total()


async def timed(call: Awaitable[object], limit: float) -> tuple[object, float]:
    """``call``'s outcome (:data:`HUNG` if cancelled after ``limit`` s) and
    how long it took, less what the machine kept this process from running
    meanwhile (:func:`starved`): a loaded machine is not the broker's fault."""
    begun, lost = trio.current_time(), starved()
    got: object = HUNG
    with trio.move_on_after(limit):
        got = await outcome(call)
    return got, trio.current_time() - begun - (starved() - lost)


def timed_now(call: Callable[[], object]) -> tuple[object, float]:
    """A synchronous call's outcome and how long it took (it cannot be cancelled)."""
    begun = time.monotonic()
    try:
        got = call()
    except Exception as exc:
        got = exc
    return got, time.monotonic() - begun


def failed(got: object) -> bool:
    return got is HUNG or isinstance(got, BaseException)


def describe(got: object) -> str:
    if got is HUNG:
        return "did not answer (cancelled)"
    if isinstance(got, BaseException):
        return f"raised {type(got).__module__}.{type(got).__qualname__}: {got}"
    return f"returned {got!r:.100}"


def refused_in_time(method: str, got: object, took: float, within: float) -> str | None:
    """None if ``got`` is Unavailable and came within ``within`` s; else what is wrong."""
    if not isinstance(got, Unavailable):
        return f"{method} {describe(got)} with its backend away (after {took:.2f} s)"
    if took > within:
        return f"{method} raised Unavailable ({got}) after {took:.2f} s, not within {within:g} s"
    return None


async def through(call: Callable[[], Awaitable[object]], within: float) -> object:
    """``call()`` again while it raises Unavailable, for up to ``within`` s;
    its last outcome."""
    deadline = trio.current_time() + within
    while True:
        got, _took = await timed(call(), max(0.0, deadline - trio.current_time()))
        if not isinstance(got, Unavailable) or trio.current_time() >= deadline:
            return got
        await trio.sleep(0.05)


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Whether ``check()`` comes true within ``within`` s."""
    with trio.move_on_after(within):
        while True:
            if await check():
                return True
            await trio.sleep(0.05)
    return False


async def owes(b: Broker, user: str, key: str) -> bool:
    """Whether ``user``'s queue holds ``key`` (False if it cannot be read)."""
    owed = await through(lambda: b.queued(user), 1.0)
    return isinstance(owed, list) and key in [e.key for e in owed]


async def delivered(sender: Broker, node: Node, user: str, w: World, within: float) -> bool:
    """Whether an item ``sender`` routes to ``user`` reaches ``node`` live,
    routing a new one until one does or ``within`` s passed."""
    with trio.move_on_after(within):
        while True:
            key = w.fresh("live")
            await outcome(sender.route([Routed(user, key, "p", queued=False)]))
            for _ in range(15):
                if key in [i.key for i in node.got]:
                    return True
                await trio.sleep(0.02)
    return False
