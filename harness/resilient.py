"""A client that behaves like a real app: it reconnects, re-sends what was
not confirmed with the same ``cid``, and acks everything it receives.

Used by the fault-injection tests to check the delivery guarantees through
replica kills, Redis flushes and restarts.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from harness.loss import LossChecker

log = logging.getLogger("harness.resilient")
_ids = itertools.count(1)


class ResilientClient:
    def __init__(
        self,
        url: str,
        user: str,
        token: str,
        checker: LossChecker,
        *,
        seen: bool = False,
    ) -> None:
        self.url = url
        self.user = user
        self.token = token
        self.checker = checker
        self.seen = seen
        self.pending: dict[str, dict] = {}  # cid -> frame, until `sent`
        self.recipients: dict[str, Sequence[str]] = {}  # cid -> recipients
        self.sent: dict[str, dict] = {}  # cid -> sent frame
        self.errors: list[dict] = []
        self.nodes: list[str] = []
        self.connections = 0
        self.connected = trio.Event()
        self._ws: WebSocketConnection | None = None
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled; started once the first ``ready`` arrived."""
        started = False
        backoff = 0.05
        while True:
            try:
                async with open_websocket_url(self.url, connect_timeout=5) as ws:
                    await ws.send_message(json.dumps({"type": "auth", "token": self.token}))
                    ready = json.loads(await ws.get_message())
                    if ready.get("type") != "ready":
                        raise RuntimeError(f"{self.user}: auth failed: {ready}")
                    self.connections += 1
                    conn = f"{self.user}#{self.connections}"
                    self.nodes.append(ready["node"])
                    self._ws = ws
                    self.connected.set()
                    backoff = 0.05
                    if not started:
                        task_status.started()
                        started = True
                    for frame in list(self.pending.values()):  # retry with the same cid
                        await ws.send_message(json.dumps(frame))
                    await self._read(ws, conn)
            except (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError) as exc:
                log.debug("%s: connection lost: %r", self.user, exc)
            finally:
                self._ws = None
                self.connected = trio.Event()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _read(self, ws, conn: str) -> None:
        while True:
            frame = json.loads(await ws.get_message())
            kind = frame.get("type")
            if kind == "message":
                self.checker.received(self.user, conn, frame)
                if frame["from"] != self.user:
                    ack = {"type": "seen" if self.seen else "ack", "ids": [frame["id"]]}
                    await ws.send_message(json.dumps(ack))
            elif kind == "receipt":
                await ws.send_message(json.dumps({"type": "ack", "receipts": [frame["rid"]]}))
            elif kind == "sent":
                cid = frame["cid"]
                if cid in self.pending:
                    del self.pending[cid]
                    self.sent[cid] = frame
                    self.checker.sent(frame["id"], self.recipients[cid])
            elif kind == "error":
                self.errors.append(frame)
            self._notify()

    async def send(
        self,
        body: str,
        recipients: Sequence[str],
        *,
        to: str | None = None,
        conversation: str | None = None,
    ) -> str:
        cid = f"{self.user}-{next(_ids)}"
        frame: dict = {"type": "send", "cid": cid, "body": body}
        if to is not None:
            frame["to"] = to
        else:
            frame["conversation"] = conversation
        self.pending[cid] = frame
        self.recipients[cid] = list(recipients)
        ws = self._ws
        if ws is not None:
            try:
                await ws.send_message(json.dumps(frame))
            except ConnectionClosed:
                pass  # re-sent after the reconnect
        return cid

    async def wait_all_sent(self, timeout: float) -> None:
        with trio.fail_after(timeout):
            while self.pending:
                await self._changed.wait()
