"""chatd's Redis client (chatd.broker.resp): encoding and slots without a
server, then one pipelined connection against a real ``redis-server``."""

from __future__ import annotations

import random

import hiredis
import pytest
import trio

from chatd.broker import resp
from harness.redis_server import RedisServer


@pytest.mark.parametrize(
    "command",
    [
        ("PING",),
        ("SET", "key", "value", "PX", 1000),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", 3.5, "ünïcødé ✓"),
        ("SET", b"\x00\xff binary", "x"),
        ("SET", "", ""),
    ],
)
def test_commands_encode_as_resp_arrays(command):
    reader = hiredis.Reader()
    reader.feed(resp.encode(command))
    expected = [a if isinstance(a, bytes) else str(a).encode("utf-8") for a in command]
    assert reader.gets() == expected
    assert reader.gets() is False  # nothing more


def test_hash_slots_of_the_cluster_spec():
    assert resp.hash_slot("123456789") == 12739  # CRC16/XMODEM check value 0x31C3
    # Keys with the same hash tag share a slot; an empty tag is no tag.
    assert resp.hash_slot("{user1000}.following") == resp.hash_slot("{user1000}.followers")
    assert resp.hash_slot("foo{}{bar}") == resp.hash_slot(b"foo{}{bar}")
    assert resp.hash_slot("foo{{bar}}zap") == resp.hash_slot("{bar")
    assert resp.hash_slot("foo{bar}{zap}") == resp.hash_slot("bar")
    assert all(0 <= resp.hash_slot(f"k{i}") < 16384 for i in range(1000))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:7000", resp.Address("127.0.0.1", 7000)),
        (
            "redis://chatd:s%40cret@cache.internal:6380/3",
            resp.Address("cache.internal", 6380, username="chatd", password="s@cret", db=3),
        ),
        ("redis://:only-password@h", resp.Address("h", 6379, password="only-password")),
        (
            "rediss://h:6390/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem",
            resp.Address("h", 6390, tls=True, verify=False, ca_file="/etc/ca.pem"),
        ),
        ("unix:///run/redis.sock?db=2", resp.Address(path="/run/redis.sock", db=2)),
    ],
)
def test_addresses_from_urls(url, expected):
    assert resp.Address.from_url(url) == expected


def test_a_url_that_is_not_redis_is_refused():
    with pytest.raises(ValueError, match="not a Redis URL"):
        resp.Address.from_url("http://localhost:6379")


@pytest.fixture(scope="module")
def server():
    with RedisServer() as server:
        yield server


async def connection(server: RedisServer, nursery: trio.Nursery, **kw) -> resp.Connection:
    conn = await resp.Connection.open(
        resp.Address.from_url(server.url),
        connect_timeout=1,
        reply_timeout=kw.get("reply_timeout", 2.0),
    )
    await nursery.start(conn.run)
    return conn


async def test_many_callers_share_one_connection(server, nursery):
    conn = await connection(server, nursery)
    got: dict[int, list] = {}

    async def caller(i: int) -> None:
        await trio.sleep(random.uniform(0, 0.01))
        got[i] = await conn.call(("SET", f"resp:{i}", i), ("GET", f"resp:{i}"), ("INCR", "resp:n"))

    async with trio.open_nursery() as callers:
        for i in range(300):
            callers.start_soon(caller, i)
    assert all(got[i][:2] == ["OK", str(i)] for i in range(300))
    assert sorted(g[2] for g in got.values()) == list(range(1, 301))
    conn.close()


async def test_error_replies_come_back_in_place(server, nursery):
    conn = await connection(server, nursery)
    ok, err, after = await conn.call(("SET", "resp:e", "x"), ("INCR", "resp:e"), ("GET", "resp:e"))
    assert ok == "OK" and after == "x"
    assert isinstance(err, resp.ReplyError) and "not an integer" in str(err)
    conn.close()


async def test_a_cancelled_caller_leaves_the_connection_whole(server, nursery):
    conn = await connection(server, nursery)
    with trio.move_on_after(0):
        await conn.call(("SET", "resp:c", "first"))
    # Its reply still comes and is dropped; the next caller gets its own.
    assert await conn.call(("GET", "resp:c")) == ["first"]
    assert conn.alive
    conn.close()


async def test_submit_calls_back_in_order(server, nursery):
    conn = await connection(server, nursery)
    order: list[object] = []
    done = trio.Event()
    for i in range(5):
        conn.submit([("INCR", "resp:o")], lambda r, i=i: order.append((i, r[0])))
    conn.submit([("PING",)], lambda r: done.set())
    with trio.fail_after(2):
        await done.wait()
    assert [i for i, _ in order] == [0, 1, 2, 3, 4]
    assert [v for _, v in order] == sorted(v for _, v in order)
    conn.close()


async def test_a_hung_server_fails_what_is_outstanding_within_the_reply_timeout(nursery):
    with RedisServer() as server:
        conn = await connection(server, nursery, reply_timeout=0.5)
        await conn.call(("PING",))
        server.freeze()
        try:
            lost: list[object] = []
            conn.submit([("PING",)], lost.append)
            start = trio.current_time()
            with pytest.raises(resp.ConnectionLost, match="did not answer"), trio.fail_after(3):
                await conn.call(("PING",))
            assert trio.current_time() - start < 1.0
            assert len(lost) == 1 and isinstance(lost[0], resp.ConnectionLost)
            assert not conn.alive
            with pytest.raises(resp.ConnectionLost):
                conn.submit([("PING",)], lost.append)
        finally:
            server.thaw()


async def test_a_killed_server_fails_the_connection(nursery):
    with RedisServer() as server:
        conn = await connection(server, nursery)
        await conn.call(("PING",))
        server.kill()
        with pytest.raises(resp.ConnectionLost), trio.fail_after(3):
            while True:
                await conn.call(("PING",))
                await trio.sleep(0.01)
        with trio.fail_after(2):
            await conn.done.wait()


async def test_no_server_is_a_connection_lost_not_a_hang():
    with RedisServer() as server:
        address = resp.Address.from_url(server.url)
    with pytest.raises(resp.ConnectionLost, match="cannot connect"), trio.fail_after(3):
        await resp.Connection.open(address, connect_timeout=1, reply_timeout=1)
