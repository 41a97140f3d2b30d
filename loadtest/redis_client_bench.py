"""Which Redis client for the broker: measure the hot path, route().

Runs on a throwaway ``redis-server`` (free loopback port, no persistence;
never the machine's Redis) and measures, for each client:

* **messages/s**: routing one-to-one messages, each a batch of two items
  (the recipient's owed copy and the sender's other devices' live copy, so
  two users, two scripts, one pipelined round trip), with N concurrent
  senders for a few seconds. Half of the users are online: their scripts
  SPUBLISH to their node channels, which a subscriber drains.
* **round trips per message**: sequential routes through a counting TCP
  proxy; a round trip is one burst of bytes from the client to the server.
* **Redis commands per message** (INFO commandstats), to show every client
  makes Redis do the same work.

Clients (each runs the broker's own ROUTE script with the same arguments):

* ``chatd resp/trio``: the broker itself, ``RedisBroker.route`` on
  :mod:`chatd.broker.resp` (one pipelined connection, hiredis; what every
  task submits in a scheduler pass goes out in one write).
* ``coredis/trio Pipeline``: coredis's ``pipeline(transaction=False)`` on
  trio (the broker's client until chatd 0.3); skipped unless ``coredis`` is
  installed (``pip install coredis``).
* ``redis-py+hiredis thread``: redis-py, synchronous, on one dedicated
  thread that takes every request queued meanwhile into one pipeline, called
  from trio (the other design the issue named); skipped without ``redis``.
* ``redis-py/asyncio``: redis-py's asyncio client (no trio support, so for
  comparison only); skipped without ``redis``.

Usage::

    python loadtest/redis_client_bench.py [--seconds 3] [--concurrency 1,16,64]
                                          [--rounds 3] [--users 1000] [--json out.json]

The clients take turns, ``--rounds`` times, and each figure is the median
over the rounds with the range beside it, because a shared machine's noise
is larger than one run shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chatd.broker.redis import SCRIPTS, RedisBroker
from chatd.ports import Routed
from harness.redis_server import RedisServer

NODE = "bench"
TOKEN = "0" * 16
INCARNATION = f"{NODE}#{TOKEN}"
PAYLOAD = json.dumps(
    {
        "t": "m",
        "id": "01J0000000000000000000000",
        "c": "dm:alice:bob",
        "s": 42,
        "f": "alice",
        "b": "x" * 200,  # a sealed body of a short message
        "ts": 1_700_000_000_000,
    }
)

Route = Callable[[list[Routed]], Awaitable[None]]


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    server = subprocess.run(
        [RedisServer().executable, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "cpu": cpu,
        "python": platform.python_version(),
        "redis_server": server,
    }
    info["trio"] = trio.__version__
    info["hiredis"] = hiredis.__version__
    for module, key in (("coredis", "coredis"), ("redis", "redis_py")):
        try:
            info[key] = __import__(module).__version__
        except ImportError:
            info[key] = None
    return info


# -- workload ---------------------------------------------------------------------------------


class Workload:
    def __init__(self, users: int) -> None:
        self.users = [f"user{i:05d}" for i in range(users)]
        self.online = self.users[::2]
        self.seq = 0

    def message(self) -> list[Routed]:
        self.seq += 1
        sender, recipient = random.sample(self.users, 2)
        key = f"m{self.seq:012d}"
        return [
            Routed(recipient, key, PAYLOAD, queued=True),
            Routed(sender, key, PAYLOAD, queued=False, exclude="conn-1"),
        ]

    def seed(self, server: RedisServer, names: RedisBroker) -> None:
        server.flushall()
        for user in self.online:
            server.command("HSET", names.user_key(user, "conns"), f"conn-{user}", INCARNATION)


class Drain:
    """A subscriber on the online users' channels of the node that reads and
    drops everything."""

    def __init__(self, server: RedisServer, channels: list[str]) -> None:
        self.sock = socket.create_connection((server.host, server.port))
        payload = b"".join(
            f"*2\r\n$11\r\nSSUBSCRIBE\r\n${len(c)}\r\n{c}\r\n".encode() for c in channels
        )
        self.sock.sendall(payload)
        self.bytes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                self.bytes += len(chunk)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class CountingProxy:
    """A TCP proxy to Redis that counts client→server bursts (round trips when
    requests are sequential)."""

    def __init__(self, server: RedisServer) -> None:
        self.target = (server.host, server.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bursts = 0
        self.bytes_up = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self.bursts += 1
                        self.bytes_up += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.bursts, self.bytes_up

    def close(self) -> None:
        self.listener.close()


def evalsha_calls(server: RedisServer) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in server.command("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls = int(rest.split(",")[0].split("=")[1])
            out[name.removeprefix("cmdstat_")] = calls
    return out


# -- clients ------------------------------------------------------------------------------------


def batches(names: RedisBroker, items: list[Routed]) -> list[tuple[list[str], list[Any]]]:
    """(keys, args) of the broker's ROUTE scripts for ``items``, as it builds them."""
    return [(keys, args) for _script, keys, args in names._route_calls(items)]


