"""The group-commit Batcher (issue 13: tests in the middle), driven on
``trio.testing.MockClock``: no sleeping, the window measured in virtual
time; batching, order, error fan-out, cancellation, close and back pressure."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from chatd.batching import Batcher
from chatd.core.errors import ChatError, Internal, Unavailable


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Writer:
    """A batch function that records its calls; ``fail`` makes the next call raise."""

    def __init__(self, cost: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.fail: BaseException | None = None
        self.cost = cost
        self.gate: trio.Event | None = None

    async def __call__(self, batch: list[int]) -> list[int]:
        self.calls.append(list(batch))
        if self.gate is not None:
            await self.gate.wait()
        if self.cost:
            await trio.sleep(self.cost)
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return [x * 10 for x in batch]


async def _running(nursery: trio.Nursery, batcher: Batcher[Any, Any]) -> None:
    await nursery.start(batcher.run)


async def test_what_arrives_together_is_written_together_in_order(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w)
    results: dict[int, Any] = {}
    async with trio.open_nursery() as n:
        await _running(n, b)
        w.gate = trio.Event()
        # The first request starts a batch; the next ones queue behind it.
        n.start_soon(lambda: _submit(b, 1, results))
        await trio.testing.wait_all_tasks_blocked()
        for i in (2, 3, 4):
            n.start_soon(lambda i=i: _submit(b, i, results))
        await trio.testing.wait_all_tasks_blocked()
        w.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        b.close()
    # (trio runs new tasks in any order: the second batch's order is theirs)
    assert [w.calls[0], sorted(w.calls[1])] == [[1], [2, 3, 4]]
    assert results == {1: 10, 2: 20, 3: 30, 4: 40}
    assert (b.batches, b.items) == (2, 4)


async def _submit(b: Batcher[int, int], x: int, into: dict[int, Any]) -> None:
    try:
        into[x] = await b.submit(x)
    except ChatError as exc:
        into[x] = exc


async def test_the_window_holds_a_first_request_for_company(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w, window=0.010)
    async with trio.open_nursery() as n:
        await _running(n, b)
        start = trio.current_time()
        got = await b.submit(7)
        waited = trio.current_time() - start
        # Requests within the window share the batch.
        results: dict[int, Any] = {}
        async with trio.open_nursery() as inner:
            inner.start_soon(_submit, b, 1, results)
            await trio.sleep(0.004)
            inner.start_soon(_submit, b, 2, results)
        b.close()
    assert got == 70
    assert waited == pytest.approx(0.010)
    assert w.calls == [[7], [1, 2]]


async def test_max_batch_splits_and_keeps_a_submission_whole(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w, max_batch=3)
    got: list[Any] = []
    async with trio.open_nursery() as n:
        w.gate = trio.Event()
        b.submit_nowait([1, 2], got.append)
        b.submit_nowait([3, 4], got.append)  # does not fit after [1, 2]
        b.submit_nowait([5], got.append)
        w.gate.set()
        await _running(n, b)
        await b.flush()
        b.close()
    assert w.calls == [[1, 2], [3, 4, 5]]
    assert got == [[10, 20], [30, 40], [50]]


async def test_an_error_reaches_every_waiter_of_its_batch_and_only_those(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w)
    results: dict[int, Any] = {}
    callbacks: list[Any] = []
    async with trio.open_nursery() as n:
        await _running(n, b)
        w.gate = trio.Event()
        n.start_soon(_submit, b, 1, results)  # a batch of its own, held
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(_submit, b, 2, results)
        n.start_soon(_submit, b, 3, results)
        await trio.testing.wait_all_tasks_blocked()
        b.submit_nowait([4], callbacks.append)
        w.fail = Unavailable("store down")  # the first call fails
        w.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        b.close()
    assert isinstance(results[1], Unavailable)
    # The next batch was written: its waiters got results, not the error.
    assert (results[2], results[3], callbacks) == (20, 30, [[40]])


async def test_one_failed_batch_fails_each_waiter_with_its_own_exception(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w, window=0.005)
    results: dict[int, Any] = {}
    callbacks: list[Any] = []
    async with trio.open_nursery() as n:
        await _running(n, b)
        w.fail = Unavailable("store down")
        n.start_soon(_submit, b, 1, results)
        n.start_soon(_submit, b, 2, results)
        b.submit_nowait([3], callbacks.append)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.01)
        b.close()
    errors = [results[1], results[2], callbacks[0]]
    assert all(isinstance(e, Unavailable) and e.message == "store down" for e in errors)
    # Never one instance raised in several tasks.
    assert len({id(e) for e in errors}) == 3
    assert [sorted(c) for c in w.calls] == [[1, 2, 3]]


async def test_a_bug_in_the_batch_function_is_internal_and_the_writer_goes_on(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w)
    async with trio.open_nursery() as n:
        await _running(n, b)
        w.fail = KeyError("oops")
        with pytest.raises(Internal):
            await b.submit(1)
        assert await b.submit(2) == 20
        b.close()


async def test_a_wrong_number_of_results_is_internal(autojump_clock):
    async def short(batch: list[int]) -> list[int]:
        return batch[:-1]

    b: Batcher[int, int] = Batcher("t", short)
    async with trio.open_nursery() as n:
        await _running(n, b)
        with pytest.raises(Internal):
            await b.submit_many([1, 2])
        b.close()


async def test_a_cancelled_caller_still_gets_its_request_written(autojump_clock):
    w = Writer(cost=0.001)
    b: Batcher[int, int] = Batcher("t", w)
    results: dict[int, Any] = {}
    async with trio.open_nursery() as n:
        await _running(n, b)
        w.gate = trio.Event()
        n.start_soon(_submit, b, 1, results)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            # Queued, then cancelled while waiting for the result.
            n.start_soon(_submit, b, 2, results)
            await b.submit(3)
        n.start_soon(_submit, b, 4, results)
        await trio.testing.wait_all_tasks_blocked()
        w.gate.set()
        await b.flush()
        b.close()
    assert sorted(x for call in w.calls for x in call) == [1, 2, 3, 4]
    assert results == {1: 10, 2: 20, 4: 40}


async def test_close_drains_then_refuses(autojump_clock):
    w = Writer(cost=0.001)
    b: Batcher[int, int] = Batcher("t", w)
    got: list[Any] = []
    async with trio.open_nursery() as n:
        await _running(n, b)
        b.submit_nowait([1], got.append)
        b.submit_nowait([2], got.append)
        b.close()
        with pytest.raises(Unavailable):
            b.submit_nowait([3], got.append)
        with pytest.raises(Unavailable):
            await b.submit(4)
    # run() returned: what was queued before close() was written.
    assert got == [[10], [20]]


async def test_back_pressure_parks_until_there_is_room(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w, max_queue=2)
    got: list[Any] = []
    order: list[str] = []
    async with trio.open_nursery() as n:
        w.gate = trio.Event()
        b.submit_nowait([1, 2], got.append)
        assert b.full

        async def producer() -> None:
            await b.wait_for_room()
            order.append("room")

        n.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # parked while full
        await _running(n, b)  # the writer takes the queue: room again
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["room"]
        w.gate.set()
        await b.flush()
        b.close()
    assert got == [[10, 20]]


async def test_call_after_runs_once_earlier_writes_and_their_callbacks_did(autojump_clock):
    w = Writer()
    b: Batcher[int, int] = Batcher("t", w)
    order: list[str] = []
    b.call_after(lambda: order.append("idle: at once"))
    async with trio.open_nursery() as n:
        b.submit_nowait([1], lambda r: order.append(f"done {r}"))
        b.call_after(lambda: order.append("after"))
        await _running(n, b)
        await b.flush()
        b.close()
    assert order == ["idle: at once", "done [10]", "after"]
