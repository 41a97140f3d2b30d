"""The WebSocket protocol without a socket: wsproto plays the client and
builds every frame (so the frames are RFC 6455 as another implementation
reads it); chatd.net.websocket must read them back, however they are split."""

import base64
import hashlib
import random

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
    TextMessage,
)
from wsproto.events import Ping as WsPing
from wsproto.frame_protocol import Opcode

from chatd.net import websocket as wsp


def client_and_server() -> tuple[WSConnection, wsp.FrameReader, bytes]:
    """A wsproto client after a handshake with our Handshake; returns the
    client, a reader and the bytes that came after the request."""
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="example.test", target="/ws?x=1"))
    result = wsp.Handshake("/ws").feed(request)
    assert isinstance(result, wsp.Upgrade)
    client.receive_data(result.response)
    assert [type(e) for e in client.events()] == [AcceptConnection]
    return client, wsp.FrameReader(max_message=1000), result.rest


def frames_of(client: WSConnection, *events) -> bytes:
    return b"".join(client.send(e) for e in events)


def masked(opcode: int, payload: bytes, *, final: bool = True, rsv: int = 0) -> bytes:
    """A hand-built client frame (for what wsproto refuses to build)."""
    mask = bytes((1, 2, 3, 4))
    head = bytes(((0x80 if final else 0) | rsv | opcode,))
    n = len(payload)
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return head + mask + wsp.unmask(payload, mask)


def test_handshake_answers_the_accept_key_of_rfc_6455():
    # The example of RFC 6455 section 1.3.
    request = (
        b"GET /ws HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Origin: http://example.com\r\nSec-WebSocket-Version: 13\r\n\r\nEXTRA"
    )
    result = wsp.Handshake().feed(request)
    assert isinstance(result, wsp.Upgrade)
    assert b"101" in result.response.split(b"\r\n")[0]
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in result.response
    assert result.rest == b"EXTRA"
    assert result.headers["origin"] == "http://example.com"


def test_handshake_in_pieces():
    request = (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    shake = wsp.Handshake()
    for i in range(len(request) - 1):
        assert shake.feed(request[i : i + 1]) is None
    assert isinstance(shake.feed(request[-1:]), wsp.Upgrade)


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n", 404),
        (b"POST /ws HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /ws HTTP/1.1\r\nHost: h\r\n\r\n", 426),  # plain HTTP, no upgrade
        (
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
            426,
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        # A head that goes on past 16 KiB without ending.
        (b"GET /ws HTTP/1.1\r\nHost: h\r\n" + b"X: " + b"y" * 20000, 431),
    ],
)
def test_handshake_refusals(request_head, status):
    result = wsp.Handshake().feed(request_head)
    assert isinstance(result, wsp.Reject)
    assert result.status == status
    assert result.response.startswith(f"HTTP/1.1 {status} ".encode())
    head, _, body = result.response.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head


def upgrade_with(origin: str | None, host: str) -> bytes:
    head = f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    head += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    if origin is not None:
        head += f"Origin: {origin}\r\n"
    return (head + "\r\n").encode()


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "chat.example.com", (), True),  # not a browser
        ("https://chat.example.com", "chat.example.com", (), True),  # same origin behind a proxy
        ("https://chat.example.com", "chat.example.com:443", (), True),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", (), True),  # NGINX on another port
        ("http://127.0.0.1:8080", "127.0.0.1:8081", (), True),  # the embedded web client
        ("http://LOCALHOST:8080", "localhost:8081", (), True),
        ("http://127.0.0.1:9999", "127.0.0.1:8081", (), False),  # another local page
        ("https://evil.example", "chat.example.com", (), False),
        ("https://chat.example.com.evil.example", "chat.example.com", (), False),
        ("http://chat.example.com", "chat.example.com:443", (), False),  # scheme changes the port
        ("null", "chat.example.com", (), False),  # sandboxed frames, file: pages
        ("not an origin", "chat.example.com", (), False),
        ("https://app.example.org", "chat.example.com", ("https://app.example.org",), True),
        ("https://app.example.org:443", "chat.example.com", ("https://app.example.org",), True),
        ("https://other.example.org", "chat.example.com", ("https://app.example.org",), False),
        ("https://anything.example", "chat.example.com", ("*",), True),
    ],
)
def test_origin_policy(origin, host, allowed, ok):
    shake = wsp.Handshake("/ws", wsp.OriginPolicy(allowed, http_port=8080))
    result = shake.feed(upgrade_with(origin, host))
    if ok:
        assert isinstance(result, wsp.Upgrade)
    else:
        assert isinstance(result, wsp.Reject) and result.status == 403
        assert result.response.startswith(b"HTTP/1.1 403 Forbidden")


