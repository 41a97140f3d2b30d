"""Group commit: what arrives together is written together.

A :class:`Batcher` owns one writer task (run it in the service nursery).
Callers ``submit`` items and wait for their own results; the writer takes
everything queued at that moment (up to ``max_batch`` items) and hands it
to one call of the batch function, so everything that arrives while one
transaction commits shares the next one instead of paying a commit each.

``window``: batches start at least this far apart, and after a quiet
spell the first request waits this long for company. A commit has a fixed cost (an fsync
takes ~0.1 ms of CPU and ~0.3 ms of wall time on the benchmark machine, plus
the hand-over to a worker thread); without a window a lightly loaded writer
commits back to back, one or two requests at a time, and that fixed cost is
most of the CPU a message takes. The window trades at most ``window`` of
latency for far fewer commits (docs/performance.md has the measurements).

It is on the hot path of every frame, so it is lean. A caller either
queues its items with a callback (:meth:`Batcher.submit_nowait`: the writer
calls it with the results, in submission order, right after the batch is
written; nobody parks) or queues them and parks until the writer hands it
the results (:meth:`Batcher.submit_many`; no channel, no Event of its own).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import outcome
import trio

from chatd.core.errors import ChatError, Internal, Unavailable

Req = TypeVar("Req")
#: A request that writes nothing: :meth:`Batcher.flush` waits for it.
_BARRIER: Any = object()
Res = TypeVar("Res")

log = logging.getLogger("chatd.batching")


#: Called with a batch's results for one submission, or with its error.
Done = Callable[[list[Any] | ChatError], None]


class _Waiter:
    __slots__ = ("count", "done", "task", "waiting")

    def __init__(self, task: trio.lowlevel.Task | None, count: int, done: Done | None) -> None:
        self.task = task
        self.done = done
        self.count = count
        self.waiting = True


class Batcher(Generic[Req, Res]):
    def __init__(
        self,
        name: str,
        fn: Callable[[list[Req]], Awaitable[list[Res]]],
        *,
        max_batch: int = 512,
        window: float = 0.0,
        max_queue: int = 8192,
    ) -> None:
        self.name = name
        self._fn = fn
        self.max_batch = max_batch
        self.window = window
        self.max_queue = max_queue
        self._room = trio.lowlevel.ParkingLot()
        self._requests: list[Req] = []
        self._waiters: list[_Waiter] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._idle = False  # the writer waits for a first request
        self._busy = False  # a batch is being written
        self._was_idle = False  # woken by a first request after a quiet spell
        self._gathering = False  # the writer waits out the window
        self._closed = False
        self.batches = 0
        self.items = 0

    async def submit(self, request: Req) -> Res:
        return (await self.submit_many([request]))[0]

    async def submit_many(self, requests: Sequence[Req]) -> list[Res]:
        """Queue requests and wait for their results (in order).

        Raises the ChatError of the batch call (Unavailable when the backend
        failed, or when the batcher is closed). If the caller is cancelled
        while waiting, the requests are still carried out.
        """
        if not requests:
            await trio.lowlevel.checkpoint()
            return []
        if self._closed:
            raise Unavailable("server is shutting down")
        waiter = _Waiter(trio.lowlevel.current_task(), len(requests), None)
        self._queue(requests, waiter)

        def abort(_: Any) -> trio.lowlevel.Abort:
            waiter.waiting = False  # the requests still run; nobody takes the results
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def submit_nowait(self, requests: Sequence[Req], done: Done) -> None:
        """Queue requests; ``done`` is called in the writer task with their
        results (in order), or with the ChatError of the batch, right after
        the batch is written. Callbacks run in submission order; they must
        not block. Raises Unavailable when closed. Over ``max_queue``
        requests it still queues: callers bound themselves with
        :meth:`wait_for_room`."""
        if self._closed:
            raise Unavailable("server is shutting down")
        self._queue(requests, _Waiter(None, len(requests), done))

    @property
    def full(self) -> bool:
        return len(self._requests) >= self.max_queue

    async def wait_for_room(self) -> None:
        """Return once fewer than ``max_queue`` requests are queued."""
        while self.full and not self._closed:
            await self._room.park()

    async def flush(self) -> None:
        """Return once everything queued before the call is written."""
        await self.submit_many([_BARRIER])

    def call_after(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the writer task) once everything queued before
        is written and its callbacks ran; at once if nothing is queued."""
        if self._closed or (not self._waiters and not self._busy):
            callback()
            return
        self._queue([_BARRIER], _Waiter(None, 1, lambda _: callback()))

    def _queue(self, requests: Sequence[Req], waiter: _Waiter) -> None:
        self._requests.extend(requests)
        self._waiters.append(waiter)
        if self._idle or (self._gathering and len(self._requests) >= self.max_batch):
            if self._idle:
                self._idle = False
                self._was_idle = True
            self._lot.unpark()

    def close(self) -> None:
        """No new submissions; :meth:`run` returns once the queue is drained."""
        self._closed = True
        self._lot.unpark_all()
        self._room.unpark_all()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last_start = -math.inf
        while True:
            if not self._waiters:
                if self._closed:
                    return
                self._idle = True
                await self._lot.park()
                continue
            # Batches start at least ``window`` apart: what arrives meanwhile
            # joins (a full batch or close() ends the wait early). Idle, the
            # first request waits up to the window; busy, a batch that took
            # longer than the window is followed at once.
            due = last_start + self.window
            if self.window > 0 and not self._closed and len(self._requests) < self.max_batch:
                if trio.current_time() < due:
                    self._gathering = True
                    with trio.move_on_at(due):
                        await self._lot.park()
                    self._gathering = False
                elif self._was_idle:
                    self._gathering = True
                    with trio.move_on_after(self.window):
                        await self._lot.park()
                    self._gathering = False
            self._was_idle = False
            last_start = trio.current_time()
            # Whole waiters, up to max_batch requests (at least one waiter).
            count = taken = 0
            for waiter in self._waiters:
                if taken and count + waiter.count > self.max_batch:
                    break
                count += waiter.count
                taken += 1
            waiters = self._waiters[:taken]
            requests = self._requests[:count]
            del self._waiters[:taken]
            del self._requests[:count]
            self._busy = True
            try:
                await self._flush(requests, waiters)
            finally:
                self._busy = False

    async def _flush(self, requests: list[Req], waiters: list[_Waiter]) -> None:
        if self._room and not self.full:
            self._room.unpark_all()
        real = [r for r in requests if r is not _BARRIER]
        try:
            results = await self._fn(real) if real else []
            if len(results) != len(real):
                raise Internal(f"{self.name}: {len(results)} results for {len(real)} requests")
            if len(real) != len(requests):
                it = iter(results)
                # A barrier's slot: None (its waiter takes no result).
                results = [None if r is _BARRIER else next(it) for r in requests]  # type: ignore[misc]
        except ChatError as exc:
            self._fail(waiters, exc)
            return
        except Exception:
            log.exception("batch call failed", extra={"batcher": self.name})
            self._fail(waiters, Internal("internal error while writing"))
            return
        self.batches += 1
        self.items += len(requests)
        i = 0
        for waiter in waiters:
            n = waiter.count
            if waiter.done is not None:
                try:
                    waiter.done(results[i : i + n])
                except Exception:
                    log.exception("a write callback failed", extra={"batcher": self.name})
            elif waiter.waiting and waiter.task is not None:
                waiter.waiting = False
                trio.lowlevel.reschedule(waiter.task, outcome.Value(results[i : i + n]))
            i += n

    def _fail(self, waiters: list[_Waiter], error: ChatError) -> None:
        for waiter in waiters:
            # A fresh exception per waiter: one instance must not be raised
            # in several tasks at once.
            fresh = type(error)(error.message)
            if waiter.done is not None:
                try:
                    waiter.done(fresh)
                except Exception:
                    log.exception("a write callback failed", extra={"batcher": self.name})
            elif waiter.waiting and waiter.task is not None:
                waiter.waiting = False
                trio.lowlevel.reschedule(waiter.task, outcome.Error(fresh))
