"""The WebSocket listener, and the tasks that serve every connection at once.

:func:`serve_ws` binds the port, accepts sockets and runs each one
(:func:`handle_socket`: the HTTP upgrade, then a
:class:`~chatd.net.ws_session.WsConnection`) in the server's nursery.
Guarantees:

* One connection's failure is logged and closes that socket only; the
  listener and the other connections go on. Running out of file
  descriptors or memory pauses accepting briefly instead of stopping it.
* An upgrade gets :data:`HANDSHAKE_TIMEOUT` seconds; a rejected one is
  answered (bounded by ``CLOSE_TIMEOUT``) and closed.
* Over the per-address cap (:class:`AddressCap`) a socket is still upgraded,
  so that a browser can read why: the error frame, then 4029.
* Timers for every connection run on one task each, not one per
  connection: :class:`Deadlines` (auth deadlines, token expiries) and
  :func:`keepalive` (pings every :data:`PING_INTERVAL` seconds; a peer
  silent for a whole round is dropped with 1001).
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import socket
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import trio

from chatd.core import frames
from chatd.net import websocket as wsp
from chatd.net.clientip import Network, client_ip
from chatd.net.ws_close import CLOSE_TIMEOUT, CLOSE_TOO_MANY
from chatd.net.ws_link import WsLink
from chatd.net.ws_outbox import OutboxBudget
from chatd.net.ws_session import WsConnection
from chatd.net.ws_transport import Transport
from chatd.service import ChatService

log = logging.getLogger("chatd.ws")

#: Seconds between keepalive pings; a peer that has sent nothing (not even a
#: pong) by the next round is dropped. Proxies need read timeouts above this.
PING_INTERVAL = 30.0
#: Seconds for the HTTP upgrade request.
HANDSHAKE_TIMEOUT = 10.0


class Deadlines:
    """Auth deadlines and token expiries of every connection, on one timer
    task (:meth:`run`) instead of a cancel scope around each read. Entries
    are never removed: one that is no longer a connection's deadline is
    ignored when it comes up (:meth:`WsLink.deadline_passed`). They
    hold the connection weakly: a token may expire an hour after its
    connection ended, which must not keep the connection alive."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[WsLink]]] = []
        self._count = 0
        self._changed = trio.Event()

    def add(self, when: float, conn: WsLink) -> None:
        if when == math.inf:
            return
        self._count += 1
        earliest = self._heap[0][0] if self._heap else math.inf
        heapq.heappush(self._heap, (when, self._count, weakref.ref(conn)))
        if when < earliest:
            self._changed.set()

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                when, _, ref = heapq.heappop(self._heap)
                conn = ref()
                if conn is not None:
                    conn.deadline_passed(when)
            self._changed = trio.Event()
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                await self._changed.wait()


@dataclass
class AddressCap:
    """At most ``per_ip`` live WebSockets per client address on this replica
    (0: no cap); the address as :func:`chatd.net.clientip.client_ip` reads it."""

    per_ip: int = 0
    proxies: tuple[Network, ...] = ()
    live: dict[str, int] = field(default_factory=dict)

    def address(self, sock: socket.socket, headers: dict[str, str]) -> str:
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            peer = ""
        return client_ip(peer, headers.get("x-forwarded-for"), self.proxies)

    def admit(self, address: str) -> bool:
        if self.per_ip and self.live.get(address, 0) >= self.per_ip:
            return False
        self.live[address] = self.live.get(address, 0) + 1
        return True

    def leave(self, address: str) -> None:
        left = self.live.get(address, 0) - 1
        if left > 0:
            self.live[address] = left
        else:
            self.live.pop(address, None)


