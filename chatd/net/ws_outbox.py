"""Outbox accounting for WebSockets: what each socket still owes, and when a
device counts as too slow. Pure: no sockets, no trio (tests/net/test_ws_outbox.py).

Guarantees:

* A connection's queued bytes are bounded (:data:`OUTBOX_FRAMES` frames,
  ``per_connection`` bytes of its :class:`OutboxBudget`): past either,
  :func:`too_slow` says the device is too slow (the connection closes it
  with 4008; what was owed stays owed and comes with its next ``ready``).
* The process's queued bytes are bounded too (``total``, 0: none). Past
  it, only a connection holding at least :data:`SLOW_SHARE` bytes is too
  slow; one that keeps up holds less and is never closed for it.
* Every byte an :class:`Outbox` queues is counted, in the outbox and in the
  shared budget, until it is sent or dropped; dropping uncounts it, so a
  closed connection holds nothing of the process's budget.
* :meth:`Outbox.discard` never cuts a frame in half: the rest of one
  already begun stays queued.
* A backlog waits for the socket past :func:`backlog_full`, so a long
  backlog never fills the outbox that live frames need.
"""

from __future__ import annotations

from collections import deque

#: Queued frames / bytes a device may have waiting for its socket before it
#: counts as too slow (4008). Bytes bound the memory one slow phone holds.
OUTBOX_FRAMES = 1024
OUTBOX_BYTES = 1024 * 1024
#: The backlog writer waits for the socket above these, so a long backlog
#: never fills the outbox that live frames need.
BACKLOG_HIGH_FRAMES = 256
BACKLOG_HIGH_BYTES = 256 * 1024
#: Queued bytes that mark a connection as one of the slow ones when the
#: process is over its budget.
SLOW_SHARE = 64 * 1024


class OutboxBudget:
    """Bytes queued for slow sockets: at most ``per_connection`` for one
    (the device is too slow past it: 4008), and ``total`` for the whole
    process (0: none). Past the total, a connection that is writing and holds
    at least :data:`SLOW_SHARE` queued bytes is closed as too slow; one that
    keeps up holds less and is never closed for it."""

    def __init__(self, per_connection: int = OUTBOX_BYTES, total: int = 0, sndbuf: int = 0) -> None:
        self.per_connection = per_connection
        self.total = total
        #: SO_SNDBUF for each socket (0: the kernel's autotuning): the kernel
        #: holds this much per slow device on top of the outbox.
        self.sndbuf = sndbuf
        self.queued = 0

    def over(self) -> bool:
        return bool(self.total) and self.queued > self.total


def too_slow(frames: int, queued: int, budget: OutboxBudget) -> bool:
    """Whether a connection with ``frames`` frames / ``queued`` bytes waiting
    for its socket is too slow (4008)."""
    return (
        frames > OUTBOX_FRAMES
        or queued > budget.per_connection
        or (queued >= SLOW_SHARE and budget.over())
    )


def backlog_full(frames: int, queued: int) -> bool:
    """Whether the backlog writer should wait for the socket before its next frame."""
    return frames > BACKLOG_HIGH_FRAMES or queued > BACKLOG_HIGH_BYTES


class Outbox:
    """The frames one socket did not take at once, oldest first, counted in
    :attr:`frames` / :attr:`bytes` and in the shared :class:`OutboxBudget`.

    A frame the socket took part of is kept as a ``memoryview`` of its rest:
    a ``memoryview`` at the head is a frame already begun.
    """

    def __init__(self, budget: OutboxBudget) -> None:
        #: Shared by every connection of the process (the queued bytes of all).
        self.budget = budget
        self._queue: deque[bytes | memoryview] = deque()
        self.frames = 0
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self._queue)

    def head(self) -> bytes | memoryview:
        """The oldest queued chunk (the next to send)."""
        return self._queue[0]

    def append(self, data: bytes | memoryview) -> None:
        self._queue.append(data)
        self.frames += 1
        self.bytes += len(data)
        self.budget.queued += len(data)

    def sent(self, count: int) -> bool:
        """``count`` bytes of the head went to the kernel; True when that
        finished it (it is dropped), False when its rest stays at the head."""
        chunk = self._queue[0]
        self.bytes -= count
        self.budget.queued -= count
        if count == len(chunk):
            self._queue.popleft()
            self.frames -= 1
            return True
        self._queue[0] = memoryview(chunk)[count:]
        return False

    def discard(self) -> None:
        """Drop what is queued, except the rest of a frame already begun."""
        if not self._queue:
            return
        first = self._queue[0]
        partial_frame = isinstance(first, memoryview)
        self.clear()
        if partial_frame:
            self.append(first)

    def clear(self) -> None:
        """Drop everything queued."""
        self._queue.clear()
        self.budget.queued -= self.bytes
        self.frames = self.bytes = 0
