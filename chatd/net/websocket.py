"""The server side of the WebSocket protocol (RFC 6455), without I/O.

Bytes in, events out; frames out as bytes. :mod:`chatd.net.ws` owns the
socket and calls this; tests drive it directly. Two parts:

* :func:`handshake` reads the HTTP upgrade request (with h11) and answers
  either ``101 Switching Protocols`` or a plain HTTP error;
* :class:`FrameReader` turns the bytes that follow into :data:`Event`\\ s,
  and the ``*_frame`` functions build what the server sends.

Why not wsproto, which trio-websocket drives: it costs about 10 µs per
received message in its event machinery, and chatd receives several
messages per chat message (send, ack, seen, receipt acks). Framing is a
small, fixed part of RFC 6455; docs/performance.md has the measurement.

What the reader enforces, as RFC 6455 asks of a server: client frames are
masked; no reserved bits (chatd negotiates no extension); control frames
are final and at most 125 bytes; continuation frames only inside a
fragmented message; text is valid UTF-8 (checked on the whole message).
A violation is a :class:`ProtocolError` with the close code to send (1002,
1007), after which the reader takes nothing more. A message larger than
``max_message`` is never buffered: its bytes are dropped as they arrive and
it is reported as :data:`OVERSIZE` once it ends, so the connection stays.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

#: The GUID of RFC 6455 section 1.3, for Sec-WebSocket-Accept.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest request head accepted in the handshake.
MAX_REQUEST_HEAD = 16 * 1024

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
#: Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry);
#: 1005, 1006 and 1015 must never appear on the wire.
_VALID_PEER_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    data: str


@dataclass(frozen=True, slots=True)
class Binary:
    data: bytes


@dataclass(frozen=True, slots=True)
class Oversize:
    """A data message over ``max_message`` bytes; its bytes were dropped."""

    size: int


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame: ``code`` is 1005 when it sent none."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke the protocol: close with ``code``; read nothing more."""

    code: int
    reason: str


Event = Text | Binary | Oversize | Ping | Pong | Close | ProtocolError


# -- frames out -----------------------------------------------------------------------------