def test_messages_of_every_kind_and_split_anywhere():
    client, _, _ = client_and_server()
    stream = frames_of(
        client,
        TextMessage("hello"),
        TextMessage("ünïcødé ✓ 😀"),
        BytesMessage(b"\x00\x01"),
        WsPing(b"p"),
        TextMessage("x" * 300),  # a 16-bit length
        TextMessage("frag", message_finished=False),
        WsPing(b"inside"),  # a control frame inside a fragmented message
        TextMessage("mented", message_finished=True),
        CloseConnection(4000, "bye ✓"),
    )
    expected = [
        wsp.Text("hello"),
        wsp.Text("ünïcødé ✓ 😀"),
        wsp.Binary(b"\x00\x01"),
        wsp.Ping(b"p"),
        wsp.Text("x" * 300),
        wsp.Ping(b"inside"),
        wsp.Text("fragmented"),
        wsp.Close(4000, "bye ✓"),
    ]
    rng = random.Random(1)
    for _ in range(200):
        reader = wsp.FrameReader(max_message=1000)
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 12)))
        events = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            events += reader.feed(stream[a:b])
        assert events == expected, cuts
    # And one byte at a time.
    reader = wsp.FrameReader(max_message=1000)
    assert [e for i in range(len(stream)) for e in reader.feed(stream[i : i + 1])] == expected


def test_a_64_bit_length_frame():
    reader = wsp.FrameReader(max_message=70_000)
    assert reader.feed(masked(wsp.OP_TEXT, b"a" * 66_000)) == [wsp.Text("a" * 66_000)]


