"""The Redis broker's Lua scripts as files (chatd/broker/lua/*.lua).

Every file is loaded and registered, compiles on a real ``redis-server``,
ships as package data, and runs through the broker: each script by the
broker call that uses it, even after Redis lost its script cache.
"""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from chatd.broker import scripts
from chatd.broker.redis import SCRIPTS, RedisBroker
from chatd.ports import QueueEntry, Routed, Taken
from harness.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent.parent
LUA = ROOT / "chatd" / "broker" / "lua"
FILES = sorted(p.name for p in LUA.glob("*.lua"))
FRAGMENTS = [f for f in FILES if f.startswith("_")]


def test_every_file_is_a_registered_script_or_a_fragment_one_uses() -> None:
    assert {f.removesuffix(".lua") for f in FILES if f not in FRAGMENTS} == set(scripts.NAMES)
    assert list(SCRIPTS) == list(scripts.NAMES)
    needed = set()
    for name in scripts.NAMES:
        needs, _code = scripts.read(f"{name}.lua")
        assert set(needs) <= set(FRAGMENTS), (name, needs)
        needed |= set(needs)
    assert needed == set(FRAGMENTS), "a fragment no script needs"
    for fragment in FRAGMENTS:
        assert scripts.read(fragment)[0] == [], "fragments need nothing themselves"


@pytest.mark.parametrize("name", scripts.NAMES)
def test_a_script_is_its_fragments_then_its_code_without_the_header(name: str) -> None:
    text = (LUA / f"{name}.lua").read_text()
    header = [line for line in text.splitlines() if line.startswith("--")]
    assert header and header[0].startswith(f"-- {name.upper()}:"), "documented first"
    needs, code = scripts.read(f"{name}.lua")
    script = SCRIPTS[name]
    assert script.source == "".join(scripts.read(f)[1] for f in needs) + code
    assert script.source.endswith(code) and not code.startswith("--")
    assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()


def test_the_lua_files_ship_as_package_data() -> None:
    """setup.cfg's package_data names every .lua file (a wheel without them
    fails at the first import of the broker)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = cfg["options.package_data"]["chatd.broker.lua"].split()
    for name in FILES:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.mark.parametrize("name", [f.removesuffix(".lua") for f in FILES])
def test_every_file_compiles_on_redis(server: RedisServer, name: str) -> None:
    """SCRIPT LOAD compiles without running: each file as it is on disk
    (header comments included), and each script as the broker sends it."""
    raw = (LUA / f"{name}.lua").read_text()
    assert server.command("SCRIPT", "LOAD", raw) == hashlib.sha1(raw.encode()).hexdigest()
    if name in SCRIPTS:
        assert server.command("SCRIPT", "LOAD", SCRIPTS[name].source) == SCRIPTS[name].sha


@pytest.fixture
async def broker(server: RedisServer) -> AsyncIterator[RedisBroker]:
    server.flushall()
    async with RedisBroker.from_url(server.url, presence_ttl=1.0, heartbeat_interval=0.2) as b:
        yield b


async def test_a_new_connection_registers_every_script(
    server: RedisServer, broker: RedisBroker
) -> None:
    server.command("SCRIPT", "FLUSH")
    await broker.ping()
    shas = [s.sha for s in SCRIPTS.values()]
    assert server.command("SCRIPT", "EXISTS", *shas) == [1] * len(shas)


def _uses(broker: RedisBroker, server: RedisServer) -> dict[str, Callable[[], Awaitable[object]]]:
    """For each script, a broker call that runs it, and what it answers."""

    async def route() -> object:
        await broker.route([Routed("bob", "k1", "p1", True)])
        return await broker.queued("bob")

    async def prune() -> object:
        # A connection of an incarnation without a heartbeat: presence prunes it.
        server.command("HSET", broker.user_key("bob", "conns"), "c9", "gone#0123")
        return (await broker.presence(["bob"]))["bob"].online

    async def detach() -> object:
        await broker.attach("bob", "n1", "c1")
        return await broker.detach("bob", "n1", "c1", 1)

    async def rotate() -> object:
        await broker.refresh_begin("f1", "bob", "d1", "j1", 4_000_000_000_000)
        return (await broker.refresh_rotate("f1", "d1", "d2", "j2", 4_000_000_000_000)).outcome

    return {
        "route": route,
        "queued": lambda: broker.queued("bob"),
        "enqueue": lambda: broker.enqueue("bob", [QueueEntry("k2", "p2")]),
        "purge": lambda: broker.purge("bob"),
        "settle": lambda: broker.settle("bob", ["k1"]),
        "attach": lambda: broker.attach("bob", "n1", "c1"),
        "detach": detach,
        "prune": prune,
        "take": lambda: broker.take("u:bob:send", 1, 1.0, 5),
        "rotate": rotate,
    }


EXPECTED: dict[str, object] = {
    "route": [("k1", "p1")],
    "queued": [],
    "enqueue": 1,
    "purge": 0,
    "settle": None,
    "attach": True,
    "detach": True,
    "prune": False,
    "rotate": "rotated",
}


@pytest.mark.parametrize("name", scripts.NAMES)
async def test_each_script_runs_through_the_broker_after_a_script_flush(
    server: RedisServer, broker: RedisBroker, name: str
) -> None:
    """The broker's call answers right although Redis forgot every script
    (NOSCRIPT: the call goes again with the source, which caches it)."""
    await broker.ping()  # connected: the scripts were loaded...
    server.command("SCRIPT", "FLUSH")  # ...and are gone
    assert server.command("SCRIPT", "EXISTS", SCRIPTS[name].sha) == [0]
    with trio.fail_after(5):
        got = await _uses(broker, server)[name]()
    if name == "route":
        assert isinstance(got, list)
        got = [(o.key, o.payload) for o in got]
    if name == "take":
        assert got == Taken(1, 0.0)
    else:
        assert got == EXPECTED[name]
    assert server.command("SCRIPT", "EXISTS", SCRIPTS[name].sha) == [1]
