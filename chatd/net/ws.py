"""The WebSocket adapter: the listener, and one :class:`WsConnection` per socket.

chatd speaks WebSocket itself (:mod:`chatd.net.websocket` does the
protocol, without I/O) over plain non-blocking sockets driven by trio's
``wait_readable`` / ``wait_writable``. Two choices keep a message cheap:

* **One task per connection.** It reads what the socket has, turns it into
  frames and handles them in order. Nothing passes a frame to another task.
* **Writes go straight to the socket**, from whichever task has something
  for this device (its own reader answering, another connection's reader
  routing a message, the broker delivering one): ``send()`` on a
  non-blocking socket takes it at once unless the kernel's buffer is full.
  Only then is the rest queued and a flusher task started (in the
  connection's nursery) to wait until the socket is writable.

A connection's queued bytes are bounded (:data:`OUTBOX_FRAMES` frames,
:data:`OUTBOX_BYTES` bytes): past either, the device is too slow and is
closed with 4008; what was owed stays owed and comes with its next
``ready``. Keepalive pings for every connection come from one task
(:func:`keepalive`), not one per connection.

Close codes: 4001 unauthorized, 4008 too slow, 1001 server going away or no
pong, 1002/1007 protocol errors, 1011 internal error. Oversize messages do
not close the connection: they are dropped as they arrive and answered with
``too_large``.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import secrets
import socket
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from chatd import hub
from chatd.core import frames
from chatd.core.errors import BadRequest, ChatError, RateLimited, Unauthorized
from chatd.core.session import Outbound, Session, SlowConsumer
from chatd.net import websocket as wsp
from chatd.net.clientip import Network, client_ip
from chatd.service import ChatService

log = logging.getLogger("chatd.ws")

#: Queued frames / bytes a device may have waiting for its socket before it
#: counts as too slow (4008). Bytes bound the memory one slow phone holds.
OUTBOX_FRAMES = 1024
OUTBOX_BYTES = 1024 * 1024
#: The backlog writer waits for the socket above these, so a long backlog
#: never fills the outbox that live frames need.
BACKLOG_HIGH_FRAMES = 256
BACKLOG_HIGH_BYTES = 256 * 1024
#: A client message larger than this is dropped as it arrives (it is never
#: buffered) and answered with ``too_large``; the connection stays.
DISCARD_OVER = frames.MAX_FRAME_BYTES + 1
#: Seconds between keepalive pings; a peer that has sent nothing (not even a
#: pong) by the next round is dropped. Proxies need read timeouts above this.
PING_INTERVAL = 30.0
#: Seconds a dropped connection gets to finish the frame in hand.
DROP_GRACE = 5.0
#: Seconds for the HTTP upgrade request, and for the peer's closing frame.
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
RECV_SIZE = 65536
#: Writes (sends, acks, seen reports) one connection may have queued at once
#: before its reader waits for them to commit.
MAX_INFLIGHT = 256
#: 4001 (the token or the account is no longer good): one fact, in the hub,
#: which also closes sockets with it when told to (logout, disable).
CLOSE_UNAUTHORIZED = hub.CLOSE_UNAUTHORIZED
CLOSE_TOO_SLOW = 4008
#: Over a cap on live sockets (per account, per client address).
CLOSE_TOO_MANY = 4029
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011

#: Frame class -> the type counted in chatd_frames_in_total.
_FRAME_TYPES = frames.TYPE_OF

_PING = wsp.ping_frame(b"chatd")


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


#: Queued bytes that mark a connection as one of the slow ones when the
#: process is over its budget.
SLOW_SHARE = 64 * 1024


class Transport:
    """One non-blocking TCP socket: reads, and writes that never wait.

    :meth:`write` hands bytes to the kernel at once; what it does not take is
    queued and a flusher task (started in ``nursery``) writes it when the
    socket is writable. The owner closes the socket with :meth:`close`.
    """

    def __init__(self, sock: socket.socket, budget: OutboxBudget | None = None) -> None:
        self.sock = sock
        #: Shared by every connection of the process (the queued bytes of all).
        self.budget = budget or OutboxBudget()
        self.nursery: trio.Nursery | None = None
        self._queue: deque[bytes | memoryview] = deque()
        self.queued_frames = 0
        self.queued_bytes = 0
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
        if self._queue and not self._flushing:
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
        if not self._queue:
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
        self._queue.append(data)
        self.queued_frames += 1
        self.queued_bytes += len(data)
        self.budget.queued += len(data)
        if not self._flushing and self.nursery is not None:
            self._flushing = True
            self._drained = trio.Event()
            self.nursery.start_soon(self._flush)

    def discard_queued(self) -> None:
        """Drop what is queued, except the rest of a frame already begun."""
        if not self._queue:
            return
        first = self._queue[0]
        partial_frame = isinstance(first, memoryview)
        self._queue.clear()
        self._forget_queued()
        if partial_frame:
            self._queue.append(first)
            self.queued_frames, self.queued_bytes = 1, len(first)
            self.budget.queued += len(first)

    async def drain(self) -> None:
        """Wait until everything queued was handed to the kernel (or the
        socket broke)."""
        await self._drained.wait()

    async def _flush(self) -> None:
        try:
            while self._queue and not self.broken:
                await trio.lowlevel.wait_writable(self.sock)
                while self._queue:
                    chunk = self._queue[0]
                    try:
                        sent = self.sock.send(chunk)
                    except BlockingIOError:
                        break
                    except OSError:
                        self._break()
                        return
                    self.queued_bytes -= sent
                    self.budget.queued -= sent
                    if sent == len(chunk):
                        self._queue.popleft()
                        self.queued_frames -= 1
                    else:
                        self._queue[0] = memoryview(chunk)[sent:]
                        break
        except (trio.ClosedResourceError, OSError):
            self._break()
        finally:
            self._flushing = False
            self._drained.set()

    def _forget_queued(self) -> None:
        self.budget.queued -= self.queued_bytes
        self.queued_frames = self.queued_bytes = 0

    def _break(self) -> None:
        self.broken = True
        self._queue.clear()
        self._forget_queued()
        self._drained.set()
        if self.on_broken is not None:
            callback, self.on_broken = self.on_broken, None
            callback()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._forget_queued()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class Deadlines:
    """Auth deadlines and token expiries of every connection, on one timer
    task (:meth:`run`) instead of a cancel scope around each read. Entries
    are never removed: one that is no longer a connection's deadline is
    ignored when it comes up (:meth:`WsConnection.deadline_passed`). They
    hold the connection weakly: a token may expire an hour after its
    connection ended, which must not keep the connection alive."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[WsConnection]]] = []
        self._count = 0
        self._changed = trio.Event()

    def add(self, when: float, conn: WsConnection) -> None:
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