def _header(opcode: int, length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame; ``payload`` is UTF-8 (the caller's promise)."""
    return _header(OP_TEXT, len(payload)) + payload


def ping_frame(payload: bytes = b"") -> bytes:
    return _header(OP_PING, len(payload)) + payload


def pong_frame(payload: bytes) -> bytes:
    return _header(OP_PONG, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125-byte control frame."""
    raw = reason.encode("utf-8")[:123]
    # Cutting may split a character: drop the broken tail.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    body = code.to_bytes(2, "big") + raw
    return _header(OP_CLOSE, len(body)) + body


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (one big-integer XOR:
    a C loop, fast for the frame sizes chatd accepts)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


# -- frames in -------------------------------------------------------------------------------


class FrameReader:
    """Client frames → events. Feed it what the socket gives, in order.

    ``max_message``: the largest data message (after reassembly) that is
    delivered; a larger one is dropped as it arrives and reported as
    :class:`Oversize` (the whole message, once).
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._failed = False
        #: The data message being reassembled: its opcode (None: none open).
        self._msg_op: int | None = None
        self._parts: list[bytes] = []
        self._msg_size = 0
        self._discarding = False
        #: Payload bytes of the current (discarded) frame still to skip.
        self._skip = 0
        self._skip_final = False

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by ``data`` (possibly none)."""
        if self._failed:
            return []
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                self._msg_size += len(data)
                if self._skip == 0 and self._skip_final:
                    return [self._end_discard()]
                return []
            data = data[self._skip :]
            self._msg_size += self._skip
            self._skip = 0
            events: list[Event] = [self._end_discard()] if self._skip_final else []
        else:
            events = []
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            final = b0 & 0x80
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[head : head + 8], "big")
                head += 8
                if length >> 63:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "frame length out of range")
            if b0 & 0x70:
                return self._fail(events, CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if not b1 & 0x80:
                return self._fail(events, CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            if opcode >= 0x8:
                if not final or length > 125:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "bad control frame")
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            elif opcode == OP_CONTINUATION:
                if self._msg_op is None:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "continuation of nothing")
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._msg_op is not None:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "new message inside another")
            else:
                return self._fail(events, CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            head += 4  # the mask
            if head > end:
                break
            if opcode < 0x8 and (self._discarding or self._msg_size + length > self.max_message):
                # Over the limit: drop this frame's payload as it arrives.
                if opcode != OP_CONTINUATION:
                    self._msg_op = opcode
                self._discarding = True
                self._parts = []
                available = end - head
                if available < length:
                    self._msg_size += available
                    self._skip = length - available
                    self._skip_final = bool(final)
                    pos = end
                    break
                self._msg_size += length
                pos = head + length
                if final:
                    events.append(self._end_discard())
                continue
            if end - head < length:
                break
            payload = unmask(buf[head : head + length], bytes(buf[head - 4 : head]))
            pos = head + length
            if opcode >= 0x8:
                event = self._control(opcode, payload)
                events.append(event)
                if isinstance(event, ProtocolError):
                    self._failed = True
                    break
                continue
            if opcode != OP_CONTINUATION:
                self._msg_op = opcode
            if not final:
                self._parts.append(payload)
                self._msg_size += length
                continue
            if self._parts:
                self._parts.append(payload)
                payload = b"".join(self._parts)
                self._parts = []
            op = self._msg_op
            self._msg_op = None
            self._msg_size = 0
            if op == OP_TEXT:
                try:
                    events.append(Text(payload.decode("utf-8")))
                except UnicodeDecodeError:
                    return self._fail(events, CLOSE_INVALID_DATA, "text is not valid UTF-8")
            else:
                events.append(Binary(payload))
        if pos:
            del buf[:pos]
        return events

    def _end_discard(self) -> Oversize:
        size = self._msg_size
        self._discarding = False
        self._skip_final = False
        self._msg_op = None
        self._msg_size = 0
        return Oversize(size)

    def _control(self, opcode: int, payload: bytes) -> Event:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if not payload:
            return Close(1005, "")
        if len(payload) == 1:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame of one byte")
        code = int.from_bytes(payload[:2], "big")
        if code not in _VALID_PEER_CODES and not 3000 <= code <= 4999:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8")
        return Close(code, reason)

    def _fail(self, events: list[Event], code: int, reason: str) -> list[Event]:
        self._failed = True
        self._buf.clear()
        events.append(ProtocolError(code, reason))
        return events


# -- the handshake ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A valid upgrade request: send ``response``, then frames follow
    (``rest``: bytes the client sent after its request)."""

    path: str
    headers: dict[str, str]
    response: bytes
    rest: bytes


@dataclass(frozen=True, slots=True)
class Reject:
    """Not a WebSocket upgrade we take: send ``response`` and close."""

    status: int
    response: bytes


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, ports made explicit; None
    for what is not one (``null``, a path, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _host_key(host: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) of a Host header, the port defaulting by ``scheme``."""
    return (
        (key[1], key[2]) if (key := _origin_key(f"{scheme}://{host.strip()}")) is not None else None
    )


@dataclass(frozen=True)
class OriginPolicy:
    """Which web pages may open a WebSocket: the handshake's ``Origin``.

    A browser always sends ``Origin``; other clients usually do not, and a
    handshake without one is allowed (an origin check protects browsers'
    users from other sites, not the server from programs). Allowed:

    * the origins listed in ``allowed`` (``*`` allows any);
    * the page's own origin behind a proxy: the origin's host and port are
      the request's ``Host`` (NGINX passes the browser's ``Host`` on);
    * the embedded web client: the same host as ``Host`` on ``http_port``,
      the HTTP listener that served the page.

    Anything else (another site, ``null``) is refused with HTTP 403.
    """

    allowed: tuple[str, ...] = ()
    http_port: int | None = None

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or "*" in self.allowed:
            return True
        key = _origin_key(origin)
        if key is None:
            return False
        if key in {_origin_key(a) for a in self.allowed}:
            return True
        scheme, name, port = key
        if host:
            here = _host_key(host, scheme)
            if here == (name, port):
                return True
            if here is not None and self.http_port and (name, port) == (here[0], self.http_port):
                return True
        return False


class Handshake:
    """Feed the bytes of an upgrade request until :meth:`feed` answers
    :class:`Upgrade` or :class:`Reject` (None: more bytes needed)."""

    def __init__(self, path: str = "/ws", origins: OriginPolicy | None = None) -> None:
        self.path = path
        self.origins = origins
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)

    def feed(self, data: bytes) -> Upgrade | Reject | None:
        try:
            self._h11.receive_data(data)
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            return _reject(exc.error_status_hint, f"bad request: {exc}")
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
            return _reject(400, "bad request")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("latin-1")
        if target.split("?", 1)[0] != self.path:
            return _reject(404, f"not found: the WebSocket path is {self.path}")
        if event.method != b"GET":
            return _reject(405, "a WebSocket handshake is a GET", [("Allow", "GET")])
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in tokens:
            return _reject(426, "this is a WebSocket endpoint", [("Upgrade", "websocket")])
        if headers.get("sec-websocket-version") != "13":
            return _reject(426, "WebSocket version 13 only", [("Sec-WebSocket-Version", "13")])
        if self.origins is not None and not self.origins.allows(
            headers.get("origin"), headers.get("host")
        ):
            return _reject(403, "this page's origin may not open a WebSocket here")
        key = headers.get("sec-websocket-key", "")
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError(key)
        except ValueError:
            return _reject(400, "bad Sec-WebSocket-Key")
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest())
        response = self._h11.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"Upgrade", b"websocket"),
                    (b"Connection", b"Upgrade"),
                    (b"Sec-WebSocket-Accept", accept),
                ],
            )
        )
        rest, _closed = self._h11.trailing_data
        return Upgrade(target, headers, response or b"", bytes(rest))


def _reject(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> Reject:
    body = (message + "\n").encode("utf-8")
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    head += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
    head += ["Connection: close", *(f"{k}: {v}" for k, v in extra or [])]
    return Reject(status, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}
