"""One WebSocket's TCP socket: reads, and writes that never wait.

chatd speaks WebSocket over plain non-blocking sockets driven by trio's
``wait_readable`` / ``wait_writable``. Guarantees:

* **Writes go straight to the socket**, from whichever task has something
  for this device (its own reader answering, another connection's reader
  routing a message, the broker delivering one): ``send()`` on a
  non-blocking socket takes it at once unless the kernel's buffer is full.
  Only then is the rest queued (in an :class:`~chatd.net.ws_outbox.Outbox`,
  which counts it) and a flusher task started (in the connection's nursery)
  to wait until the socket is writable.
* Bytes go out in the order they were written; nothing is written once the
  socket broke or was closed, and then nothing stays counted as queued.
* A write that finds the peer gone calls :attr:`Transport.on_broken` once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from chatd.net.ws_outbox import Outbox, OutboxBudget

RECV_SIZE = 65536


class Transport:
    """One non-blocking TCP socket: reads, and writes that never wait.

    :meth:`write` hands bytes to the kernel at once; what it does not take is
    queued and a flusher task (started in ``nursery``) writes it when the
    socket is writable. The owner closes the socket with :meth:`close`.
    """

    def __init__(self, sock: socket.socket, budget: OutboxBudget | None = None) -> None:
        self.sock = sock
        #: What the socket did not take yet, counted in the process's budget.
        self.outbox = Outbox(budget or OutboxBudget())
        self.nursery: trio.Nursery | None = None
        self._flushing = False
        self._drained = trio.Event()
        self._drained.set()
        self.broken = False
        #: Called (once) when a write finds the peer gone.
        self.on_broken: Callable[[], None] | None = None
        self.closed = False

    def attach(self, nursery: trio.Nursery) -> None:
        """Flusher tasks run in ``nursery`` (the connection's) from now on."""
        self.nursery = nursery
        if self.outbox and not self._flushing:
            self._flushing = True
            self._drained = trio.Event()
            nursery.start_soon(self._flush)

    async def recv(self) -> bytes:
        """What the peer sent (b"" once it closed or the socket broke)."""
        while True:
            # Wait first: right after a frame was handled, the next one is
            # rarely there yet, and a recv that fails costs a system call.
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (trio.ClosedResourceError, OSError):
                return b""
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                return b""

    def write(self, data: bytes | memoryview) -> None:
        """Send ``data`` now, or queue it behind what is already queued."""
        if self.broken or self.closed:
            return
        outbox = self.outbox
        if not outbox.frames:  # a plain attribute: this runs for every frame
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._break()
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        outbox.append(data)
        if not self._flushing and self.nursery is not None:
            self._flushing = True
            self._drained = trio.Event()
            self.nursery.start_soon(self._flush)

    def discard_queued(self) -> None:
        """Drop what is queued, except the rest of a frame already begun."""
        self.outbox.discard()

    async def drain(self) -> None:
        """Wait until everything queued was handed to the kernel (or the
        socket broke)."""
        await self._drained.wait()

    async def _flush(self) -> None:
        outbox = self.outbox
        try:
            while outbox and not self.broken:
                await trio.lowlevel.wait_writable(self.sock)
                while outbox:
                    try:
                        sent = self.sock.send(outbox.head())
                    except BlockingIOError:
                        break
                    except OSError:
                        self._break()
                        return
                    if not outbox.sent(sent):
                        break
        except (trio.ClosedResourceError, OSError):
            self._break()
        finally:
            self._flushing = False
            self._drained.set()

    def _break(self) -> None:
        self.broken = True
        self.outbox.clear()
        self._drained.set()
        if self.on_broken is not None:
            callback, self.on_broken = self.on_broken, None
            callback()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.outbox.clear()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
