"""The password hasher: its own threads at a lower priority, a bounded queue."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from chatd.core.errors import RateLimited
from chatd.hashing import Hasher


async def test_results_and_errors_come_back():
    hasher = Hasher(threads=2)
    assert await hasher.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await hasher.run(lambda: 1 / 0)
    assert hasher.waiting == 0


async def test_the_threads_run_at_a_lower_priority():
    hasher = Hasher(threads=1, nice=7)

    def mine() -> tuple[int, int]:
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid)

    tid, nice = await hasher.run(mine)
    assert tid != threading.get_native_id()
    assert nice == os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 7 or nice == 19


async def test_a_full_queue_refuses_at_once():
    hasher = Hasher(threads=1, queue_limit=3)
    gate = threading.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(hasher.run, gate.wait)
        await trio.testing.wait_all_tasks_blocked()
        assert hasher.waiting == 3
        with pytest.raises(RateLimited) as info:
            await hasher.run(lambda: None)
        assert info.value.retry_after == 1.0
        gate.set()
    assert hasher.waiting == 0
