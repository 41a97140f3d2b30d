#!/usr/bin/env python3
"""Capacity benchmark: chatd beside two references, same workload, one run.

    .venv/bin/python loadtest/bench.py [--publish] [--quick] [--only chatd1,node1 ...]

For each configuration — chatd with 1 replica (direct, embedded broker),
chatd with 2 replicas behind NGINX (Redis), and the same two shapes of each
reference: the Node.js stack chatd replaces (``loadtest/reference/node/``:
socket.io 4 with ``@socket.io/redis-adapter``, relay and receipts, no store;
installed with ``npm ci`` by the bench itself) and a python-socketio server
(``loadtest/reference/server.py``: store, fsync and AES-GCM like chatd; its
``AsyncRedisManager`` for two instances) — 2 instances behind the same NGINX
config — it:

1. registers ``--pairs`` pairs of users over the HTTP API (once per
   implementation: the configurations of one implementation share a data dir);
2. steps an **open-loop** message rate (``--rates``; each step ``--seconds``
   long, the first ``--warmup`` seconds not counted) with ``--drivers``
   driver processes (``loadtest/driver.py``, asyncio + aiohttp, in the load
   venv, each from its own 127.0.0.x source address), the recipient acking and
   marking seen at once, the sender acking both receipts;
3. stops stepping at the first step whose p99 delivery exceeds ``--slo-ms``
   (100) or that lost anything (a message or receipt missing, a send never
   confirmed) twice in a row (``--retries 1``: one stall on a shared VM
   should not end a run; a step during which other processes took more than
   ``--max-others`` % of a core is measured again, uncounted), and reports
   the highest step that held: delivered msgs/s and p50 / p99 / p99.9 of
   delivery and of the seen-receipt round trip.

Every step reports the servers' CPU per delivered message (ms; NGINX and
Redis beside it) and, for chatd, trio task steps and store commits per
message (``--count-task-steps``, ``chatd_store_writes_total``).

Then **idle memory**: one replica of chatd (Redis broker, as deployed) and
one instance of each reference (on Redis) each hold 1k, 5k and 10k
authenticated idle connections; RSS growth over the baseline divided by the
connections.

Then **profiles** of chatd under load with py-spy: one replica at 70% of
its highest held rate, and replica r1 of the 2-replica setup at the first rate
it did not hold; each once on the GIL (Python CPU) and once on the wall clock
(waiting too), summarised by where the samples fall.

Output: ``loadtest/results/<UTC timestamp>/`` gets ``bench.md`` (tables,
machine, method), ``bench.json`` (everything, with latency percentiles),
``bench.png`` (latency percentile plot) and the py-spy profile;
``--publish`` also copies ``bench.md`` and ``bench.png`` to ``docs/``.

The driver and the servers share this machine's cores: on a 2-core machine
the load generator takes a good part of the CPU, so the numbers are a floor
for the server, and the chatd / reference ratios are the figure to read.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
try:
    import trio  # noqa: F401  (only to check this is the project's venv)
except ImportError:  # re-run with the project's python, which has chatd's deps
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    raise

sys.path.insert(0, str(ROOT))
from harness.cluster import Cluster  # noqa: E402
from harness.nginx import NginxProcess  # noqa: E402
from harness.procs import ChatdProcess, free_port, stop_process, wait_http  # noqa: E402
from harness.redis_server import RedisServer  # noqa: E402
from loadtest import loadvenv, noderef  # noqa: E402

PASSWORD = "bench-password"
PERCENTILES = (50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)
DEFAULT_RATES = "100,200,300,400,500,600,700,800,1000,1200,1400,1700,2000,2400,3000"
CHATD_ARGS = ["--rate", "0", "--log-level", "warning", "--count-task-steps", "1"]
LABELS = {
    "chatd1": "chatd, 1 replica (direct)",
    "chatd2": "chatd, 2 replicas + NGINX + Redis",
    "ref1": "python-socketio reference, 1 instance (direct)",
    "ref2": "python-socketio reference, 2 instances + NGINX + Redis",
    "node1": "Node.js socket.io reference, 1 instance (direct)",
    "node2": "Node.js socket.io reference, 2 instances + NGINX + Redis",
}
#: Configurations in report order, and which reference each chatd shape meets.
CONFIGS = ("chatd1", "chatd2", "node1", "node2", "ref1", "ref2")
REFERENCES = {"node": ("node1", "node2"), "python-socketio": ("ref1", "ref2")}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fsync_ms(directory: Path, n: int = 50) -> float:
    """Median time of a small write + fsync here: the floor under every commit."""
    path = directory / "fsync-probe"
    times = []
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(b"x" * 512)
            t0 = time.perf_counter()
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    path.unlink()
    return round(sorted(times)[n // 2] * 1000, 2)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def machine_jiffies() -> tuple[float, float, float]:
    """Seconds of (busy, steal, total) CPU time over all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    steal = values[7] if len(values) > 7 else 0
    return (sum(values[:8]) - idle - steal) / hz, steal / hz, sum(values[:8]) / hz


