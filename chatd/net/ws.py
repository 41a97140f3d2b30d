"""The WebSocket adapter: the listener, and one :class:`WsConnection` per socket.

chatd speaks WebSocket itself (:mod:`chatd.net.websocket` does the
protocol, without I/O) over plain non-blocking sockets driven by trio's
``wait_readable`` / ``wait_writable``. This module is the adapter's front
door: it names what the rest of chatd uses; each piece lives in its own
room, whose docstring says what it owns and guarantees:

* :mod:`chatd.net.ws_listen`: the listener (:func:`serve_ws`: bind, accept,
  upgrade, per-address cap) and the tasks for every connection at once
  (:class:`~chatd.net.ws_listen.Deadlines`, :func:`keepalive`).
* :mod:`chatd.net.ws_session`: :class:`WsConnection`, what a connection's
  frames mean (auth, frames to the service, the backlog).
* :mod:`chatd.net.ws_link`: its base, the connection on the wire (one task
  reading frames in order, writes in order, the two speeds of closing).
* :mod:`chatd.net.ws_transport`: the socket (writes that never wait).
* :mod:`chatd.net.ws_outbox` (pure): what a socket still owes, and the
  budgets that make a device too slow (4008).
* :mod:`chatd.net.ws_close` (pure): the close codes and the choices among them.
"""

from __future__ import annotations

from chatd.net.ws_close import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_TIMEOUT,
    CLOSE_TOO_MANY,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    DROP_GRACE,
)
from chatd.net.ws_link import DISCARD_OVER, MAX_INFLIGHT, WsLink
from chatd.net.ws_listen import (
    HANDSHAKE_TIMEOUT,
    PING_INTERVAL,
    AddressCap,
    Deadlines,
    bind,
    handle_socket,
    keepalive,
    serve_ws,
)
from chatd.net.ws_outbox import (
    BACKLOG_HIGH_BYTES,
    BACKLOG_HIGH_FRAMES,
    OUTBOX_BYTES,
    OUTBOX_FRAMES,
    SLOW_SHARE,
    OutboxBudget,
)
from chatd.net.ws_session import WsConnection
from chatd.net.ws_transport import RECV_SIZE, Transport

__all__ = [
    "BACKLOG_HIGH_BYTES",
    "BACKLOG_HIGH_FRAMES",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_TIMEOUT",
    "CLOSE_TOO_MANY",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHORIZED",
    "DISCARD_OVER",
    "DROP_GRACE",
    "HANDSHAKE_TIMEOUT",
    "MAX_INFLIGHT",
    "OUTBOX_BYTES",
    "OUTBOX_FRAMES",
    "PING_INTERVAL",
    "RECV_SIZE",
    "SLOW_SHARE",
    "AddressCap",
    "Deadlines",
    "OutboxBudget",
    "Transport",
    "WsConnection",
    "WsLink",
    "bind",
    "handle_socket",
    "keepalive",
    "serve_ws",
]
