"""A throwaway ``redis-server`` for tests and benchmarks.

Never the machine's own Redis: every instance listens on a free loopback
port, keeps its files in a temporary directory and persists nothing
(``--save "" --appendonly no``), so a restart loses all data, like a Redis
that crashed without persistence::

    with RedisServer() as server:
        broker = RedisBroker.from_url(server.url)
        ...
        server.stop()       # graceful shutdown (SIGTERM)
        server.kill()       # SIGKILL
        server.restart()    # same port, empty data set
        server.freeze()     # SIGSTOP: a hung server; server.thaw() resumes
        server.flushall()
        server.command("KEYS", "*")

The helper is synchronous (subprocess and a blocking socket); its calls take
milliseconds, so async tests may call it directly.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def cluster_free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too: Redis
    Cluster refuses ports above 55535."""
    for _ in range(200):
        candidate = random.randint(20000, 55535)
        try:
            for p in (candidate, candidate + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return candidate
    raise RuntimeError("no free port pair for a Redis Cluster node")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisError(Exception):
    """An error reply (``-ERR ...``) from :meth:`RedisServer.command`."""


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 and a free port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str = REDIS_SERVER,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 10.0,
        cluster: bool = False,
        own_all_slots: bool = True,
    ) -> None:
        """``cluster=True`` starts a one-node Redis Cluster that owns every
        slot: a plain client works, and Redis refuses any command or script
        whose keys span two slots (CROSSSLOT), as a real cluster would. With
        ``own_all_slots=False`` the node starts empty, to be joined into a
        bigger cluster (:mod:`harness.redis_cluster`)."""
        self.host = "127.0.0.1"
        self.port = port or (cluster_free_port() if cluster else free_port())
        self.executable = executable
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.cluster = cluster
        self.own_all_slots = own_all_slots
        self.dir = tempfile.mkdtemp(prefix="chatd-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        log = open(os.path.join(self.dir, "redis.log"), "ab")  # noqa: SIM115 - owned by proc
        try:
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    self.host,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir,
                    "--protected-mode",
                    "yes",
                    "--daemonize",
                    "no",
                    *(
                        ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
                        if self.cluster
                        else ()
                    ),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} on port {self.port}; "
                    f"log: {self._log_tail()}"
                )
            with contextlib.suppress(OSError, RedisError):
                if self.command("PING") == "PONG" and self._cluster_ready():
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def _cluster_ready(self) -> bool:
        if not self.cluster or not self.own_all_slots:
            return True
        if "cluster_state:ok" in self.command("CLUSTER", "INFO"):
            return True
        if int(self.command("CLUSTER", "COUNTKEYSINSLOT", 0)) == 0:
            with contextlib.suppress(RedisError):  # already assigned: wait for ok
                self.command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM); with ``--save ""`` nothing is written."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, clients see their connections reset."""
        self._end(signal.SIGKILL, 10.0)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers (a
        hung server); :meth:`thaw` resumes it."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port, with no data."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a frozen server could not act on SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    # -- a minimal blocking client ---------------------------------------------------------

    def command(self, *args: str | int | float | bytes, timeout: float = 5.0) -> Any:
        """Send one command on a fresh connection; the decoded reply (str, int,
        list, None). An error reply raises :class:`RedisError`."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(_encode(args))
            return _Reader(sock).reply()

    def transaction(self, *commands: tuple[str | int | float | bytes, ...]) -> list[Any]:
        """Run ``commands`` as one MULTI/EXEC transaction (nothing else runs in
        between); their replies."""
        with socket.create_connection((self.host, self.port), timeout=5.0) as sock:
            sock.sendall(b"".join(_encode(c) for c in (("MULTI",), *commands, ("EXEC",))))
            reader = _Reader(sock)
            for _ in range(len(commands) + 1):
                reader.reply()  # OK, then QUEUED per command
            return reader.reply()  # type: ignore[no-any-return]

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def keys(self, pattern: str = "*") -> list[str]:
        """Every key matching ``pattern`` (SCAN, so safe on a big data set)."""
        out: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            out.extend(batch)
            if cursor == "0":
                return sorted(set(out))


def _encode(args: tuple[str | int | float | bytes, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Reader:
    """Reads one RESP2 reply from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n).decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line!r}")
