"""Real outages of a broker's backend server, for the broker outage contract
(:mod:`chatd.testing.broker_outage`).

Where :mod:`chatd.testing.outage` makes a client library fail from the
inside, these take a real server away: its process killed or stopped, or
the network path to it cut by a TCP proxy (:class:`TcpProxy`) the broker
connects through. Each kind in :data:`SERVER_FAILURES` is a way a server
goes away in production:

* ``killed``: the process dies (SIGKILL). Its connections reset, new ones
  are refused; it comes back on the same port with what it persisted (a
  throwaway server: nothing).
* ``hung``: the process is stopped (SIGSTOP). The kernel still accepts
  connections, nothing answers; it resumes (SIGCONT) with its data, and
  runs whatever reached it meanwhile.
* ``partitioned``: the network between broker and server drops everything.
  Connections stay open and new ones are accepted (by the proxy), but no
  byte passes either way until the partition heals; then what was held
  goes through, late.
* ``refused``: the path refuses: every connection is reset and new ones
  are refused (the proxy stops listening). The server itself is fine and
  keeps its data.

The server is anything with ``kill()``, ``start()``, ``freeze()`` (SIGSTOP)
and ``thaw()`` (SIGCONT) — :class:`ServerProcess`; the source tree's
``harness.redis_server.RedisServer`` is one. Nothing here knows Redis::

    async with server_outage("hung", server, server.host, server.port) as outage:
        broker = RedisBroker.from_url(f"redis://{outage.host}:{outage.port}", ...)
        outage.begin()  # ... the server hangs ...
        outage.end()
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

__all__ = [
    "SERVER_FAILURES",
    "ServerOutage",
    "ServerProcess",
    "TcpProxy",
    "server_outage",
]


#: The kinds of server outage (see the module docstring), each with what it is.
SERVER_FAILURES: dict[str, str] = {
    "killed": "the server process died (SIGKILL): connections reset, new ones refused",
    "hung": "the server process is stopped (SIGSTOP): connections accepted, nothing answers",
    "partitioned": "the network drops every byte both ways; connections stay open",
    "refused": "the path resets every connection and refuses new ones; the server is fine",
}

#: The kinds made by a proxy between broker and server.
_PROXIED = frozenset({"partitioned", "refused"})


class ServerProcess(Protocol):
    """A backend server process a test controls."""

    def kill(self) -> None: ...

    def start(self) -> object: ...

    def freeze(self) -> None: ...

    def thaw(self) -> None: ...


class ServerOutage:
    """The switch of one kind of outage of one server (a
    :class:`chatd.testing.broker_outage.Switch`). Connect the broker to
    :attr:`host`:\\ :attr:`port`: the server's own address, or the proxy's
    for the kinds a proxy makes."""

    def __init__(
        self, kind: str, server: ServerProcess, host: str, port: int, proxy: TcpProxy | None
    ) -> None:
        self.kind = kind
        self.server = server
        self.host = host
        self.port = port
        self.proxy = proxy
        self.down = False

    def begin(self) -> None:
        if self.down:
            return
        self.down = True
        if self.kind == "killed":
            self.server.kill()
        elif self.kind == "hung":
            self.server.freeze()
        elif self.proxy is not None and self.kind == "partitioned":
            self.proxy.partition()
        elif self.proxy is not None and self.kind == "refused":
            self.proxy.refuse()

    def end(self) -> None:
        if not self.down:
            return
        self.down = False
        if self.kind == "killed":
            self.server.start()
        elif self.kind == "hung":
            self.server.thaw()
        elif self.proxy is not None and self.kind == "partitioned":
            self.proxy.heal()
        elif self.proxy is not None and self.kind == "refused":
            self.proxy.accept()


@asynccontextmanager
async def server_outage(
    kind: str, server: ServerProcess, host: str, port: int
) -> AsyncIterator[ServerOutage]:
    """The switch for ``kind`` (one of :data:`SERVER_FAILURES`) of the
    server listening on ``host``:``port``; for the kinds a proxy makes, the
    proxy runs until the block ends. The outage is ended on the way out."""
    if kind not in SERVER_FAILURES:
        raise ValueError(f"unknown kind of outage {kind!r}: one of {sorted(SERVER_FAILURES)}")
    if kind not in _PROXIED:
        outage = ServerOutage(kind, server, host, port, None)
        try:
            yield outage
        finally:
            outage.end()
        return
    proxy = TcpProxy(host, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        outage = ServerOutage(kind, server, proxy.host, proxy.port, proxy)
        try:
            yield outage
        finally:
            outage.end()
            nursery.cancel_scope.cancel()


def _reset(stream: trio.SocketStream) -> None:
    """Close with a reset (RST), as a path that refuses does, not a FIN."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()


class TcpProxy:
    """A TCP proxy on ``host`` (a free port) to ``upstream_host``:
    ``upstream_port``, run with ``await nursery.start(proxy.run)``. Its
    switches are synchronous and take effect at once: :meth:`partition` /
    :meth:`heal`, :meth:`refuse` / :meth:`accept`."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        #: The port it listens on (chosen by :meth:`run`, kept across :meth:`refuse`).
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self._refusing = False
        self._streams: set[trio.SocketStream] = set()
        self._listener: trio.SocketListener | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._listen()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._close_all()

    # -- switches ------------------------------------------------------------------------

    def partition(self) -> None:
        """From now on no byte passes, either way, on any connection."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def heal(self) -> None:
        """Bytes pass again (what was held first)."""
        self._flowing.set()

    def refuse(self) -> None:
        """Reset every connection and refuse new ones."""
        self._refusing = True
        self._close_all()

    def accept(self) -> None:
        """Accept connections again, on the same port."""
        if self._refusing:
            self._refusing = False
            self._listen()

    # -- the proxy -----------------------------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = int(sock.getsockname()[1])
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        if self._nursery is None:
            raise RuntimeError("run the proxy first: await nursery.start(proxy.run)")
        self._nursery.start_soon(self._accept, self._listener)

    def _close_all(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.socket.close()
        for stream in list(self._streams):
            _reset(stream)
        self._streams.clear()

    async def _accept(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                client = await listener.accept()
            except (trio.ClosedResourceError, OSError):
                return
            if self._nursery is not None:
                self._nursery.start_soon(self._serve, client)

    async def _serve(self, client: trio.SocketStream) -> None:
        streams = [client]
        self._streams.add(client)
        try:
            if self._refusing:
                return
            await self._flowing.wait()  # a partition holds the connection before the server
            try:
                upstream = await trio.open_tcp_stream(*self.upstream)
            except OSError:
                return  # the server refuses: the client's connection closes
            streams.append(upstream)
            self._streams.add(upstream)
            if self._refusing:
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
        finally:
            for stream in streams:
                self._streams.discard(stream)
                if self._refusing:
                    _reset(stream)
                else:
                    stream.socket.close()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.receive_some(65536)
                if not data:
                    return
                await self._flowing.wait()  # read just before a partition: held until it heals
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            scope.cancel()
