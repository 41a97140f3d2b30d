"""What one WebSocket's frames mean: :class:`WsConnection`, the connection the
service and the hub see. The wire (reading, writing, closing) is its base's,
:class:`~chatd.net.ws_link.WsLink`.

Guarantees:

* Before a good ``auth`` only ``auth`` is taken (anything else is refused
  and the connection keeps waiting); a bad token closes with 4001, a token
  that could not be checked or a session that could not start with 1011,
  an account over its cap of devices with 4029. Each close follows its
  error frame.
* After ``auth``: the connection lives as long as its token; ``ready`` comes
  before the backlog, and the backlog runs beside the reader, so acks and
  pongs are taken while a long backlog streams out. A backlog the store
  cannot give is reported, and stays owed for the next connection.
* A frame that is refused is answered with an error frame (with its
  ``cid``); a bug in handling one is logged and answered ``internal``, and
  the connection stays.
"""

from __future__ import annotations

import logging
import time

import trio

from chatd.core import frames
from chatd.core.errors import BadRequest, ChatError, RateLimited, Unauthorized
from chatd.core.session import Outbound
from chatd.net.ws_close import CLOSE_INTERNAL, CLOSE_TOO_MANY, CLOSE_UNAUTHORIZED
from chatd.net.ws_link import MAX_INFLIGHT, WsLink
from chatd.net.ws_outbox import backlog_full

log = logging.getLogger("chatd.ws")


class WsConnection(WsLink):
    """One WebSocket after its handshake: its session and its socket."""

    def _parse(self, raw: str | bytes) -> frames.ClientFrame:
        """Parse a client frame and count it (by type, or as invalid)."""
        try:
            frame = frames.parse_client_frame(raw)
        except ChatError:
            self._frames_in["invalid"].inc()
            raise
        self._frames_in[frames.TYPE_OF[type(frame)]].inc()
        return frame

    def _push_error(self, exc: ChatError, *, with_cid: bool = True) -> None:
        """The error frame for ``exc`` (with the frame's ``cid`` unless told not to)."""
        self._push(frames.error(exc.code, exc.message, exc.cid if with_cid else None, **exc.extra))

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
            self._push_error(exc)
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
            self._push_error(exc)
            return
        try:
            self.session.check(frame, trio.current_time())
        except ChatError as exc:  # anything but auth: refused, keep waiting
            self._push_error(exc)
            return
        if not isinstance(frame, frames.Auth):
            raise RuntimeError("the session let a frame other than auth through")
        try:
            claims = await self.service.authenticate(frame.token)
        except Unauthorized as exc:
            self._refuse(exc)
            return
        except ChatError as exc:
            self._push_error(exc, with_cid=False)
            self._close_after_frame(CLOSE_INTERNAL, "could not check the token")
            return
        try:
            await self.service.admit_device(claims.user)
        except RateLimited as exc:
            self._push_error(exc, with_cid=False)
            self._close_after_frame(CLOSE_TOO_MANY, "too many connections")
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
            self._push_error(exc, with_cid=False)
            self._close_after_frame(CLOSE_INTERNAL, "could not start the session")
            return
        self._push(frames.ready(claims.user, self.service.node, **extra))
        # The backlog runs beside the reader, so the device's acks (and its
        # pongs) are taken while a long backlog streams out.
        nursery.start_soon(self._backlog)

    def _refuse(self, exc: ChatError) -> None:
        self._push_error(exc, with_cid=False)
        self._close_after_frame(CLOSE_UNAUTHORIZED, exc.message)

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

    async def _write_backlog(self, items: list[Outbound]) -> None:
        """Write backlog items, waiting for the socket whenever its outbox is
        past :func:`~chatd.net.ws_outbox.backlog_full`."""
        for item in items:
            self._write(item.data)
            out = self.transport.outbox
            if backlog_full(out.frames, out.bytes):
                await self.transport.drain()