#: Counters summed over the replicas' /metrics before and after each step.
COUNTERS = ("chatd_task_steps_total", "chatd_store_writes_total")


def scrape(urls: list[str]) -> dict[str, float] | None:
    """The sums of :data:`COUNTERS` over these /metrics pages (None if one fails)."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in totals:
                totals[name] += float(value)
    return totals


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the systems under test ------------------------------------------------------------


@dataclass
class Target:
    """A running configuration: where to connect and which pids serve it."""

    name: str
    impl: str  # the driver's protocol: chatd | sio
    family: str  # whose users: chatd | pysio | node (each has its own accounts)
    http: str
    ws: str
    server_pids: list[int]
    other_pids: list[int] = field(default_factory=list)  # nginx, redis
    stop: object = None  # callable
    #: chatd replicas' /metrics (read for task steps); none for the references
    metrics: list[str] = field(default_factory=list)


class RefProcess:
    """One reference server (loadtest/reference/server.py) on the load venv."""

    def __init__(self, python: Path, data: Path, secret: str, node: str, redis_url: str = ""):
        self.port = free_port()
        data.mkdir(parents=True, exist_ok=True)
        log = open(data / f"{node}.log", "ab")  # noqa: SIM115 - owned by the process
        cmd = [str(python), str(ROOT / "loadtest" / "reference" / "server.py")]
        cmd += ["--port", str(self.port), "--data-dir", str(data), "--secret", secret]
        cmd += ["--node", node] + (["--redis-url", redis_url] if redis_url else [])
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_http(f"http://127.0.0.1:{self.port}/healthz", 30, self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def chatd_secrets(data: Path, secret: str) -> dict[str, str]:
    """One JWT secret and key file for every chatd configuration of a run:
    the users registered (and tokens issued) on the first serve them all."""
    return {"CHATD_JWT_SECRET": secret, "CHATD_KEY_FILE": str(data / "keys.json")}


def start_target(name: str, work: Path, python: Path, secret: str) -> Target:
    if name == "chatd1":
        data = work / "chatd" / "data"
        node = ChatdProcess(data, args=CHATD_ARGS, env=chatd_secrets(data, secret)).start()
        return Target(
            name,
            "chatd",
            "chatd",
            node.http_url,
            node.ws_url,
            [node.proc.pid],
            stop=node.stop,
            metrics=[node.http_url + "/metrics"],
        )
    if name in ("chatd2", "chatd-idle"):
        replicas = 2 if name == "chatd2" else 1
        cluster = Cluster(
            work / "chatd",
            replicas=replicas,
            extra_args=CHATD_ARGS,
            with_nginx=replicas > 1,
            secrets=chatd_secrets(work / "chatd" / "data", secret),
        ).start()
        http = cluster.url if cluster.nginx else cluster.nodes[0].http_url
        ws = cluster.ws_url if cluster.nginx else cluster.nodes[0].ws_url
        others = [cluster.redis.proc.pid] + ([cluster.nginx.proc.pid] if cluster.nginx else [])
        pids = [n.proc.pid for n in cluster.nodes]
        metrics = [n.http_url + "/metrics" for n in cluster.nodes]
        return Target(
            name, "chatd", "chatd", http, ws, pids, others, stop=cluster.close, metrics=metrics
        )
    if name in ("ref1", "ref2", "ref-idle"):
        data = work / "reference"

        def make_ref(node: str, redis_url: str) -> Any:
            return RefProcess(python, data, secret, node, redis_url)

        # The python reference keeps its users in SQLite: ref1 and ref2 share them.
        return _references(
            name, "pysio", work, make_ref, 2 if name == "ref2" else 1, name != "ref1"
        )
    if name in ("node1", "node2", "node-idle"):
        node_bin = noderef.ensure_installed()
        data = work / "node-reference"

        def make_node(node: str, redis_url: str) -> Any:
            return noderef.NodeRefProcess(node_bin, data, secret, node, redis_url)

        # Its users live in its memory (one instance) or its Redis: each start is new.
        count = 2 if name == "node2" else 1
        return _references(name, name, work, make_node, count, name != "node1")
    raise ValueError(name)


def _references(
    name: str, family: str, work: Path, make: Any, count: int, with_redis: bool
) -> Target:
    """``count`` reference instances (on one Redis when ``with_redis``; behind
    the repository's NGINX config when more than one)."""
    redis = RedisServer().start() if with_redis else None
    refs: list[Any] = []
    nginx = None
    try:
        refs = [make(f"{name}-{i + 1}", redis.url if redis else "") for i in range(count)]
        if count > 1:
            ups = [f"127.0.0.1:{r.port}" for r in refs]
            nginx = NginxProcess(work / f"{name}-nginx", http_upstreams=ups, ws_upstreams=ups)
            nginx.start()
    except BaseException:
        for r in refs:
            r.stop()
        if redis is not None:
            redis.close()
        raise

    def stop() -> None:
        if nginx is not None:
            nginx.stop()
        for r in refs:
            r.stop()
        if redis is not None:
            redis.close()

    http = nginx.url if nginx else refs[0].url
    ws = nginx.ws_url if nginx else refs[0].url.replace("http", "ws") + "/ws"
    others = ([redis.proc.pid] if redis else []) + ([nginx.proc.pid] if nginx else [])
    return Target(name, "sio", family, http, ws, [r.proc.pid for r in refs], others, stop=stop)


# -- users -------------------------------------------------------------------------------


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def make_users(http: str, pairs: int, path: Path) -> None:
    tag = secrets.token_hex(3)

    def one(i: int) -> list[str]:
        row = []
        for side in "ab":
            name = f"b{side}{i}x{tag}"
            post(http + "/api/register", {"username": name, "password": PASSWORD})
            token = post(http + "/api/login", {"username": name, "password": PASSWORD})["token"]
            row += [name, token]
        return row

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(one, range(pairs)))
    path.write_text(json.dumps(rows))


