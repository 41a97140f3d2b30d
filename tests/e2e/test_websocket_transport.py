"""chatd's own WebSocket layer against a real server process, from a raw
socket where a test needs bytes no polite client sends."""

import base64
import json
import os
import socket

import pytest
import trio
from trio_websocket import open_websocket_url

from chatd.net import websocket as wsp
from harness.client import connect
from harness.procs import ChatdProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The transport does not depend on the store: SQLite only."""
    proc = ChatdProcess(tmp_path_factory.mktemp("chatd")).start()
    yield proc
    assert proc.stop() == 0, proc.logs()[-4000:]


def masked(opcode: int, payload: bytes, *, final: bool = True, rsv: int = 0) -> bytes:
    mask = os.urandom(4)
    head = bytes(((0x80 if final else 0) | rsv | opcode,))
    n = len(payload)
    if n < 126:
        head += bytes((0x80 | n,))
    else:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    return head + mask + wsp.unmask(payload, mask)


def text(obj) -> bytes:
    return masked(wsp.OP_TEXT, json.dumps(obj).encode())


class RawClient:
    """A WebSocket client on a plain socket: it writes whatever bytes it is
    given and reads the server's frames with chatd's own reader (which
    accepts unmasked frames when told they come from a server)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)
        self.sock = trio.socket.socket()
        self.addr = (host, int(port))
        self.buf = b""

    async def open(self, after_request: bytes = b"") -> None:
        await self.sock.connect(self.addr)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: {self.addr[0]}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        await self.sock.send(request + after_request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += await self.sock.recv(65536)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def frames(self, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Every frame until the server closes the TCP connection."""
        out = []
        with trio.fail_after(timeout):
            while True:
                chunk = await self.sock.recv(65536)
                if not chunk:
                    break
                self.buf += chunk
        data = self.buf
        while data:
            opcode, n = data[0] & 0x0F, data[1] & 0x7F
            pos = 2
            if n == 126:
                n, pos = int.from_bytes(data[2:4], "big"), 4
            out.append((opcode, data[pos : pos + n]))
            data = data[pos + n :]
        return out


def close_code(frames: list[tuple[int, bytes]]) -> int:
    [close] = [payload for opcode, payload in frames if opcode == wsp.OP_CLOSE]
    return int.from_bytes(close[:2], "big")


async def test_ping_is_answered_with_pong(server):
    async with open_websocket_url(server.ws_url) as ws:
        with trio.fail_after(5):
            await ws.ping(b"are you there")


async def test_auth_in_the_same_packet_as_the_upgrade(server, api, names):
    alice = names("alice")
    token = await api.user(alice)
    raw = RawClient(server.ws_url)
    await raw.open(text({"type": "auth", "token": token}) + masked(wsp.OP_CLOSE, b"\x03\xe8"))
    frames = await raw.frames()
    ready = json.loads(frames[0][1])
    assert ready["type"] == "ready" and ready["user"] == alice
    assert close_code(frames) == 1000


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (masked(wsp.OP_TEXT, b"\xff\xfe\xfd"), 1007),
        (masked(wsp.OP_TEXT, b"{}", rsv=0x40), 1002),
        (bytes((0x81, 0x02)) + b"{}", 1002),  # a client frame without a mask
    ],
)
async def test_protocol_errors_close_with_their_code(server, data, code):
    raw = RawClient(server.ws_url)
    await raw.open()
    await raw.send(data)
    assert close_code(await raw.frames()) == code


async def test_client_close_is_echoed(server, api, names):
    token = await api.user(names("alice"))
    raw = RawClient(server.ws_url)
    await raw.open()
    await raw.send(text({"type": "auth", "token": token}))
    await raw.send(masked(wsp.OP_CLOSE, (4321).to_bytes(2, "big") + b"done"))
    assert close_code(await raw.frames()) == 4321


async def test_frames_before_a_close_are_all_answered(server, api, names):
    """Frames that arrived before the peer's close are handled in full: the
    sender's `sent` goes out, and the message is stored and delivered."""
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    raw = RawClient(server.ws_url)
    await raw.open()
    burst = text({"type": "auth", "token": ta})
    burst += b"".join(
        text({"type": "send", "cid": f"c{i}", "to": bob, "body": f"m{i}"}) for i in range(20)
    )
    await raw.send(burst + masked(wsp.OP_CLOSE, b"\x03\xe8"))
    frames = [json.loads(p) for op, p in await raw.frames() if op == wsp.OP_TEXT]
    assert [f["cid"] for f in frames if f["type"] == "sent"] == [f"c{i}" for i in range(20)]
    async with connect(server.ws_url, bob) as b:
        await b.auth(tb)
        got = [(await b.expect("message"))["body"] for _ in range(20)]
        assert got == [f"m{i}" for i in range(20)]


async def test_a_plain_http_request_to_the_ws_port_is_told_to_upgrade(server):
    host, port = server.ws_url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 426 ")
    assert b"Upgrade: websocket" in reply


async def handshake_status(server, origin: str | None, host: str | None = None) -> int:
    """The status line's code of a handshake with ``Origin: origin``."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", server.ws_port))
    head = f"GET /ws HTTP/1.1\r\nHost: {host or f'127.0.0.1:{server.ws_port}'}\r\n"
    head += "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    head += f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
    head += "Sec-WebSocket-Version: 13\r\n"
    if origin is not None:
        head += f"Origin: {origin}\r\n"
    await sock.send((head + "\r\n").encode())
    buf = b""
    with trio.fail_after(5):
        while b"\r\n" not in buf:
            buf += await sock.recv(4096)
    sock.close()
    return int(buf.split(b" ", 2)[1])


async def test_a_page_of_another_origin_cannot_open_a_websocket(server):
    """Cross-site WebSocket hijacking: a page elsewhere (or a sandboxed one)
    is refused with 403; chatd's own page (its HTTP port), a page of the same
    origin behind a proxy, and clients that send no Origin are let in."""
    assert await handshake_status(server, "https://evil.example") == 403
    assert await handshake_status(server, "null") == 403
    assert await handshake_status(server, f"http://127.0.0.1:{server.ws_port + 1000}") == 403
    assert await handshake_status(server, f"http://127.0.0.1:{server.http_port}") == 101
    assert await handshake_status(server, "https://chat.example", host="chat.example") == 101
    assert await handshake_status(server, None) == 101


async def test_an_allowed_origin_is_let_in(tmp_path):
    proc = ChatdProcess(tmp_path, args=["--allowed-origins", "https://app.example"]).start()
    try:
        assert await handshake_status(proc, "https://app.example") == 101
        assert await handshake_status(proc, "https://other.example") == 403
    finally:
        assert proc.stop() == 0
