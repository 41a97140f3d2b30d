"""Group commit: what arrives together is written together.

A :class:`Batcher` owns one writer task (run it in the service nursery).
Callers ``submit`` items and wait for their own result; the writer takes
everything queued at that moment (up to ``max_batch``) and hands it to one
call of the batch function, so concurrent sends share one transaction
instead of paying one commit each.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from chatd.core.errors import ChatError, Internal, Unavailable

Req = TypeVar("Req")
Res = TypeVar("Res")

log = logging.getLogger("chatd.batching")


class _Slot(Generic[Req, Res]):
    __slots__ = ("done", "error", "requests", "results")

    def __init__(self, requests: Sequence[Req]) -> None:
        self.requests = requests
        self.results: list[Res] = []
        self.error: ChatError | None = None
        self.done = trio.Event()


class Batcher(Generic[Req, Res]):
    def __init__(
        self,
        name: str,
        fn: Callable[[list[Req]], Awaitable[list[Res]]],
        *,
        max_batch: int = 512,
        queue: int = 4096,
    ) -> None:
        self.name = name
        self._fn = fn
        self.max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[_Slot[Req, Res]](queue)
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
            return []
        slot: _Slot[Req, Res] = _Slot(requests)
        try:
            await self._send.send(slot)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise Unavailable("server is shutting down") from None
        await slot.done.wait()
        if slot.error is not None:
            # A fresh exception per waiter: one instance must not be raised in
            # several tasks at once.
            raise type(slot.error)(slot.error.message)
        return slot.results

    def close(self) -> None:
        """No new submissions; :meth:`run` returns once the queue is drained."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._recv:
            while True:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
                slots = [first]
                count = len(first.requests)
                while count < self.max_batch:
                    try:
                        slot = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    slots.append(slot)
                    count += len(slot.requests)
                await self._flush(slots)

    async def _flush(self, slots: list[_Slot[Req, Res]]) -> None:
        requests = [r for slot in slots for r in slot.requests]
        try:
            results = await self._fn(requests)
            if len(results) != len(requests):
                raise Internal(f"{self.name}: {len(results)} results for {len(requests)} requests")
        except ChatError as exc:
            for slot in slots:
                slot.error = exc
                slot.done.set()
            return
        except Exception:
            log.exception("batch call failed", extra={"batcher": self.name})
            for slot in slots:
                slot.error = Internal("internal error while writing")
                slot.done.set()
            return
        self.batches += 1
        self.items += len(requests)
        i = 0
        for slot in slots:
            n = len(slot.requests)
            slot.results = results[i : i + n]
            i += n
            slot.done.set()