@pytest.mark.parametrize("pieces", [1, 3, 50])
def test_oversize_messages_are_dropped_as_they_arrive(pieces):
    """Over the limit: reported once, never buffered, and what follows is read."""
    big = masked(wsp.OP_TEXT, b"y" * 5000)
    fragmented = (
        masked(wsp.OP_TEXT, b"a" * 600, final=False)
        + masked(wsp.OP_PING, b"mid")
        + masked(wsp.OP_CONTINUATION, b"b" * 600, final=False)
        + masked(wsp.OP_CONTINUATION, b"c" * 600)
    )
    stream = big + masked(wsp.OP_TEXT, b"after") + fragmented + masked(wsp.OP_TEXT, b"end")
    reader = wsp.FrameReader(max_message=1000)
    events = []
    step = max(1, len(stream) // pieces)
    for i in range(0, len(stream), step):
        events += reader.feed(stream[i : i + step])
        # Never more than one frame head and the limit held.
        assert len(reader._buf) <= 1000 + 14
    assert events == [
        wsp.Oversize(5000),
        wsp.Text("after"),
        wsp.Ping(b"mid"),
        wsp.Oversize(1800),
        wsp.Text("end"),
    ]


def test_exactly_at_the_limit_is_delivered():
    reader = wsp.FrameReader(max_message=1000)
    assert reader.feed(masked(wsp.OP_TEXT, b"z" * 1000)) == [wsp.Text("z" * 1000)]
    assert reader.feed(masked(wsp.OP_TEXT, b"z" * 1001)) == [wsp.Oversize(1001)]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(wsp.OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (masked(wsp.OP_TEXT, b"x", rsv=0x40), 1002),  # a reserved bit
        (bytes((0x81, 0x02)) + b"hi", 1002),  # not masked
        (masked(0x3, b"x"), 1002),  # a reserved data opcode
        (masked(0xB, b"x"), 1002),  # a reserved control opcode
        (masked(wsp.OP_PING, b"x", final=False), 1002),  # a fragmented control frame
        (masked(wsp.OP_PING, b"x" * 126), 1002),  # a control frame over 125 bytes
        (masked(wsp.OP_CONTINUATION, b"x"), 1002),  # continuation of nothing
        (masked(wsp.OP_TEXT, b"a", final=False) + masked(wsp.OP_TEXT, b"b"), 1002),
        (masked(wsp.OP_CLOSE, b"\x03"), 1002),  # a one-byte close body
        (masked(wsp.OP_CLOSE, (1005).to_bytes(2, "big")), 1002),  # never on the wire
        (masked(wsp.OP_CLOSE, (999).to_bytes(2, "big")), 1002),
        (masked(wsp.OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"), 1007),
    ],
)
def test_protocol_errors(frame, code):
    reader = wsp.FrameReader(max_message=1000)
    events = reader.feed(frame)
    assert isinstance(events[-1], wsp.ProtocolError) and events[-1].code == code
    # Nothing more is read after a protocol error.
    assert reader.feed(masked(wsp.OP_TEXT, b"later")) == []


def test_close_without_a_code():
    assert wsp.FrameReader(10).feed(masked(wsp.OP_CLOSE, b"")) == [wsp.Close(1005, "")]


def test_server_frames_read_by_wsproto():
    client, _, _ = client_and_server()
    payloads = [b"{}", "é".encode() * 100, b"x" * 70_000]
    data = b"".join(wsp.text_frame(p) for p in payloads)
    data += wsp.ping_frame(b"hb") + wsp.close_frame(4008, "too slow ✓" + "!" * 200)
    client.receive_data(data)
    events = list(client.events())
    assert [e.data for e in events[:3]] == [p.decode() for p in payloads]
    assert events[3].payload == b"hb"
    assert isinstance(events[4], CloseConnection) and events[4].code == 4008
    assert events[4].reason.startswith("too slow ✓")
    # The reason was cut to fit a control frame, on a character boundary.
    assert len(wsp.close_frame(4008, "✓" * 100)) <= 2 + 125


def test_pong_frame_answers_a_ping():
    client, _, _ = client_and_server()
    client.receive_data(wsp.pong_frame(b"abc"))
    [event] = list(client.events())
    assert event.payload == b"abc"


def test_unmask_matches_the_definition():
    rng = random.Random(7)
    for n in (0, 1, 3, 4, 5, 127, 1000):
        data = rng.randbytes(n)
        mask = rng.randbytes(4)
        assert wsp.unmask(data, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_accept_key_formula():
    key = base64.b64encode(b"0123456789abcdef").decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    result = wsp.Handshake().feed(request)
    assert isinstance(result, wsp.Upgrade)
    expected = base64.b64encode(
        hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert expected in result.response


def test_opcode_constants_match_wsproto():
    assert wsp.OP_TEXT == Opcode.TEXT and wsp.OP_CLOSE == Opcode.CLOSE
    assert wsp.OP_PING == Opcode.PING and wsp.OP_PONG == Opcode.PONG


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "ip"),
    [
        ("203.0.113.9", None, (), "203.0.113.9"),
        ("203.0.113.9", "1.2.3.4", (), "203.0.113.9"),  # not from a proxy: header ignored
        ("10.0.0.2", "198.51.100.7", ("10.0.0.0/8",), "198.51.100.7"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.7", ("10.0.0.0/8",), "198.51.100.7"),  # forged left
        ("10.0.0.2", "198.51.100.7, 10.0.0.5", ("10.0.0.0/8",), "198.51.100.7"),  # two proxies
        ("10.0.0.2", "10.0.0.3", ("10.0.0.0/8",), "10.0.0.3"),  # all trusted: left-most
        ("10.0.0.2", "", ("10.0.0.0/8",), "10.0.0.2"),
        ("::1", "2001:db8::1", ("::1",), "2001:db8::1"),
        ("10.0.0.2", "junk", ("10.0.0.0/8",), "junk"),
    ],
)
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(peer, xff, trusted, ip):
    from chatd.net.clientip import client_ip, parse_networks

    assert client_ip(peer, xff, parse_networks(trusted)) == ip
