"""One WebSocket after its handshake, on the wire: :class:`WsLink`, the base of
:class:`~chatd.net.ws_session.WsConnection` (which gives its frames their meaning).

Guarantees:

* **One task per connection.** It reads what the socket has, turns it into
  frames (:mod:`chatd.net.websocket`) and handles them in order. Nothing
  passes a frame to another task.
* A device gets its answers in the order of its frames: an answer waits
  behind the writes (sends, acks, seen reports) still to be answered, and
  the reader waits once :data:`MAX_INFLIGHT` of them are queued (back
  pressure).
* A device that cannot keep up with its outbox
  (:func:`~chatd.net.ws_outbox.too_slow`) is dropped with 4008; what was
  owed stays owed and comes with its next ``ready``.
* Closing has two speeds (:class:`WsLink`), and never cuts a frame in half;
  nothing is written after our close frame.
* Oversize messages do not close the connection: they are dropped as they
  arrive (:data:`DISCARD_OVER`, never buffered) and answered with ``too_large``.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import TYPE_CHECKING

import trio

from chatd.core import frames
from chatd.core.errors import ChatError
from chatd.core.session import Outbound, Session, SlowConsumer
from chatd.net import websocket as wsp
from chatd.net import ws_close as close
from chatd.net.ws_close import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_TIMEOUT,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    DROP_GRACE,
)
from chatd.net.ws_outbox import too_slow
from chatd.net.ws_transport import Transport
from chatd.service import ChatService

if TYPE_CHECKING:
    from chatd.net.ws_listen import Deadlines

log = logging.getLogger("chatd.ws")

#: A client message larger than this is dropped as it arrives (it is never
#: buffered) and answered with ``too_large``; the connection stays.
DISCARD_OVER = frames.MAX_FRAME_BYTES + 1
#: Writes (sends, acks, seen reports) one connection may have queued at once
#: before its reader waits for them to commit.
MAX_INFLIGHT = 256

_PING = wsp.ping_frame(b"chatd")


class WsLink:
    """One WebSocket after its handshake: its socket, its read loop, its writes
    and its closing. What a frame means is :meth:`_handle`'s (a subclass's).

    Closing has two speeds. :meth:`close_soon` (shutdown, token expiry)
    stops reading, lets what is queued go out, then closes. :meth:`_drop`
    (slow consumer, dead peer) discards what is queued but the rest of a
    frame already begun, so a close never cuts a frame in half; a peer that
    cannot take even that is cut off after :data:`DROP_GRACE` seconds.
    """

    def __init__(
        self,
        transport: Transport,
        service: ChatService,
        *,
        deadlines: Deadlines,
        auth_timeout: float,
        rate: float,
        burst: float,
    ) -> None:
        self.transport = transport
        self.deadlines = deadlines
        self.service = service
        self._frames_in = service.metrics.frames_in
        self._frame_out = service.metrics.frame_out
        self.id = secrets.token_hex(8)
        self.user: str | None = None
        #: The id of the token this connection authenticated with (logout closes it).
        self.token_id: str | None = None
        #: The end-to-end device this connection speaks for (an active one
        #: named in ``auth``), else None.
        self.device: str | None = None
        self.auth_timeout = auth_timeout
        self.session = Session(rate=rate, burst=burst, now=trio.current_time())
        self.reader = wsp.FrameReader(DISCARD_OVER)
        self._close: tuple[int, str] = (close.CLOSE_NORMAL, "bye")
        self._closing = False
        self._dropping = False
        self._peer_closed = False
        #: The deadline in force (auth, then token expiry), trio time.
        self.deadline = math.inf
        #: One cancel scope for the whole read loop (a scope per read costs
        #: ~10 µs); it is cancelled only while the reader waits for bytes.
        self._read_scope: trio.CancelScope | None = None
        self._waiting = False
        #: Writes queued for this connection whose answers are still to come.
        self._inflight = 0
        self._inflight_lot = trio.lowlevel.ParkingLot()
        self._expired = False
        self._scope: trio.CancelScope | None = None
        #: Keepalive: set by each ping round, cleared by anything received.
        self.awaiting_pong = False
        #: Set once our close frame is written: nothing may follow it.
        self._close_sent = False
        transport.on_broken = self._peer_gone

    # -- called from other tasks (hub, shutdown, keepalive) ---------------------------

    def offer(self, item: Outbound) -> None:
        try:
            for out in self.session.offer(item):
                self._write(out.data)
        except SlowConsumer:
            self._too_slow()

    def reply(self, item: Outbound) -> None:
        """A direct answer to this device (``sent``): never held, never deduplicated."""
        self._write(item.data)

    def hold(self) -> None:
        self._inflight += 1

    def release(self) -> None:
        self._inflight -= 1
        if self._inflight_lot and (self._inflight < MAX_INFLIGHT // 2 or self._closing):
            self._inflight_lot.unpark_all()

    def close_soon(self, code: int, reason: str) -> None:
        """Stop reading, send what is queued, then close with ``code``."""
        if not self._closing:
            self._close = (code, reason)
        self._closing = True
        # Only a reader waiting for bytes is interrupted; one handling a frame
        # finishes it and then sees _closing.
        if self._waiting and self._read_scope is not None:
            self._read_scope.cancel()

    def deadline_passed(self, when: float) -> None:
        """Called by :class:`~chatd.net.ws_listen.Deadlines`: the auth deadline
        or the token's expiry, if it is still the one in force. The frame in
        hand (if any) is answered first; the error frame follows it (see
        _read_loop)."""
        if when == self.deadline and not self._closing:
            self._expired = True
            self.close_soon(CLOSE_UNAUTHORIZED, "expired")

    def ping(self) -> None:
        """One keepalive round: drop a peer silent since the last round, else ping."""
        if self._closing:
            return
        if self.awaiting_pong:
            log.info("dropping a connection that stopped answering pings", extra={"conn": self.id})
            self._drop(CLOSE_GOING_AWAY, "no pong")
            return
        self.awaiting_pong = True
        self.transport.write(_PING)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, payload: bytes) -> None:
        if self._dropping or self._close_sent:
            return
        # Counted as it is handed to the socket.
        self._frame_out(payload)
        self.transport.write(wsp.text_frame(payload))
        out = self.transport.outbox
        # Nothing queued (the common case): nothing can be too slow.
        if out.frames and too_slow(out.frames, out.bytes, out.budget):
            self._too_slow()

    def _push(self, frame: dict) -> None:
        """An answer from this connection's reader. While earlier frames'
        writes are still to be answered, it waits its turn behind them, so
        a device gets its answers in the order of its frames."""
        data = frames.encode(frame)
        if not self._inflight:
            self._write(data)
            return
        self.hold()

        def in_turn() -> None:
            self.release()
            self._write(data)

        self.service.after_writes(in_turn)

    def _too_slow(self) -> None:
        log.warning("closing a slow connection", extra={"user": self.user, "conn": self.id})
        self._drop(CLOSE_TOO_SLOW, "too slow: reconnect to get what is owed")

    def _drop(self, code: int, reason: str) -> None:
        """Close without sending what is queued: what was owed stays owed."""
        if self._dropping:
            return
        self._dropping = True
        self.close_soon(code, reason)
        self._close = (code, reason)
        self.transport.discard_queued()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + DROP_GRACE)

    def _close_after_frame(self, code: int, reason: str) -> None:
        """Close with ``code`` once the frame in hand is handled (the reader stops then)."""
        self._close = (code, reason)
        self._closing = True

    def _peer_gone(self) -> None:
        self._peer_closed = True
        self.close_soon(*close.LOST)

    # -- the connection's own task ------------------------------------------------------

    async def serve(self, initial: bytes) -> None:
        """Serve until the connection ends; ``initial``: bytes that came with
        the upgrade request."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self.transport.attach(nursery)
                try:
                    await self._read_loop(nursery, initial)
                except Exception:
                    # A bug in one connection: tell the device, close with 1011
                    # (clients reconnect); never take the server down.
                    log.exception("connection failed", extra={"user": self.user, "conn": self.id})
                    self._push(frames.error("internal", "internal error"))
                    self._close = (CLOSE_INTERNAL, "internal error")
                self.session.closed()  # no more live items
                await self._finish()
                nursery.cancel_scope.cancel()  # a backlog still running
        finally:
            self.session.closed()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    try:
                        await self.service.detach(self)
                    except ChatError as exc:
                        log.warning("detach failed", extra={"conn": self.id, "reason": exc.message})
            self.transport.close()

    async def _finish(self) -> None:
        """The closing handshake: our close frame after what is queued, then
        the peer's (bounded), then the socket closes."""
        t = self.transport
        if t.broken:
            return
        code, reason = self._close
        if not close.handshakes(code):
            return
        if self._inflight and not self._dropping:
            # Frames taken before the close are answered before it.
            with trio.move_on_after(CLOSE_TIMEOUT * 5):
                while self._inflight:
                    await self._inflight_lot.park()
        t.write(wsp.close_frame(code, reason))
        self._close_sent = True
        with trio.move_on_after(close.drain_timeout(self._dropping)):
            await t.drain()
        if self._peer_closed or t.broken:
            return
        with trio.move_on_after(CLOSE_TIMEOUT):
            while True:
                data = await t.recv()
                if not data:
                    return
                for event in self.reader.feed(data):
                    if isinstance(event, (wsp.Close, wsp.ProtocolError)):
                        return

    async def _events(self) -> list[wsp.Event] | None:
        """The next events from the socket; None once the peer closed or we
        are closing (a deadline passed, shutdown, a drop)."""
        if self._closing:
            return None
        self._waiting = True
        try:
            data = await self.transport.recv()
        finally:
            self._waiting = False
        if not data:
            self._peer_closed = True
            self._closing = True
            self._close = close.LOST
            return None
        self.awaiting_pong = False
        return self.reader.feed(data)

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        self.deadlines.add(when, self)

    async def _read_loop(self, nursery: trio.Nursery, initial: bytes) -> None:
        self._set_deadline(trio.current_time() + self.auth_timeout)
        pending = self.reader.feed(initial) if initial else []
        with trio.CancelScope() as self._read_scope:
            while True:
                events = pending or await self._events()
                pending = []
                if events is None:
                    break
                for event in events:
                    if not await self._on_event(event, nursery):
                        break
        self._read_scope = None
        if not self._expired:
            return
        # A frame in hand was answered; now the reason, then 4001.
        message, closing = close.on_deadline(self.user is not None, self.auth_timeout)
        self._push(frames.error("unauthorized", message))
        self._close = closing

    async def _on_event(self, event: wsp.Event, nursery: trio.Nursery) -> bool:
        """Handle one event; False when the connection is to close."""
        if self._closing:
            return False
        match event:
            case wsp.Text(data=data):
                await self._handle(data, nursery)
            case wsp.Binary(data=data):
                await self._handle(data, nursery)
            case wsp.Oversize():
                await self._handle(frames.OVERSIZE, nursery)
            case wsp.Ping(payload=payload):
                self.transport.write(wsp.pong_frame(payload))
            case wsp.Pong():
                pass
            case wsp.Close(code=code):
                self._peer_closed = True
                self._closing = True
                self._close = close.answer_to_peer_close(code)
                return False
            case wsp.ProtocolError(code=code, reason=reason):
                self._closing = True
                self._close = (code, reason)
                return False
        return not self._closing

    async def _handle(self, raw: str | bytes, nursery: trio.Nursery) -> None:
        """One client message (text, binary, or :data:`frames.OVERSIZE`)."""
        raise NotImplementedError