# -- drivers -----------------------------------------------------------------------------


class Driver:
    def __init__(self, python: Path, mode: str, target: Target, users: Path, i: int, n: int, extra):
        cmd = [str(python), str(ROOT / "loadtest" / "driver.py"), mode, "--impl", target.impl]
        cmd += ["--url", target.ws, "--users", str(users), "--index", str(i), "--of", str(n)]
        cmd += ["--src", f"127.0.0.{2 + i}", *extra]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def tell(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_step(args, python: Path, target: Target, users: Path, rate: float) -> dict:
    n = args.drivers
    extra = ["--rate", str(rate / n), "--seconds", str(args.seconds)]
    extra += ["--warmup", str(args.warmup), "--drain", str(args.drain)]
    drivers = [Driver(python, "load", target, users, i, n, extra) for i in range(n)]
    try:
        for d in drivers:
            d.read()  # ready
        pids = target.server_pids + target.other_pids
        cpu0 = {p: cpu_seconds(p) for p in pids + [d.proc.pid for d in drivers]}
        steps0 = scrape(target.metrics) if target.metrics else None
        m0 = machine_jiffies()
        start = time.monotonic() + 0.5
        for d in drivers:
            d.tell({"start": start})
        results = [d.read()["result"] for d in drivers]
        elapsed = time.monotonic() - start
        cpu = {p: cpu_seconds(p) - c for p, c in cpu0.items()}
        m1 = machine_jiffies()
        steps1 = scrape(target.metrics) if steps0 is not None else None
    finally:
        for d in drivers:
            d.close()
    lat: dict[str, list[float]] = {}
    for r in results:
        for k, vs in r["lat_ms"].items():
            lat.setdefault(k, []).extend(vs)
    for vs in lat.values():
        vs.sort()
    loss = {k: sum(r["loss"][k] for r in results) for k in results[0]["loss"]}
    window = results[0]["window"]
    # Per delivered message, over the whole step (warm-up and drain included:
    # CPU and steps are counted from the start signal to the last result).
    delivered = max(1, loss["delivered"])
    server_cpu = sum(cpu[p] for p in target.server_pids)
    other_cpu = sum(cpu[p] for p in target.other_pids)
    step = {
        "rate": rate,
        "scheduled": sum(r["scheduled"] for r in results),
        "delivered_per_s": round(sum(r["delivered_in_window"] for r in results) / window, 1),
        "loss": loss,
        "receipts_missing": sum(r["receipts_missing"] for r in results),
        "unconfirmed_sends": sum(r["unconfirmed_sends"] for r in results),
        "errors": {k: v for r in results for k, v in r["errors"].items()},
        "driver_lag_max_ms": max(r["lag_max_ms"] for r in results),
        "worst_delivery_by_second_ms": [
            max(r["worst_by_second_ms"].get(str(i), 0.0) for r in results)
            for i in range(int(window) + 1)
        ],
        "percentiles": {
            k: {str(p): round(pct(vs, p), 2) for p in PERCENTILES} for k, vs in lat.items()
        },
        "samples": {k: len(vs) for k, vs in lat.items()},
        "cpu_pct": {
            "servers": round(100 * sum(cpu[p] for p in target.server_pids) / elapsed, 1),
            "nginx_redis": round(100 * sum(cpu[p] for p in target.other_pids) / elapsed, 1),
            "drivers": round(100 * sum(cpu[d.proc.pid] for d in drivers) / elapsed, 1),
            # everything else on the machine (another job, the kernel's softirqs), and the
            # hypervisor's steal: a noisy step shows here
            "others": round(100 * (m1[0] - m0[0] - sum(cpu.values())) / elapsed, 1),
            "steal": round(100 * (m1[1] - m0[1]) / elapsed, 1),
        },
        "per_message": {
            "server_cpu_ms": round(1000 * server_cpu / delivered, 3),
            "nginx_redis_cpu_ms": round(1000 * other_cpu / delivered, 3),
            **{
                key: (
                    round((steps1[name] - steps0[name]) / delivered, 2)
                    if steps0 is not None and steps1 is not None
                    else None
                )
                for key, name in (
                    ("task_steps", "chatd_task_steps_total"),
                    ("store_writes", "chatd_store_writes_total"),
                )
            },
        },
    }
    p99 = step["percentiles"]["delivered"]["99"]
    reasons = []
    if not p99 <= args.slo_ms:
        reasons.append(f"p99 delivery {p99} ms > {args.slo_ms} ms")
    if loss["missing"]:
        reasons.append(f"{loss['missing']} messages missing")
    if step["receipts_missing"]:
        reasons.append(f"{step['receipts_missing']} receipts missing")
    if step["unconfirmed_sends"]:
        reasons.append(f"{step['unconfirmed_sends']} sends never confirmed")
    step["held"] = not reasons
    step["why_not"] = "; ".join(reasons)
    return step


def bench_config(args, python: Path, name: str, work: Path, secret: str, users: dict) -> dict:
    print(f"bench: {LABELS[name]}", flush=True)
    target = start_target(name, work, python, secret)
    steps = []
    try:
        impl_users = users.get(target.family)
        if impl_users is None:
            impl_users = work / f"users-{target.family}.json"
            t0 = time.monotonic()
            make_users(target.http, args.pairs, impl_users)
            print(f"  {args.pairs} pairs registered in {time.monotonic() - t0:.0f} s", flush=True)
            users[target.family] = impl_users
        for rate in args.rates:
            attempt = disturbed = 0
            while attempt <= args.retries:
                step = run_step(args, python, target, impl_users, rate)
                noisy = step["cpu_pct"]["others"] > args.max_others
                if noisy and disturbed < 3:
                    disturbed += 1  # something else took the CPU: measure again, uncounted
                    print(f"  {rate:6.0f} msg/s: disturbed ({step['cpu_pct']}), again", flush=True)
                    continue
                attempt += 1
                step["attempt"] = attempt
                step["disturbed"] = noisy
                steps.append(step)
                d, s = step["percentiles"]["delivered"], step["percentiles"]["seen_rtt"]
                print(
                    f"  {rate:6.0f} msg/s offered: delivered {step['delivered_per_s']:7.1f}/s"
                    f"  delivery p50 {d['50']:6.1f} p99 {d['99']:7.1f} p99.9 {d['99.9']:7.1f} ms"
                    f"  seen-rtt p99 {s['99']:7.1f} ms  cpu {step['cpu_pct']}"
                    f"  per msg {per_msg_cell(step)} ms, {steps_cell(step)} steps/commits"
                    f"  {'ok' if step['held'] else 'missed: ' + step['why_not']}",
                    flush=True,
                )
                if step["held"]:
                    break
            if not step["held"]:
                break
    finally:
        target.stop()
    held = [s for s in steps if s["held"]]
    return {"name": name, "label": LABELS[name], "steps": steps, "best": held[-1] if held else None}


def bench_idle(args, python: Path, name: str, work: Path, secret: str) -> dict:
    """Its own data dir and users: nothing owed from the load steps (an overloaded
    step can leave a backlog) reaches the idle connections."""
    print(f"bench: idle connections, {name}", flush=True)
    work = work / "idle"
    target = start_target(name, work, python, secret)
    impl = target.impl
    rows = []
    users = {impl: work / f"users-{impl}.json"}
    try:
        make_users(target.http, args.idle_users // 2, users[impl])
        time.sleep(2)
        pid = target.server_pids[0]
        base = rss_kib(pid)
        n = args.drivers
        drivers = [Driver(python, "idle", target, users[impl], i, n, []) for i in range(n)]
        try:
            total = 0
            for goal in args.idle:
                add = goal - total
                for i, d in enumerate(drivers):
                    d.tell({"open": add // n + (1 if i < add % n else 0)})
                total = sum(d.read()["open"] for d in drivers)
                time.sleep(3)
                rss = rss_kib(pid)
                rows.append(
                    {
                        "connections": total,
                        "rss_mib": round(rss / 1024, 1),
                        "base_mib": round(base / 1024, 1),
                        "kib_per_conn": round((rss - base) / total, 1),
                    }
                )
                print(
                    f"  {total} idle: RSS {rss / 1024:.1f} MiB (base {base / 1024:.1f})"
                    f" = {(rss - base) / total:.1f} KiB/connection",
                    flush=True,
                )
            for d in drivers:
                d.tell({"close": True})
        finally:
            for d in drivers:
                d.close()
    finally:
        target.stop()
    return {"name": name, "rows": rows, "users": args.idle_users}


# -- profile -------------------------------------------------------------------------------


RULES = [
    ("WorkerThread._work (trio/_core/_thread_cache", "idle: worker thread waiting for a job"),
    ("get_events (trio/_core/_io_epoll", "idle: trio waiting in epoll"),
    ("Tx.__enter__ (chatd/store/sqlite", "SQLite BEGIN IMMEDIATE (waiting for the write lock)"),
    ("Tx.__exit__ (chatd/store/sqlite", "SQLite COMMIT (fsync)"),
    ("sqlite3", "SQLite (store)"),
    ("chatd/store/", "SQLite (store)"),
    ("cryptography", "AES-GCM"),
    ("chatd/crypto", "AES-GCM"),
    ("chatd/net/websocket", "WebSocket framing (chatd.net.websocket)"),
    ("h11/", "WebSocket framing (chatd.net.websocket)"),
    ("json/", "JSON encode/decode"),
    ("orjson", "JSON encode/decode"),
    ("chatd/broker/resp", "Redis client (chatd.broker.resp, hiredis)"),
    ("hiredis", "Redis client (chatd.broker.resp, hiredis)"),
    ("logging/", "logging"),
    ("trio/_core/_thread_cache", "handing work to threads (trio.to_thread)"),
    ("trio/_threads", "handing work to threads (trio.to_thread)"),
    ("outcome/", "handing work to threads (trio.to_thread)"),
    ("trio/_socket", "socket send/recv (trio)"),
    ("trio/_highlevel_socket", "socket send/recv (trio)"),
    ("trio/_core/_io_epoll", "epoll (trio)"),
    ("trio/", "trio scheduler, channels, locks, cancel scopes"),
    ("chatd/core/", "chatd core (frames, session, receipts)"),
    ("chatd/", "chatd service, hub, broker, net"),
    ("hypercorn", "HTTP (hypercorn)"),
    ("threading.py", "thread start/wait"),
]


def categorize(stack: list[str]) -> str:
    """From the leaf up, the first frame whose module says what the work is."""
    for frame in reversed(stack):
        for needle, label in RULES:
            if needle in frame:
                return label
    return "other"


def profile_chatd(
    args, python: Path, work: Path, users: dict, secret: str, name: str, rate: float, gil: bool
) -> dict:
    """py-spy over one chatd replica while the driver offers ``rate``.

    ``gil``: sample only the thread holding the GIL (where Python CPU goes);
    otherwise every non-idle thread (wall clock: shows waiting too).
    """
    print(f"bench: profiling {name} at {rate:.0f} msg/s with py-spy", flush=True)
    pyspy = str(loadvenv.bin_path("py-spy"))
    target = start_target(name, work, python, secret)
    out = work / f"profile-{name}.txt"
    cmd = [pyspy, "record", "--pid", str(target.server_pids[0]), "--format", "raw"]
    cmd += ["--rate", "200", "--threads", "-o", str(out), "--duration", str(int(args.seconds))]
    cmd += ["--gil"] if gil else []
    spy_log = work / f"py-spy-{name}.log"
    try:
        with spy_log.open("wb") as log:
            spy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        step = run_step(args, python, target, users["chatd"], rate)
        spy.wait(60)
    finally:
        target.stop()
    if not out.exists():
        print(f"  py-spy wrote nothing: {spy_log.read_text()[-500:]}", flush=True)
        return {"name": name, "error": "py-spy wrote nothing (is ptrace permitted?)"}
    return {
        "name": name,
        "rate": rate,
        "gil": gil,
        **summarize_profile(out, args.seconds),
        "step": {k: step[k] for k in ("delivered_per_s", "cpu_pct", "held", "percentiles")},
        "file": out.name,
    }


def summarize_profile(raw: Path, seconds: float) -> dict:
    """Samples by category (:data:`RULES`) and the top leaves of a py-spy raw file."""
    cats: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack_text.split(";")
        total += n
        cat = categorize(frames)
        cats[cat] = cats.get(cat, 0) + n
        leaf = frames[-1]
        leaves[leaf] = leaves.get(leaf, 0) + n
    top = sorted(cats.items(), key=lambda kv: -kv[1])
    return {
        "samples": total,
        "busy_pct": round(100 * total / (200 * int(seconds)), 1),
        "categories": [(k, round(100 * v / max(1, total), 1)) for k, v in top],
        "top_leaves": [
            (k, round(100 * v / max(1, total), 1))
            for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:15]
        ],
    }


# -- report --------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return f"{v:.1f}" if v == v else "—"


def cpu_cell(cpu: dict) -> str:
    keys = ("servers", "nginx_redis", "drivers", "others")
    return " / ".join(f"{max(0.0, cpu[k]):.0f}%" if k in cpu else "—" for k in keys)


def per_msg_cell(step: dict) -> str:
    """Server CPU ms per delivered message (+ NGINX and Redis), and task steps."""
    pm = step.get("per_message")
    if not pm:
        return "—"
    cell = f"{pm['server_cpu_ms']:.2f}"
    if pm["nginx_redis_cpu_ms"]:
        cell += f" (+{pm['nginx_redis_cpu_ms']:.2f})"
    return cell


def steps_cell(step: dict) -> str:
    """Task steps and store commits per delivered message."""
    pm = step.get("per_message") or {}
    if pm.get("task_steps") is None:
        return "—"
    cell = f"{pm['task_steps']:.0f}"
    if pm.get("store_writes") is not None:
        cell += f" / {pm['store_writes']:.2f}"
    return cell


def ratio_table(doc: dict) -> list[str]:
    """chatd / each reference, for one process and for two: throughput at each
    one's highest held rate, p99s there, and CPU per message there."""
    best = {c["name"]: c["best"] for c in doc["configs"]}
    rows = []
    for ref, shapes in REFERENCES.items():
        for n, (a, r) in enumerate(zip(("chatd1", "chatd2"), shapes, strict=True), start=1):
            ca, cr = best.get(a), best.get(r)
            if not (ca and cr):
                continue
            pa, pr = ca["percentiles"], cr["percentiles"]
            cpu_a = (ca.get("per_message") or {}).get("server_cpu_ms")
            cpu_r = (cr.get("per_message") or {}).get("server_cpu_ms")
            cpu = f"{cpu_a / cpu_r:.2f}" if cpu_a and cpu_r else "—"
            rows.append(
                f"| {ref} | {n} | {ca['delivered_per_s'] / cr['delivered_per_s']:.2f}"
                f" | {pa['delivered']['99'] / pr['delivered']['99']:.2f}"
                f" | {pa['seen_rtt']['99'] / pr['seen_rtt']['99']:.2f} | {cpu} |"
            )
    if not rows:
        return []
    return [
        "",
        "chatd / reference (throughput: higher is better for chatd; p99 and server CPU per"
        " message at each one's own highest held rate: lower is better for chatd):",
        "",
        "| reference | replicas | delivered msg/s | delivery p99 | seen RTT p99"
        " | server CPU per message |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]


IDLE = (("chatd", "chatd-idle"), ("Node.js", "node-idle"), ("python-socketio", "ref-idle"))


def idle_table(doc: dict) -> list[str]:
    runs = {label: doc["idle"].get(name, {}).get("rows", []) for label, name in IDLE}
    runs = {label: {r["connections"]: r for r in rows} for label, rows in runs.items() if rows}
    if not runs:
        return []
    users = next(iter(doc["idle"].values())).get("users", doc["params"]["pairs"] * 2)
    labels = list(runs)
    head = " | ".join(f"{label} RSS MiB | {label} KiB/conn" for label in labels)
    lines = [
        "",
        "## Idle connections",
        "",
        "Authenticated, silent WebSockets held by one process; RSS growth over the"
        " process's baseline (after start-up and user registration) per connection."
        f" {users} users of their own (a fresh data dir), each holding several connections"
        " (devices).",
        "",
        f"| connections | {head} |",
        "|---:|" + "---:|---:|" * len(labels),
    ]
    for n in sorted({c for rows in runs.values() for c in rows}):
        cells = []
        for label in labels:
            r = runs[label].get(n)
            cells.append(f"{r['rss_mib']} | {r['kib_per_conn']}" if r else "— | —")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def report_md(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# chatd capacity benchmark",
        "",
        f"Run {doc['when']} on **{m['cpu']}, {m['cores']} cores**, {m['memory_gib']} GiB,"
        f" {m['os']}, Python {m['python']}; a 512-byte write + fsync takes {m.get('fsync_ms')} ms"
        f" (median). Command: `{doc['command']}`.",
        "",
        f"Open-loop load between {doc['params']['pairs']} pairs of users, steps of"
        f" {doc['params']['seconds']:.0f} s (first {doc['params']['warmup']:.0f} s not counted),"
        f" {doc['params']['drivers']} driver processes; the recipient acks and marks each message"
        " seen at once, the sender acks both receipts. A step holds if p99 delivery ≤"
        f" {doc['params']['slo_ms']:.0f} ms and nothing is lost; the table shows the highest step"
        " that held. *Delivery* is the send's due time → the recipient's `message`; *seen RTT*"
        " is the recipient's `seen` → the sender's `seen` receipt; both on one clock.",
        "",
        "**The load driver runs on the same cores as the servers** (2 cores here): at the top"
        " steps the drivers take a large share of the CPU (column *driver CPU*), so the absolute"
        " numbers are a floor for the servers; the chatd / reference ratios compare like"
        " with like. CPU is in % of one core (the machine has"
        f" {m['cores'] * 100}%); *others* is whatever else ran on the machine during the step."
        " Two replicas on two cores get no more CPU than one: they pay for the Redis and NGINX"
        " hops with the same cores.",
        "",
        "## Throughput and latency",
        "",
        "| configuration | highest rate held | delivered msg/s | delivery p50 / p99 / p99.9 ms"
        " | seen RTT p50 / p99 / p99.9 ms | server CPU | server CPU ms / msg (+ NGINX, Redis)"
        " | task steps / commits per msg | driver CPU | others | next step |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in doc["configs"]:
        b = c["best"]
        nxt = c["steps"][-1] if c["steps"] and not c["steps"][-1]["held"] else None
        why = f"{nxt['rate']:.0f}/s: {nxt['why_not']}" if nxt else "not reached (raise --rates)"
        if b is None:
            lines.append(f"| {c['label']} | — | — | — | — | — | — | — | — | — | {why} |")
            continue
        d, s = b["percentiles"]["delivered"], b["percentiles"]["seen_rtt"]
        lines.append(
            f"| {c['label']} | {b['rate']:.0f} | {b['delivered_per_s']:.0f}"
            f" | {fmt(d['50'])} / {fmt(d['99'])} / {fmt(d['99.9'])}"
            f" | {fmt(s['50'])} / {fmt(s['99'])} / {fmt(s['99.9'])}"
            f" | {b['cpu_pct']['servers']:.0f}% | {per_msg_cell(b)} | {steps_cell(b)}"
            f" | {b['cpu_pct']['drivers']:.0f}%"
            f" | {max(0.0, b['cpu_pct'].get('others', 0.0)):.0f}% | {why} |"
        )
    lines += ratio_table(doc)
    if doc.get("idle"):
        lines += idle_table(doc)
    profiles = [p for p in doc.get("profiles", []) if "categories" in p]
    if profiles:
        lines += [
            "",
            "## Where chatd's time goes",
            "",
            "py-spy at 200 samples/s on one replica (`r1`) for one step. *GIL* samples only"
            " the thread holding the GIL: where Python CPU goes; *busy* is the share of the"
            " time the GIL was held. *Wall* samples every thread that is not idle: it shows"
            " waiting too (the fsync worker, idle threads). Each sample is counted once, under"
            " the first frame from the top of its stack that names the work.",
        ]
        for p in profiles:
            d = p["step"]["percentiles"]["delivered"]
            lines += [
                "",
                f"**{LABELS[p['name']]}, {p['rate']:.0f} msg/s offered,"
                f" {'GIL' if p['gil'] else 'wall'}** ({p['samples']} samples"
                + (f", GIL held {p['busy_pct']}% of the time" if p["gil"] else "")
                + f"; delivered {p['step']['delivered_per_s']:.0f}/s, delivery p99 {fmt(d['99'])}"
                " ms):",
                "",
                "| share | where |",
                "|---:|---|",
                *[f"| {share}% | {cat} |" for cat, share in p["categories"][:10]],
            ]
    lines += [
        "",
        "## Every step",
        "",
        "| configuration | offered msg/s | delivered msg/s | delivery p50 / p99 / p99.9 ms"
        " | seen RTT p99 ms | missing | CPU: servers / NGINX+Redis / drivers / others"
        " | server CPU ms / msg | task steps / commits per msg | held |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for c in doc["configs"]:
        for s in c["steps"]:
            d = s["percentiles"]["delivered"]
            lines.append(
                f"| {c['name']} | {s['rate']:.0f}{' (again)' if s.get('attempt', 1) > 1 else ''}"
                f" | {s['delivered_per_s']:.0f}"
                f" | {fmt(d['50'])} / {fmt(d['99'])} / {fmt(d['99.9'])}"
                f" | {fmt(s['percentiles']['seen_rtt']['99'])} | {s['loss']['missing']}"
                f" | {cpu_cell(s['cpu_pct'])}{' (disturbed)' if s.get('disturbed') else ''}"
                f" | {per_msg_cell(s)} | {steps_cell(s)}"
                f" | {'yes' if s['held'] else 'no: ' + s['why_not']} |"
            )
    lines += ["", "![latency percentiles](bench.png)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--drivers", type=int, default=2)
    parser.add_argument("--rates", default=DEFAULT_RATES)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--slo-ms", type=float, default=100.0)
    parser.add_argument(
        "--retries", type=int, default=1, help="run a step that missed again before stopping"
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=25.0,
        help="repeat (up to 3 times, uncounted) a step during which other processes on the"
        " machine used more than this %% of a core",
    )
    parser.add_argument("--idle", default="1000,5000,10000")
    parser.add_argument("--idle-users", type=int, default=200)
    parser.add_argument(
        "--update",
        type=Path,
        default=None,
        help="a results dir: run only --only's parts again and replace them in its bench.json",
    )
    parser.add_argument(
        "--only",
        default=",".join((*CONFIGS, "idle", "profile")),
        help="what to run: chatd1,chatd2,node1,node2,ref1,ref2,idle,profile",
    )
    parser.add_argument(
        "--chatd-args",
        default="",
        help="extra arguments for every chatd, e.g. '--commit-window 5' (for measuring levers)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run: to try the tooling")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--publish", action="store_true", help="copy to docs/bench.{md,png}")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="with --update DIR: measure nothing; write DIR's report again from its bench.json"
        " (profiles re-read from their raw files with the current categories)",
    )
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.seconds, args.warmup = 20, 5.0, 1.0
        args.rates, args.idle = "200,400", "500,1000"
    args.rates = [float(r) for r in args.rates.split(",")]
    CHATD_ARGS.extend(shlex.split(args.chatd_args))
    args.idle = [int(n) for n in args.idle.split(",")]
    only = set(args.only.split(","))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = (args.update or args.results or ROOT / "loadtest" / "results" / stamp).resolve()
    work = results / "work"
    work.mkdir(parents=True, exist_ok=True)
    python = loadvenv.ensure()
    secret = secrets.token_hex(24)
    users: dict[str, Path] = {}
    doc: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "loadtest/bench.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "nofile": hard,
            "fsync_ms": fsync_ms(work),
        },
        "params": {
            k: getattr(args, k) for k in ("pairs", "drivers", "seconds", "warmup", "slo_ms")
        },
        "configs": [],
        "idle": {},
    }
    if args.rerender and not args.update:
        parser.error("--rerender needs --update DIR")
    if args.update:
        old = json.loads((results / "bench.json").read_text())
        if args.rerender:
            only = set()  # measure nothing; the run's own machine and command stay
            for prof in old.get("profiles", []):
                kind = "gil" if prof["gil"] else "wall"
                raw = results / f"profile-{prof['name']}-{prof['rate']:.0f}-{kind}.txt"
                if "categories" in prof and raw.exists():
                    prof.update(summarize_profile(raw, old["params"]["seconds"]))
        else:
            if only & {*CONFIGS, "idle", "profile"}:
                old["command"] += f"`, then `{doc['command']}"
            old["machine"] = doc["machine"]
        doc = old
    t_start = time.monotonic()
    for name in CONFIGS:
        if name in only:
            result = bench_config(args, python, name, work, secret, users)
            doc["configs"] = [c for c in doc["configs"] if c["name"] != name] + [result]
    if "idle" in only:
        for _label, name in IDLE:
            doc["idle"][name] = bench_idle(args, python, name, work, secret)
    if "profile" in only:
        if "chatd" not in users:
            target = start_target("chatd1", work, python, secret)
            try:
                users["chatd"] = work / "users-chatd.json"
                make_users(target.http, args.pairs, users["chatd"])
            finally:
                target.stop()
        configs = {c["name"]: c for c in doc["configs"]}
        plan = []
        c1 = configs.get("chatd1")
        plan.append(("chatd1", round(0.7 * c1["best"]["rate"], -1) if c1 and c1["best"] else 300))
        c2 = configs.get("chatd2")
        failed = c2["steps"][-1]["rate"] if c2 and not c2["steps"][-1]["held"] else None
        plan.append(("chatd2", failed or 400))
        doc["profiles"] = []
        for name, rate in plan:
            for gil in (True, False):
                prof = profile_chatd(args, python, work, users, secret, name, rate, gil)
                doc["profiles"].append(prof)
                src = work / f"profile-{name}.txt"
                if src.exists():
                    kind = "gil" if gil else "wall"
                    shutil.copy(src, results / f"profile-{name}-{rate:.0f}-{kind}.txt")
    order = list(CONFIGS)
    doc["configs"].sort(key=lambda c: order.index(c["name"]))
    if not args.rerender:
        doc["duration_s"] = round(time.monotonic() - t_start)
    doc["command"] = doc["command"].strip()
    (results / "bench.json").write_text(json.dumps(doc, indent=1))
    (results / "bench.md").write_text(report_md(doc))
    plot = subprocess.run(
        [
            str(python),
            str(ROOT / "loadtest" / "plot.py"),
            str(results / "bench.json"),
            str(results / "bench.png"),
        ],
        check=False,
    )
    print((results / "bench.md").read_text())
    print(f"bench: results in {results}", flush=True)
    if args.publish:
        shutil.copy(results / "bench.md", ROOT / "docs" / "bench.md")
        if plot.returncode == 0:
            shutil.copy(results / "bench.png", ROOT / "docs" / "bench.png")
        print("bench: copied to docs/bench.md and docs/bench.png", flush=True)
    shutil.rmtree(work / "chatd" / "data", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
