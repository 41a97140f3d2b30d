"""A small trio WebSocket client that speaks the wire contract, for tests.

It keeps every frame it receives, so a test can wait for one that matches
and still look at what came before. ``expect`` fails with the frames seen
so far, which makes a failing end-to-end test readable. That something did
*not* come is asserted against a barrier (``quiet``, ``sync``), never by
waiting a while: a frame that would come a little later is not missed.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

Frame = dict[str, Any]
_cids = itertools.count(1)


class ExpectTimeout(AssertionError):
    pass


class ChatClient:
    def __init__(self, ws: WebSocketConnection, name: str = "") -> None:
        self.ws = ws
        self.name = name
        self.frames: list[Frame] = []
        self._cursor = 0
        self.closed: tuple[int, str | None] | None = None
        self._consumed: set[int] = set()
        self._arrived = trio.Event()

    async def _reader(self) -> None:
        try:
            while True:
                raw = await self.ws.get_message()
                self.frames.append(json.loads(raw))
                self._arrived.set()
                self._arrived = trio.Event()
        except ConnectionClosed as exc:
            reason = exc.reason
            self.closed = (reason.code, reason.reason) if reason is not None else (1006, None)
            self._arrived.set()

    async def send_json(self, frame: Frame | str | bytes) -> None:
        text = frame if isinstance(frame, (str, bytes)) else json.dumps(frame)
        await self.ws.send_message(text)

    async def auth(self, token: str) -> Frame:
        await self.send_json({"type": "auth", "token": token})
        return await self.expect("ready")

    async def auth_with(self, token: str, **fields: Any) -> Frame:
        """``auth`` with extra fields (``device``)."""
        await self.send_json({"type": "auth", "token": token, **fields})
        return await self.expect("ready")

    async def send(
        self,
        body: str,
        *,
        to: str | None = None,
        conversation: str | None = None,
        cid: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        cid = cid or f"c{next(_cids)}"
        frame: Frame = {"type": "send", "cid": cid, "body": body}
        if to is not None:
            frame["to"] = to
        if conversation is not None:
            frame["conversation"] = conversation
        if reply_to is not None:
            frame["reply_to"] = reply_to
        await self.send_json(frame)
        return cid

    async def act(self, type: str, id: str, cid: str | None = None, **fields: Any) -> str:
        """A ``react``, ``edit`` or ``delete`` of message ``id``; returns its cid."""
        cid = cid or f"c{next(_cids)}"
        await self.send_json({"type": type, "cid": cid, "id": id, **fields})
        return cid

    async def ack(
        self,
        ids: list[str] | None = None,
        receipts: list[str] | None = None,
        events: list[str] | None = None,
    ) -> None:
        frame: Frame = {"type": "ack"}
        if ids is not None:
            frame["ids"] = ids
        if receipts is not None:
            frame["receipts"] = receipts
        if events is not None:
            frame["events"] = events
        await self.send_json(frame)

    async def seen(self, ids: list[str]) -> None:
        await self.send_json({"type": "seen", "ids": ids})

    def seen_frames(self, type: str | None = None) -> list[Frame]:
        return [f for f in self.frames if type is None or f.get("type") == type]

    async def expect(
        self,
        type: str,
        where: Callable[[Frame], bool] | None = None,
        *,
        timeout: float = 5.0,
        **fields: Any,
    ) -> Frame:
        """The next unconsumed frame of ``type`` matching ``fields`` and ``where``.

        Frames before it stay available to later ``expect`` calls of other
        types; the matched one is consumed.
        """

        def match(f: Frame) -> bool:
            return (
                f.get("type") == type
                and all(f.get(k) == v for k, v in fields.items())
                and (where is None or where(f))
            )

        with trio.move_on_after(timeout):
            while True:
                for i, frame in enumerate(self.frames):
                    if i in self._consumed:
                        continue
                    if match(frame):
                        self._consumed.add(i)
                        return frame
                if self.closed is not None:
                    break
                await self._arrived.wait()
        raise ExpectTimeout(
            f"{self.name}: no {type} frame matching {fields or ''} within {timeout}s;"
            f" closed={self.closed}; got {self.frames!r}"
        )

    async def expect_closed(self, timeout: float = 5.0) -> tuple[int, str | None]:
        with trio.move_on_after(timeout):
            while self.closed is None:
                await self._arrived.wait()
            return self.closed
        raise ExpectTimeout(f"{self.name}: still open after {timeout}s; got {self.frames!r}")

    async def sync(self, timeout: float = 5.0) -> Frame:
        """A ``ping``/``pong`` round trip; returns the (consumed) pong.

        The server handles a connection's frames in order and answers each
        after the writes of the frames before it, so by the pong every frame
        this client sent before the ping has been handled: its writes are
        committed and what they route is routed. A node hands what it routes
        to a connection of its own to that connection at once, so whatever
        this connection's node routed to it before reading the ping has
        arrived before the pong. Not covered: what another replica routes
        (it is still on its way through Redis) and a backlog (the server
        answers a ping while its backlog is still streaming); there, wait for
        a later frame of the same path instead (``quiet(before=...)``).
        """
        start = len(self.frames)
        await self.send_json({"type": "ping"})
        with trio.move_on_after(timeout):
            while True:
                for i in range(start, len(self.frames)):
                    if i not in self._consumed and self.frames[i].get("type") == "pong":
                        self._consumed.add(i)
                        return self.frames[i]
                if self.closed is not None:
                    break
                await self._arrived.wait()
        raise ExpectTimeout(
            f"{self.name}: no pong within {timeout}s; closed={self.closed}; got {self.frames!r}"
        )

    async def quiet(
        self,
        type: str,
        *,
        before: Frame | None = None,
        where: Callable[[Frame], bool] | None = None,
        **fields: Any,
    ) -> Frame:
        """Assert that no unconsumed frame of ``type`` (matching ``fields`` and
        ``where``) arrived before a barrier; returns the barrier.

        The barrier is ``before``, a frame this client already has that came
        the same way later (frames keep their order per connection, so its
        arrival proves the absent one is not on its way), or else a
        :meth:`sync` round trip made now (see there for what it covers).
        Never a timeout: a frame that would have come a little later is not
        missed, and a broken connection fails instead of passing.
        """
        barrier = before if before is not None else await self.sync()
        end = next((i for i, f in enumerate(self.frames) if f is barrier), None)
        if end is None:
            raise ValueError(f"{self.name}: the barrier {barrier!r} is not a frame of this client")
        unexpected = [
            f
            for i, f in enumerate(self.frames[:end])
            if i not in self._consumed
            and f.get("type") == type
            and all(f.get(k) == v for k, v in fields.items())
            and (where is None or where(f))
        ]
        if unexpected:
            raise AssertionError(f"{self.name}: unexpected {type} frame(s) {unexpected!r}")
        return barrier


@asynccontextmanager
async def connect(url: str, name: str = "") -> AsyncIterator[ChatClient]:
    """``async with connect(url) as client``: a client whose reader runs until
    the block ends; the socket is closed on exit."""
    async with open_websocket_url(url) as ws, trio.open_nursery() as nursery:
        client = ChatClient(ws, name)
        nursery.start_soon(client._reader)
        try:
            yield client
        finally:
            await ws.aclose()


class Api:
    """The HTTP API, for tests: thin calls that return (status, json)."""

    def __init__(self, base_url: str) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=base_url, timeout=10.0)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        resp = await self.http.request(method, path, headers=headers, **kwargs)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        return resp.status_code, body

    async def register(self, username: str, password: str = "correct horse") -> tuple[int, Any]:
        return await self.call(
            "POST", "/api/register", json={"username": username, "password": password}
        )

    async def login(self, username: str, password: str = "correct horse") -> str:
        status, body = await self.call(
            "POST", "/api/login", json={"username": username, "password": password}
        )
        assert status == 200, body
        return body["token"]

    async def user(self, username: str, password: str = "correct horse") -> str:
        """Register and log in; returns the token."""
        status, body = await self.register(username, password)
        assert status == 201, body
        return await self.login(username, password)


def masked_text(payload: bytes) -> bytes:
    """A client text frame as a raw socket must send it (masked)."""
    from chatd.net import websocket as wsp

    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes((0x80 | n,))
    elif n < 65536:
        length = bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        length = bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return bytes((0x81,)) + length + mask + wsp.unmask(payload, mask)


def silent_device(port: int, token: str, rcvbuf: int = 4096) -> socket.socket:
    """A blocking raw socket to chatd's WebSocket port that upgrades, sends
    ``auth`` and then reads nothing (its small receive buffer makes the
    kernel stop taking data for it soon): a device that never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {head[:80]!r}")
    sock.sendall(masked_text(json.dumps({"type": "auth", "token": token}).encode()))
    return sock