async def handle_socket(
    sock: socket.socket,
    *,
    service: ChatService,
    connections: set[WsConnection],
    deadlines: Deadlines,
    auth_timeout: float,
    rate: float,
    burst: float,
    origins: wsp.OriginPolicy | None = None,
    cap: AddressCap | None = None,
    budget: OutboxBudget | None = None,
) -> None:
    """One accepted socket: the upgrade, then the connection until it ends."""
    if budget is not None and budget.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, budget.sndbuf)
    transport = Transport(sock, budget)
    address: str | None = None
    try:
        shake = wsp.Handshake("/ws", origins)
        result: wsp.Upgrade | wsp.Reject | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            while result is None:
                data = await transport.recv()
                if not data:
                    return
                result = shake.feed(data)
        if result is None:
            return  # no request within the timeout
        if isinstance(result, wsp.Reject):
            async with trio.open_nursery() as nursery:
                transport.attach(nursery)
                transport.write(result.response)
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await transport.drain()
            return
        transport.write(result.response)
        if cap is not None:
            candidate = cap.address(sock, result.headers)
            if not cap.admit(candidate):
                # Upgraded, so that a browser can read why: the error, then 4029.
                error = frames.error("rate_limited", "too many connections from this address")
                transport.write(wsp.text_frame(frames.encode(error)))
                transport.write(wsp.close_frame(CLOSE_TOO_MANY, "too many connections"))
                async with trio.open_nursery() as nursery:
                    transport.attach(nursery)
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await transport.drain()
                return
            address = candidate
        conn = WsConnection(
            transport,
            service,
            deadlines=deadlines,
            auth_timeout=auth_timeout,
            rate=rate,
            burst=burst,
        )
        connections.add(conn)
        service.metrics.ws_accepted.inc()
        service.metrics.ws_connections.inc()
        try:
            await conn.serve(result.rest)
        finally:
            connections.discard(conn)
            service.metrics.ws_connections.dec()
    except Exception:
        # One connection's bug must never take the server down with it.
        log.exception("connection failed")
    finally:
        if cap is not None and address is not None:
            cap.leave(address)
        transport.close()


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to), non-blocking."""
    socks: list[socket.socket] = []
    try:
        seen: set[tuple] = set()
        for family, type_, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                # Every address on the same (first) free port.
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(4096)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


#: accept() errors that mean "out of resources for now": wait, then go on.
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: accept() errors about one connection that is already gone: skip it.
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


def on_accept_error(code: int | None) -> Literal["pause", "skip", "raise"]:
    """What the accept loop does about an ``accept()`` that failed with ``code``."""
    if code in _ACCEPT_CAPACITY:
        return "pause"
    if code in _ACCEPT_SKIP:
        return "skip"
    return "raise"


async def _accept_loop(
    lsock: socket.socket,
    handler: Callable[[socket.socket], Awaitable[object]],
    nursery: trio.Nursery,
) -> None:
    while True:
        await trio.lowlevel.wait_readable(lsock)
        while True:  # take every connection that is waiting
            try:
                sock, _ = lsock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                action = on_accept_error(exc.errno)
                if action == "pause":
                    log.error("accept failed; pausing", extra={"reason": str(exc)})
                    await trio.sleep(0.1)
                    break
                if action == "skip":
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handler, sock)


async def keepalive(connections: set[WsConnection], interval: float = PING_INTERVAL) -> None:
    """Every ``interval``: ping each connection, dropping any that stayed
    silent since the previous ping (a dead phone, a cut cable)."""
    while True:
        await trio.sleep(interval)
        for conn in list(connections):
            conn.ping()


async def serve_ws(
    service: ChatService,
    host: str,
    port: int,
    *,
    handler_nursery: trio.Nursery,
    connections: set[WsConnection],
    auth_timeout: float,
    rate: float,
    burst: float,
    origins: wsp.OriginPolicy | None = None,
    cap: AddressCap | None = None,
    budget: OutboxBudget | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSockets until cancelled; each runs in ``handler_nursery``.
    Reports the port once listening. ``origins``: which web pages may
    connect (None: any)."""
    deadlines = Deadlines()
    handler = partial(
        handle_socket,
        service=service,
        connections=connections,
        deadlines=deadlines,
        auth_timeout=auth_timeout,
        rate=rate,
        burst=burst,
        origins=origins,
        cap=cap,
        budget=budget or OutboxBudget(),
    )
    socks = bind(host, port)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deadlines.run)
            for lsock in socks:
                nursery.start_soon(_accept_loop, lsock, handler, handler_nursery)
            task_status.started(socks[0].getsockname()[1])
    finally:
        for lsock in socks:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
