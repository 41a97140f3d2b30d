"""The WebSocket adapter: one :class:`WsConnection` per socket.

Each connection runs in its own nursery (a child of the server's handler
nursery): a reader that parses frames and calls the service one frame at a
time, and a writer that drains the connection's bounded outbox onto the
socket. Live items from the hub go into the outbox without blocking; if it
overflows the connection is closed with 4008 and the device reconnects to
get what is owed.

Close codes: 4001 unauthorized, 4008 too slow, 1001 server going away,
1011 internal error. Oversize frames do not close the connection: they are
discarded while they arrive and answered with ``too_large``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from functools import partial

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)
from wsproto import ConnectionType, WSConnection

from chatd.core import frames
from chatd.core.errors import BadRequest, ChatError, NotFound, Unauthorized
from chatd.core.session import Outbound, Session, SlowConsumer
from chatd.service import ChatService

log = logging.getLogger("chatd.ws")

OUTBOX = 1024
#: A client frame larger than this is read and thrown away as it arrives (it
#: is never buffered) and answered with ``too_large``; the connection stays.
DISCARD_OVER = frames.MAX_FRAME_BYTES + 1
#: Seconds between WebSocket pings; a peer that does not answer within the
#: next interval is dropped. Proxies need read timeouts above this.
PING_INTERVAL = 30.0
#: Seconds a dropped connection's writer gets to finish the frame in hand.
DROP_GRACE = 5.0
CLOSE_UNAUTHORIZED = 4001
CLOSE_TOO_SLOW = 4008
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011

#: Frame class -> the type counted in chatd_frames_in_total.
_FRAME_TYPES: dict[type, str] = {
    frames.Auth: "auth",
    frames.Send: "send",
    frames.Ack: "ack",
    frames.Seen: "seen",
    frames.Typing: "typing",
    frames.Ping: "ping",
}


class WsConnection:
    """One WebSocket: its session, its outbox, and the tasks that serve it.

    Closing has two speeds. :meth:`close_soon` (shutdown, token expiry)
    stops reading, lets the writer flush the outbox, then closes.
    :meth:`_drop` (slow consumer, dead peer) discards the outbox; the writer
    still finishes the frame it is writing, so a close never cuts a frame in
    half, and a peer that cannot take even that is cut off after a timeout.
    """

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
        self._frames_in = service.metrics.frames_in
        self._frame_out = service.metrics.frame_out
        self.id = secrets.token_hex(8)
        self.user: str | None = None
        self.auth_timeout = auth_timeout
        self.session = Session(rate=rate, burst=burst, now=trio.current_time())
        self._out_send, self._out_recv = trio.open_memory_channel[str](OUTBOX)
        self._close: tuple[int, str] = (1000, "bye")
        self._closing = False
        self._dropping = False
        self._read_scope: trio.CancelScope | None = None
        self._scope: trio.CancelScope | None = None

    # -- called from other tasks (hub, shutdown) -------------------------------------

    def offer(self, item: Outbound) -> None:
        try:
            for out in self.session.offer(item):
                self._out_send.send_nowait(out.text)
        except (trio.WouldBlock, SlowConsumer):
            log.warning("closing a slow connection", extra={"user": self.user, "conn": self.id})
            self._drop(CLOSE_TOO_SLOW, "too slow: reconnect to get what is owed")
        except trio.ClosedResourceError:
            pass  # closing; what was owed stays owed

    def close_soon(self, code: int, reason: str) -> None:
        """Stop reading, flush what is queued, then close with ``code``."""
        if not self._closing:
            self._close = (code, reason)
        self._closing = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    def reply(self, item: Outbound) -> None:
        """A direct answer to this device (``sent``): never held, never deduplicated."""
        self._send_now(item.text)

    def _drop(self, code: int, reason: str) -> None:
        """Close without flushing: what was owed stays owed for the next connection.

        The writer may finish the frame it is writing; a peer that does not
        take it within DROP_GRACE seconds is cut off.
        """
        self._dropping = True
        self.close_soon(code, reason)
        self._close = (code, reason)
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + DROP_GRACE)

    # -- the connection's own tasks --------------------------------------------------

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop, nursery.cancel_scope)
                nursery.start_soon(self._keepalive)
                try:
                    await self._read_loop(nursery)
                except Exception:
                    # A bug in one connection: tell the device, close with 1011
                    # (clients reconnect); never take the server down.
                    log.exception("connection failed", extra={"user": self.user, "conn": self.id})
                    self._push(frames.error("internal", "internal error"))
                    self._close = (CLOSE_INTERNAL, "internal error")
                finally:
                    self._out_send.close()  # the writer drains (or drops), then ends
        finally:
            self.session.closed()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    try:
                        await self.service.detach(self)
                    except ChatError as exc:
                        log.warning("detach failed", extra={"conn": self.id, "reason": exc.message})
                # A peer that cannot take the close frame is cut off (1006).
                with trio.move_on_after(2):
                    await self.ws.aclose(*self._close)

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        """Drain the outbox onto the socket; when the outbox is closed and empty,
        or the socket is gone, end the connection's other tasks."""
        try:
            async for text in self._out_recv:
                if self._dropping:
                    break
                # Counted as it is handed to the socket (a send that then fails
                # on a closed connection is counted too).
                self._frame_out(text)
                await self.ws.send_message(text)
        except ConnectionClosed:
            self.close_soon(1000, "bye")
        finally:
            scope.cancel()

    async def _keepalive(self) -> None:
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
                    "dropping a connection that stopped answering pings", extra={"conn": self.id}
                )
                self._drop(CLOSE_GOING_AWAY, "no pong")
                return

    def _push(self, frame: dict) -> None:
        self._send_now(frames.encode(frame))

    def _send_now(self, text: str) -> None:
        try:
            self._out_send.send_nowait(text)
        except trio.WouldBlock:
            self._drop(CLOSE_TOO_SLOW, "too slow: reconnect to get what is owed")
        except trio.ClosedResourceError:
            pass

    async def _next(self, deadline: float = math.inf) -> str | bytes | None:
        """The next client frame; None once the socket closed, we are closing,
        or ``deadline`` (trio time) passed while waiting."""
        if self._closing:
            return None
        with trio.CancelScope(deadline=deadline) as self._read_scope:
            try:
                return await self.ws.get_message()
            except ConnectionClosed:
                self._closing = True
                return None
        return None

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        expires_at = await self._authenticate()
        if expires_at is None:
            return
        try:
            await self._start(nursery)
        except ChatError as exc:
            self._push(frames.error(exc.code, exc.message))
            self._close = (CLOSE_INTERNAL, "could not start the session")
            return
        # The connection lives as long as its token (then the client logs in
        # again). Expiry is only noticed between frames: a frame in hand is
        # always answered.
        deadline = trio.current_time() + max(0.0, expires_at - time.time())
        while True:
            raw = await self._next(deadline)
            if raw is None:
                break
            await self._handle(raw)
        if not self._closing and trio.current_time() >= deadline:
            self._push(frames.error("unauthorized", "token expired"))
            self._close = (CLOSE_UNAUTHORIZED, "token expired")

    async def _authenticate(self) -> float | None:
        """Wait for a good ``auth``; returns the token's expiry or None (closing)."""
        deadline = trio.current_time() + self.auth_timeout
        while True:
            raw = await self._next(deadline)
            if raw is None:
                break
            try:
                frame = self._parse(raw)
            except Unauthorized as exc:  # an ``auth`` without a usable token
                return self._refuse(exc)
            except ChatError as exc:
                self._push(frames.error(exc.code, exc.message, exc.cid))
                continue
            try:
                self.session.check(frame, trio.current_time())
            except ChatError as exc:  # anything but auth: refused, keep waiting
                self._push(frames.error(exc.code, exc.message, exc.cid))
                continue
            assert isinstance(frame, frames.Auth)
            try:
                user, expires_at = await self.service.authenticate(frame.token)
            except Unauthorized as exc:
                return self._refuse(exc)
            except ChatError as exc:
                self._push(frames.error(exc.code, exc.message))
                self._close = (CLOSE_INTERNAL, "could not check the token")
                return None
            self.user = user
            self.session.authenticated(user)
            return expires_at
        if not self._closing and trio.current_time() >= deadline:
            self._push(frames.error("unauthorized", f"no auth within {self.auth_timeout:g} s"))
            self._close = (CLOSE_UNAUTHORIZED, "no auth")
        return None

    def _parse(self, raw: str | bytes) -> frames.ClientFrame:
        """Parse a client frame and count it (by type, or as invalid)."""
        try:
            frame = frames.parse_client_frame(raw)
        except ChatError:
            self._frames_in["invalid"].inc()
            raise
        self._frames_in[_FRAME_TYPES[type(frame)]].inc()
        return frame

    def _refuse(self, exc: ChatError) -> None:
        self._push(frames.error(exc.code, exc.message))
        self._close = (CLOSE_UNAUTHORIZED, exc.message)

    async def _start(self, nursery: trio.Nursery) -> None:
        """Attach, say ``ready``, then offer the backlog in its own task.

        The backlog runs beside the reader, so the device's acks (and the
        transport's pongs) are taken while a long backlog streams out.
        """
        assert self.user is not None
        await self.service.attach(self)
        await self._out_send.send(frames.encode(frames.ready(self.user, self.service.node)))
        nursery.start_soon(self._backlog)

    async def _backlog(self) -> None:
        assert self.user is not None

        async def emit(items: list[Outbound]) -> None:
            for item in self.session.backlog(items):
                await self._out_send.send(item.text)

        try:
            try:
                await self.service.backlog(self.user, emit)
            except ChatError as exc:
                # The store is down: the device is online and gets live traffic;
                # what is owed stays owed for the next connection.
                self._push(frames.error(exc.code, f"backlog not available: {exc.message}"))
            for item in self.session.finish_backlog():
                await self._out_send.send(item.text)
        except trio.ClosedResourceError:
            pass  # the connection is closing

    async def _handle(self, raw: str | bytes) -> None:
        frame: frames.ClientFrame | None = None
        try:
            try:
                frame = self._parse(raw)
            except Unauthorized:  # an ``auth`` frame, here after authentication
                raise BadRequest("already authenticated") from None
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