class WsConnection:
    """One WebSocket after its handshake: its session and its socket.

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
        self._close: tuple[int, str] = (1000, "bye")
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
        """Called by :class:`Deadlines`: the auth deadline or the token's
        expiry, if it is still the one in force. The frame in hand (if any)
        is answered first; the error frame follows it (see _read_loop)."""
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
        t = self.transport
        if (
            t.queued_frames > OUTBOX_FRAMES
            or t.queued_bytes > t.budget.per_connection
            or (t.queued_bytes >= SLOW_SHARE and t.budget.over())
        ):
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

    def _peer_gone(self) -> None:
        self._peer_closed = True
        self.close_soon(1006, "connection lost")

    async def _write_backlog(self, items: list[Outbound]) -> None:
        for item in items:
            self._write(item.data)
            t = self.transport
            if t.queued_frames > BACKLOG_HIGH_FRAMES or t.queued_bytes > BACKLOG_HIGH_BYTES:
                await t.drain()

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
        if code == 1006:
            return
        if self._inflight and not self._dropping:
            # Frames taken before the close are answered before it.
            with trio.move_on_after(CLOSE_TIMEOUT * 5):
                while self._inflight:
                    await self._inflight_lot.park()
        t.write(wsp.close_frame(code, reason))
        self._close_sent = True
        with trio.move_on_after(DROP_GRACE if self._dropping else CLOSE_TIMEOUT * 5):
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
            self._close = (1006, "connection lost")
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
        if self.user is None:
            self._push(frames.error("unauthorized", f"no auth within {self.auth_timeout:g} s"))
            self._close = (CLOSE_UNAUTHORIZED, "no auth")
        else:
            self._push(frames.error("unauthorized", "token expired"))
            self._close = (CLOSE_UNAUTHORIZED, "token expired")

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
                self._close = (1000 if code in (1005, 1006) else code, "")
                return False
            case wsp.ProtocolError(code=code, reason=reason):
                self._closing = True
                self._close = (code, reason)
                return False
        return not self._closing

    def _parse(self, raw: str | bytes) -> frames.ClientFrame:
        """Parse a client frame and count it (by type, or as invalid)."""
        try:
            frame = frames.parse_client_frame(raw)
        except ChatError:
            self._frames_in["invalid"].inc()
            raise
        self._frames_in[_FRAME_TYPES[type(frame)]].inc()
        return frame

    async def _handle(self, raw: str | bytes, nursery: trio.Nursery) -> None:
        if self.user is None:
            await self._handle_unauthenticated(raw, nursery)
            return
        frame: frames.ClientFrame | None = None
        try:
            try:
                frame = self._parse(raw)
            except Unauthorized:  # an ``auth`` frame, here after authentication
                raise BadRequest("already authenticated") from None
            self.session.check(frame, trio.current_time())
            match frame:
                case frames.Send():
                    try:
                        await self.service.rates.admit(self.user)
                    except RateLimited as exc:
                        raise exc.with_cid(frame.cid) from None
                    await self.service.send(self, frame)
                case frames.React() | frames.Edit() | frames.Delete():
                    try:
                        await self.service.rates.admit(self.user)
                    except RateLimited as exc:
                        raise exc.with_cid(frame.cid) from None
                    await self.service.act(self, frame)
                case frames.Ack():
                    self.session.settled([*frame.ids, *frame.receipts, *frame.events])
                    await self.service.ack(self, frame)
                case frames.Seen():
                    self.session.settled(list(frame.ids))
                    await self.service.seen(self, frame)
                case frames.Typing():
                    await self.service.typing(self, frame)
                case frames.Ping():
                    self._push(frames.pong())
            if self._inflight >= MAX_INFLIGHT:
                # Its writes are answered after they commit: a device that
                # sends faster than they do waits here (back pressure).
                while self._inflight >= MAX_INFLIGHT // 2 and not self._closing:
                    await self._inflight_lot.park()
        except ChatError as exc:
            self._push(frames.error(exc.code, exc.message, exc.cid, **exc.extra))
        except Exception:
            log.exception("frame handling failed", extra={"user": self.user, "conn": self.id})
            cid = frame.cid if isinstance(frame, frames.Send | frames.EventFrame) else None
            self._push(frames.error("internal", "internal error", cid))

    async def _handle_unauthenticated(self, raw: str | bytes, nursery: trio.Nursery) -> None:
        """Before a good ``auth``: only ``auth`` is taken; a bad token closes."""
        try:
            frame = self._parse(raw)
        except Unauthorized as exc:  # an ``auth`` without a usable token
            self._refuse(exc)
            return
        except ChatError as exc:
            self._push(frames.error(exc.code, exc.message, exc.cid, **exc.extra))
            return
        try:
            self.session.check(frame, trio.current_time())
        except ChatError as exc:  # anything but auth: refused, keep waiting
            self._push(frames.error(exc.code, exc.message, exc.cid, **exc.extra))
            return
        if not isinstance(frame, frames.Auth):
            raise RuntimeError("the session let a frame other than auth through")
        try:
            claims = await self.service.authenticate(frame.token)
        except Unauthorized as exc:
            self._refuse(exc)
            return
        except ChatError as exc:
            self._push(frames.error(exc.code, exc.message, **exc.extra))
            self._close = (CLOSE_INTERNAL, "could not check the token")
            self._closing = True
            return
        try:
            await self.service.admit_device(claims.user)
        except RateLimited as exc:
            self._push(frames.error(exc.code, exc.message, **exc.extra))
            self._close = (CLOSE_TOO_MANY, "too many connections")
            self._closing = True
            return
        extra: dict[str, str | None] = {}
        if frame.device is not None:
            try:
                active = await self.service.active_device(claims.user, frame.device)
            except ChatError:
                active = False  # unknown for now: the device is not claimed
            self.device = frame.device if active else None
            extra["device"] = self.device
        self.user = claims.user
        self.token_id = claims.token_id
        self.session.authenticated(claims.user)
        # The connection lives as long as its token (then the client logs in
        # again); a frame in hand when it expires is still answered.
        self._set_deadline(trio.current_time() + max(0.0, claims.expires_at - time.time()))
        try:
            await self.service.attach(self)
        except ChatError as exc:
            self._push(frames.error(exc.code, exc.message, **exc.extra))
            self._close = (CLOSE_INTERNAL, "could not start the session")
            self._closing = True
            return
        self._push(frames.ready(claims.user, self.service.node, **extra))
        # The backlog runs beside the reader, so the device's acks (and its
        # pongs) are taken while a long backlog streams out.
        nursery.start_soon(self._backlog)

    def _refuse(self, exc: ChatError) -> None:
        self._push(frames.error(exc.code, exc.message, **exc.extra))
        self._close = (CLOSE_UNAUTHORIZED, exc.message)
        self._closing = True

    async def _backlog(self) -> None:
        if self.user is None:
            raise RuntimeError("backlog before authentication")

        async def emit(items: list[Outbound]) -> None:
            await self._write_backlog(self.session.backlog(items))

        try:
            await self.service.backlog(self.user, emit)
        except ChatError as exc:
            # The store is down: the device is online and gets live traffic;
            # what is owed stays owed for the next connection.
            self._push(frames.error(exc.code, f"backlog not available: {exc.message}"))
        if self.session.phase == "backlog":
            await self._write_backlog(self.session.finish_backlog())


# -- the listener ------------------------------------------------------------------------------


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
                if exc.errno in _ACCEPT_CAPACITY:
                    log.error("accept failed; pausing", extra={"reason": str(exc)})
                    await trio.sleep(0.1)
                    break
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
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
