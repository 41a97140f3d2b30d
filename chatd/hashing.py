"""Password hashing off the event loop, at a lower CPU priority, with a
bounded queue.

argon2 is deliberately expensive (tens of ms of CPU per hash). In trio's
worker threads a login storm would take every core at the same priority as
the event loop, and message delivery would wait behind it. Here hashing runs
on a few threads of its own whose Linux nice value is raised once when they
start (lowering one's own priority needs no privilege): the kernel then
runs the event loop first whenever both want a core. At most ``queue_limit``
jobs wait; past that, :meth:`Hasher.run` refuses at once (the HTTP API
answers 429 with Retry-After) instead of letting the queue, and the
latency of every login, grow without bound.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from chatd.core.errors import RateLimited

log = logging.getLogger("chatd.hashing")

T = TypeVar("T")


class Hasher:
    def __init__(self, threads: int = 2, nice: int = 10, queue_limit: int = 64) -> None:
        self.threads = max(1, threads)
        self.nice = nice
        self.queue_limit = queue_limit
        self.waiting = 0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for i in range(self.threads):
                threading.Thread(target=self._work, name=f"chatd-hash-{i}", daemon=True).start()

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except (OSError, AttributeError) as exc:  # not Linux, or not allowed
            log.warning("hashing threads run at normal priority", extra={"reason": str(exc)})
        while True:
            self._jobs.get()()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a hashing thread; raises RateLimited when
        ``queue_limit`` jobs are already waiting. Not cancellable once
        queued (a hash takes milliseconds)."""
        if self.waiting >= self.queue_limit:
            raise RateLimited("the server is busy with logins; retry in 1 s", retry_after=1.0)
        self._start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def job() -> None:
            result = outcome.capture(fn, *args)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self.waiting += 1
        try:
            self._jobs.put(job)
            return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
                lambda _: trio.lowlevel.Abort.FAILED
            )
        finally:
            self.waiting -= 1