class _BoundedConnection(WebSocketConnection):
    """A server connection that never buffers more than ``DISCARD_OVER`` bytes
    of one message: the rest is dropped as it arrives, and the reader gets
    :data:`chatd.core.frames.OVERSIZE` in its place. (trio-websocket itself would close the
    connection with 1009 instead, after buffering up to its own limit.)

    Relies on trio-websocket's ``_handle_message_event``; the version range is
    pinned in setup.cfg and tests/e2e/test_bad_input.py checks the behaviour.
    """

    _discarding = False

    async def _handle_message_event(self, event) -> None:  # type: ignore[override]
        if self._discarding or self._message_size + len(event.data) > DISCARD_OVER:
            self._discarding = True
            self._message_parts = []
            self._message_size = 0
            if event.message_finished:
                self._discarding = False
                try:
                    await self._send_channel.send(frames.OVERSIZE)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
            return
        await super()._handle_message_event(event)


class _BoundedServer(WebSocketServer):
    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        # As WebSocketServer._handle_connection, with _BoundedConnection.
        async with trio.open_nursery() as nursery:
            connection = _BoundedConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()


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
    service.metrics.ws_accepted.inc()
    service.metrics.ws_connections.inc()
    try:
        await conn.serve()
    except Exception:
        # One connection's bug must never take the server down with it.
        log.exception("connection failed", extra={"user": conn.user, "conn": conn.id})
    finally:
        connections.discard(conn)
        service.metrics.ws_connections.dec()


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

    listeners = await trio.open_tcp_listeners(port, host=host)
    server = _BoundedServer(
        handler,
        listeners,
        handler_nursery=handler_nursery,
        message_queue_size=8,
        max_message_size=2 * DISCARD_OVER,  # never reached: see _BoundedConnection
        # A TCP connection that never finishes the handshake, or never answers
        # our close, must not hold a handler for long.
        connect_timeout=10,
        disconnect_timeout=5,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        task_status.started(server.port)
