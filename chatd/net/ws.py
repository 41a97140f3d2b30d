"""The WebSocket adapter: one :class:`WsConnection` per socket.

Each connection runs in its own nursery (a child of the server's handler
nursery): a reader that parses frames and calls the service one frame at a
time, and a writer that drains the connection's bounded outbox onto the
socket. Live items from the hub go into the outbox without blocking; if it
overflows the connection is closed with 4008 and the device reconnects to
get what is owed.

Close codes: 4001 unauthorized, 4008 too slow, 1001 server going away,
1009 frame over the transport limit (1 MiB), 1011 internal error.
"""

from __future__ import annotations

import logging
import secrets
import time
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from chatd.core import frames
from chatd.core.errors import ChatError, NotFound, Unauthorized
from chatd.core.session import Outbound, Session, SlowConsumer
from chatd.service import ChatService

log = logging.getLogger("chatd.ws")

OUTBOX = 1024
#: Seconds between WebSocket pings; a peer that does not answer within the
#: next interval is dropped. Proxies need read timeouts above this.
PING_INTERVAL = 30.0
TRANSPORT_LIMIT = 1024 * 1024
CLOSE_UNAUTHORIZED = 4001
CLOSE_TOO_SLOW = 4008
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011


class WsConnection:
    def __init__(
        self,
        ws: WebSocketConnection,
        service: ChatService,
        *,
        auth_timeout: float,
        rate: float,
        burst: float,
    ) -> None:
        self.ws = ws
        self.service = service
        self.id = secrets.token_hex(8)
        self.user: str | None = None
        self.auth_timeout = auth_timeout
        self.session = Session(rate=rate, burst=burst, now=trio.current_time())
        self._out_send, self._out_recv = trio.open_memory_channel[str](OUTBOX)
        self._close: tuple[int, str] = (1000, "bye")
        self._closing = False
        self._read_scope: trio.CancelScope | None = None
        self._scope: trio.CancelScope | None = None

    # -- called from other tasks (hub, shutdown) -------------------------------------

    def offer(self, item: Outbound) -> None:
        try:
            for out in self.session.offer(item):
                self._out_send.send_nowait(out.text)
        except (trio.WouldBlock, SlowConsumer):
            log.warning("closing a slow connection", extra={"user": self.user, "conn": self.id})
            self._abort(CLOSE_TOO_SLOW, "too slow: reconnect to get what is owed")
        except trio.ClosedResourceError:
            pass  # closing; what was owed stays owed

    def close_soon(self, code: int, reason: str) -> None:
        """Stop reading, flush what is queued, then close with ``code``."""
        self._close = (code, reason)
        self._closing = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    def _abort(self, code: int, reason: str) -> None:
        """Close now, dropping the outbox."""
        self._close = (code, reason)
        if self._scope is not None:
            self._scope.cancel()

    # -- the connection's own tasks --------------------------------------------------

    async def serve(self) -> None:
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, nursery.cancel_scope)
                    nursery.start_soon(self._keepalive, nursery.cancel_scope)
                    try:
                        await self._read_loop()
                    finally:
                        self._out_send.close()  # the writer drains, then ends
        finally:
            self.session.closed()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    try:
                        await self.service.detach(self)
                    except ChatError as exc:
                        log.warning("detach failed", extra={"conn": self.id, "reason": exc.message})
                with trio.move_on_after(2):
                    await self.ws.aclose(*self._close)

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        """Drain the outbox onto the socket. It ends the connection's nursery
        when the outbox is closed and empty, or when the socket is gone."""
        try:
            async for text in self._out_recv:
                await self.ws.send_message(text)
        except ConnectionClosed:
            pass
        finally:
            scope.cancel()

    async def _keepalive(self, scope: trio.CancelScope) -> None:
        """WebSocket pings: keep proxies from timing out an idle connection and
        find peers that vanished without closing (a dead phone, a cut cable)."""
        while True:
            await trio.sleep(PING_INTERVAL)
            with trio.move_on_after(PING_INTERVAL) as wait:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if wait.cancelled_caught:
                log.info(
                    "closing a connection that stopped answering pings", extra={"conn": self.id}
                )
                self._close = (CLOSE_GOING_AWAY, "no pong")
                scope.cancel()
                return

    def _push(self, frame: dict) -> None:
        try:
            self._out_send.send_nowait(frames.encode(frame))
        except trio.WouldBlock:
            self._abort(CLOSE_TOO_SLOW, "too slow: reconnect to get what is owed")
        except trio.ClosedResourceError:
            pass

    async def _next(self) -> str | bytes | None:
        """The next client frame; None once the socket closed or we are closing."""
        if self._closing:
            return None
        with trio.CancelScope() as self._read_scope:
            try:
                return await self.ws.get_message()
            except ConnectionClosed:
                return None
        return None

    async def _read_loop(self) -> None:
        expires_at = await self._authenticate()
        if expires_at is None:
            return
        await self._start()
        # The connection lives as long as its token; then the client logs in again.
        with trio.move_on_after(max(0.0, expires_at - time.time())) as token_scope:
            while True:
                raw = await self._next()
                if raw is None:
                    return
                await self._handle(raw)
        if token_scope.cancelled_caught:
            self._push(frames.error("unauthorized", "token expired"))
            self._close = (CLOSE_UNAUTHORIZED, "token expired")

    async def _authenticate(self) -> float | None:
        """Wait for a good ``auth``; returns the token's expiry or None (closing)."""
        with trio.move_on_after(self.auth_timeout):
            while True:
                raw = await self._next()
                if raw is None:
                    return None
                try:
                    frame = frames.parse_client_frame(raw)
                    self.session.check(frame, trio.current_time())
                except ChatError as exc:
                    self._push(frames.error(exc.code, exc.message, exc.cid))
                    continue
                assert isinstance(frame, frames.Auth)
                try:
                    user, expires_at = await self.service.authenticate(frame.token)
                except Unauthorized as exc:
                    self._push(frames.error(exc.code, exc.message))
                    self._close = (CLOSE_UNAUTHORIZED, exc.message)
                    return None
                except ChatError as exc:
                    self._push(frames.error(exc.code, exc.message))
                    self._close = (CLOSE_INTERNAL, exc.message)
                    return None
                self.user = user
                self.session.authenticated(user)
                return expires_at
        self._push(frames.error("unauthorized", f"no auth within {self.auth_timeout:g} s"))
        self._close = (CLOSE_UNAUTHORIZED, "no auth")
        return None

    async def _start(self) -> None:
        """Attach, say ``ready``, offer the backlog, then go live."""
        assert self.user is not None
        await self.service.attach(self)
        await self._out_send.send(frames.encode(frames.ready(self.user, self.service.node)))
        try:
            backlog = await self.service.backlog(self.user)
        except ChatError as exc:
            # The store or broker is down: the device is online and gets live
            # traffic; what is owed stays owed for the next connection.
            self._push(frames.error(exc.code, f"backlog not available: {exc.message}"))
            backlog = []
        for item in self.session.backlog(backlog):
            await self._out_send.send(item.text)
        for item in self.session.finish_backlog():
            await self._out_send.send(item.text)

    async def _handle(self, raw: str | bytes) -> None:
        frame: frames.ClientFrame | None = None
        try:
            frame = frames.parse_client_frame(raw)
            self.session.check(frame, trio.current_time())
            match frame:
                case frames.Send():
                    await self.service.send(self, frame)
                case frames.Ack():
                    unknown = await self.service.ack(self, frame)
                    self.session.settled(list(frame.ids) + list(frame.receipts))
                    self._refuse_unknown(unknown)
                case frames.Seen():
                    unknown = await self.service.seen(self, frame)
                    self.session.settled(list(frame.ids))
                    self._refuse_unknown(unknown)
                case frames.Typing():
                    await self.service.typing(self, frame)
                case frames.Ping():
                    self._push(frames.pong())
        except ChatError as exc:
            self._push(frames.error(exc.code, exc.message, exc.cid))
        except Exception:
            log.exception("frame handling failed", extra={"user": self.user, "conn": self.id})
            cid = frame.cid if isinstance(frame, frames.Send) else None
            self._push(frames.error("internal", "internal error", cid))

    def _refuse_unknown(self, unknown: list[str]) -> None:
        if unknown:
            exc = NotFound("no such message for you")
            self._push(frames.error(exc.code, exc.message, ids=unknown))


async def handle_request(
    request: WebSocketRequest,
    *,
    service: ChatService,
    connections: set[WsConnection],
    auth_timeout: float,
    rate: float,
    burst: float,
) -> None:
    if request.path.split("?", 1)[0] != "/ws":
        await request.reject(404, body=b"not found: the WebSocket path is /ws")
        return
    ws = await request.accept()
    conn = WsConnection(ws, service, auth_timeout=auth_timeout, rate=rate, burst=burst)
    connections.add(conn)
    try:
        await conn.serve()
    finally:
        connections.discard(conn)


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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for WebSockets; handlers run in ``handler_nursery``. Reports the port."""
    handler = partial(
        handle_request,
        service=service,
        connections=connections,
        auth_timeout=auth_timeout,
        rate=rate,
        burst=burst,
    )

    async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await serve_websocket(
            handler,
            host,
            port,
            None,
            handler_nursery=handler_nursery,
            max_message_size=TRANSPORT_LIMIT,
            message_queue_size=8,
            # A TCP connection that never finishes the handshake, or never
            # answers our close, must not hold a handler for long.
            connect_timeout=10,
            disconnect_timeout=5,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run)
        task_status.started(server.port)
