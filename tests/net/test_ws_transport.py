"""Transport over a real socket pair: writes never wait, queued bytes are
counted until the flusher hands them to the kernel, in order."""

import socket

import trio

from chatd.net.ws_outbox import OutboxBudget
from chatd.net.ws_transport import Transport


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


async def test_queued_bytes_are_counted_then_flushed_in_order():
    a, b = pair()
    budget = OutboxBudget()
    transport = Transport(a, budget)
    chunks = [bytes([i]) * 10_000 for i in range(20)]
    received = bytearray()
    async with trio.open_nursery() as nursery:
        for chunk in chunks:
            transport.write(chunk)  # never waits
        assert transport.outbox.frames > 0
        assert budget.queued == transport.outbox.bytes > 0
        transport.attach(nursery)
        while len(received) < sum(map(len, chunks)):
            await trio.lowlevel.wait_readable(b)
            received += b.recv(65536)
        await transport.drain()
    assert bytes(received) == b"".join(chunks)
    assert (transport.outbox.frames, transport.outbox.bytes, budget.queued) == (0, 0, 0)
    transport.close()
    b.close()


async def test_a_broken_socket_uncounts_everything_and_says_so_once():
    a, b = pair()
    budget = OutboxBudget()
    transport = Transport(a, budget)
    calls = []
    transport.on_broken = lambda: calls.append(1)
    transport.write(b"x" * 200_000)
    assert budget.queued > 0
    b.close()
    async with trio.open_nursery() as nursery:
        transport.attach(nursery)
        await transport.drain()
    transport.write(b"more")
    assert transport.broken
    assert calls == [1]
    assert (transport.outbox.frames, transport.outbox.bytes, budget.queued) == (0, 0, 0)
    transport.close()