async def drive_trio(route: Route, work: Workload, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    done = 0
    deadline = trio.current_time() + seconds

    async def sender() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            t = time.perf_counter()
            await route(work.message())
            latencies.append(time.perf_counter() - t)
            done += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(sender)
    return summary(done, trio.current_time() - start, latencies)


async def drive_asyncio(route: Route, work: Workload, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    done = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def sender() -> None:
        nonlocal done
        while loop.time() < deadline:
            t = time.perf_counter()
            await route(work.message())
            latencies.append(time.perf_counter() - t)
            done += 1

    start = loop.time()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return summary(done, loop.time() - start, latencies)


def summary(done: int, elapsed: float, latencies: list[float]) -> dict:
    latencies.sort()
    return {
        "messages": done,
        "messages_per_s": round(done / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
    }


async def chatd_run(url: str, work: Workload, seconds: float, conc: list[int]) -> dict:
    async with RedisBroker.from_url(url) as broker:
        for _ in range(50):  # warm up: connection, script cache
            await broker.route(work.message())
        out: dict[str, Any] = {}
        for c in conc:
            out[f"c{c}"] = await drive_trio(broker.route, work, seconds, c)
        return out


async def chatd_sequential(url: str, work: Workload, n: int, proxy: CountingProxy) -> None:
    async with RedisBroker.from_url(url) as broker:
        await sequential(broker.route, work, n, proxy)


async def sequential(route: Route, work: Workload, n: int, proxy: CountingProxy) -> None:
    for _ in range(20):
        await route(work.message())
    proxy.mark = proxy.snapshot()  # type: ignore[attr-defined]
    for _ in range(n):
        await route(work.message())
    proxy.end = proxy.snapshot()  # type: ignore[attr-defined]


def coredis_pipeline_route(client: Any, names: RedisBroker) -> Route:
    import coredis.exceptions

    script = SCRIPTS["route"]

    async def route(items: list[Routed]) -> None:
        calls = batches(names, items)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(script.sha, keys, args)
        except coredis.exceptions.NoScriptError:
            await client.script_load(script.source)
            async with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(script.sha, keys, args)

    return route


async def coredis_run(url: str, work: Workload, seconds: float, conc: list[int]) -> dict:
    import coredis

    names = RedisBroker(url)
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        route = coredis_pipeline_route(client, names)
        for _ in range(50):
            await route(work.message())
        out: dict[str, Any] = {}
        for c in conc:
            out[f"c{c}"] = await drive_trio(route, work, seconds, c)
        return out


async def coredis_sequential(url: str, work: Workload, n: int, proxy: CountingProxy) -> None:
    import coredis

    names = RedisBroker(url)
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        await sequential(coredis_pipeline_route(client, names), work, n, proxy)


class ThreadClient:
    """redis-py (hiredis parser) on one dedicated thread: every request queued
    while the thread was busy goes into its next pipeline; trio callers park
    until the thread hands their replies back through the trio token."""

    def __init__(self, url: str, names: RedisBroker) -> None:
        import queue

        import redis

        self.names = names
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.sha = SCRIPTS["route"].sha
        self.client.script_load(SCRIPTS["route"].source)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import queue

        import outcome

        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs = [first]
            while True:
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if None in jobs:
                return
            pipe = self.client.pipeline(transaction=False)
            for calls, _task in jobs:
                for keys, args in calls:
                    pipe.evalsha(self.sha, len(keys), *keys, *args)
            result = outcome.capture(pipe.execute)
            for _calls, task in jobs:
                # An outcome is unwrapped once: one of its own for every caller.
                each = (
                    outcome.Value(result.value)
                    if isinstance(result, outcome.Value)
                    else outcome.Error(result.error)
                )
                self.token.run_sync_soon(trio.lowlevel.reschedule, task, each)

    async def route(self, items: list[Routed]) -> None:
        self.queue.put((batches(self.names, items), trio.lowlevel.current_task()))
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.client.close()


async def thread_run(url: str, work: Workload, seconds: float, conc: list[int]) -> dict:
    client = ThreadClient(url, RedisBroker(url))
    try:
        for _ in range(50):
            await client.route(work.message())
        out: dict[str, Any] = {}
        for c in conc:
            out[f"c{c}"] = await drive_trio(client.route, work, seconds, c)
        return out
    finally:
        client.close()


async def thread_sequential(url: str, work: Workload, n: int, proxy: CountingProxy) -> None:
    client = ThreadClient(url, RedisBroker(url))
    try:
        await sequential(client.route, work, n, proxy)
    finally:
        client.close()


def redis_py_route(client: Any, names: RedisBroker) -> Route:
    import redis.exceptions

    sha = SCRIPTS["route"].sha
    source = SCRIPTS["route"].source

    async def route(items: list[Routed]) -> None:
        calls = batches(names, items)
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            try:
                await pipe.execute()
            except redis.exceptions.NoScriptError:
                await client.script_load(source)
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                await pipe.execute()

    return route


async def redis_py_run(url: str, work: Workload, seconds: float, conc: list[int]) -> dict:
    import redis.asyncio

    names = RedisBroker(url)
    client = redis.asyncio.Redis.from_url(url, decode_responses=True, max_connections=64)
    try:
        route = redis_py_route(client, names)
        for _ in range(50):
            await route(work.message())
        out: dict[str, Any] = {}
        for c in conc:
            out[f"c{c}"] = await drive_asyncio(route, work, seconds, c)
        return out
    finally:
        await client.aclose()


async def redis_py_sequential(url: str, work: Workload, n: int, proxy: CountingProxy) -> None:
    import redis.asyncio

    names = RedisBroker(url)
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        await sequential(redis_py_route(client, names), work, n, proxy)
    finally:
        await client.aclose()


# -- main ---------------------------------------------------------------------------------------


class Client:
    def __init__(
        self,
        name: str,
        throughput: Callable[[str, Workload, float, list[int]], dict],
        sequential: Callable[[str, Workload, int, CountingProxy], None],
    ) -> None:
        self.name = name
        self.throughput = throughput
        self.sequential = sequential
        self.rounds: list[dict] = []
        self.commands: dict[str, float] = {}
        self.round_trips = 0.0
        self.bytes_up = 0


def clients() -> list[Client]:
    out = [
        Client(
            "chatd resp/trio",
            lambda url, work, secs, conc: trio.run(chatd_run, url, work, secs, conc),
            lambda url, work, n, proxy: trio.run(chatd_sequential, url, work, n, proxy),
        )
    ]
    try:
        import coredis  # noqa: F401
    except ImportError:
        print("coredis is not installed: skipped (pip install coredis)", flush=True)
    else:
        out.append(
            Client(
                "coredis/trio Pipeline",
                lambda url, work, secs, conc: trio.run(coredis_run, url, work, secs, conc),
                lambda url, work, n, proxy: trio.run(coredis_sequential, url, work, n, proxy),
            )
        )
    try:
        import redis  # noqa: F401
    except ImportError:
        print("redis-py is not installed: skipped (pip install redis)", flush=True)
    else:
        out += [
            Client(
                "redis-py+hiredis thread",
                lambda url, work, secs, conc: trio.run(thread_run, url, work, secs, conc),
                lambda url, work, n, proxy: trio.run(thread_sequential, url, work, n, proxy),
            ),
            Client(
                "redis-py/asyncio",
                lambda url, work, secs, conc: asyncio.run(redis_py_run(url, work, secs, conc)),
                lambda url, work, n, proxy: asyncio.run(redis_py_sequential(url, work, n, proxy)),
            ),
        ]
    return out


def run_round(
    client: Client, server: RedisServer, work: Workload, names: RedisBroker, opts: Any
) -> None:
    work.seed(server, names)
    drain = Drain(server, [names.user_channel(u, INCARNATION) for u in work.online])
    try:
        before = evalsha_calls(server)
        sent_before = work.seq
        result = client.throughput(server.url, work, opts.seconds, opts.conc)
        after = evalsha_calls(server)
    finally:
        drain.close()
    if not client.commands:
        messages = work.seq - sent_before
        client.commands = {
            cmd: round((after.get(cmd, 0) - before.get(cmd, 0)) / messages, 2)
            for cmd in sorted(after)
            if after.get(cmd, 0) - before.get(cmd, 0) >= messages / 100
            and cmd not in ("info", "flushall", "hset")
        }
    client.rounds.append(result)
    print(
        f"{client.name}: "
        + ", ".join(f"{k} {v['messages_per_s']}/s p99 {v['p99_ms']} ms" for k, v in result.items()),
        flush=True,
    )


def count_round_trips(client: Client, server: RedisServer, work: Workload, n: int) -> None:
    proxy = CountingProxy(server)
    try:
        client.sequential(proxy.url, work, n, proxy)
        (b0, u0), (b1, u1) = proxy.mark, proxy.end  # type: ignore[attr-defined]
        client.round_trips = round((b1 - b0) / n, 3)
        client.bytes_up = round((u1 - u0) / n)
    finally:
        proxy.close()


def report_of(client: Client, conc: list[int]) -> dict:
    out: dict[str, Any] = {
        "round_trips_per_message": client.round_trips,
        "bytes_to_redis_per_message": client.bytes_up,
        "redis_commands_per_message": client.commands,
        "messages_per_s": {},
    }
    for c in conc:
        rates = [r[f"c{c}"]["messages_per_s"] for r in client.rounds]
        p99 = [r[f"c{c}"]["p99_ms"] for r in client.rounds]
        out["messages_per_s"][f"concurrency {c}"] = {
            "median": int(statistics.median(rates)),
            "min": min(rates),
            "max": max(rates),
            "p99_ms_median": statistics.median(p99),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--json", help="write the results here too")
    opts = parser.parse_args()
    opts.conc = [int(c) for c in opts.concurrency.split(",")]

    report: dict[str, Any] = {"machine": machine(), "clients": {}}
    print(json.dumps(report["machine"]), flush=True)
    work = Workload(opts.users)
    contenders = clients()
    with RedisServer() as server:
        names = RedisBroker(server.url)
        for _ in range(opts.rounds):
            for client in contenders:
                run_round(client, server, work, names, opts)
        for client in contenders:
            count_round_trips(client, server, work, opts.sequential)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    for client in contenders:
        report["clients"][client.name] = report_of(client, opts.conc)
    print(json.dumps(report, indent=2), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
