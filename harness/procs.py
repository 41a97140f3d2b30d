"""Run real ``chatd serve`` processes for tests, on free loopback ports."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def shared_secrets(data_dir: Path) -> dict[str, str]:
    """The environment that lets replicas share users and messages, as
    ``chatd serve`` demands with a Redis broker or a MongoDB store: one
    explicit JWT secret (48 random bytes, URL-safe) and an explicit key file
    in ``data_dir`` (created by the first replica; chatctl finds it there)."""
    return {
        "CHATD_JWT_SECRET": secrets.token_urlsafe(48),
        "CHATD_KEY_FILE": str(data_dir / "keys.json"),
    }


#: The directory that holds the ``harness`` package (the repository root).
HARNESS_ROOT = Path(__file__).resolve().parent.parent

#: The environment that turns the per-address and per-account caps off:
#: every test user comes from 127.0.0.1, and load runs hold many devices.
UNLIMITED_LOGINS = {
    "CHATD_LOGIN_PER_IP": "0",
    "CHATD_LOGIN_PER_USER": "0",
    "CHATD_REGISTER_PER_IP": "0",
    "CHATD_MAX_SOCKETS_PER_IP": "0",
    "CHATD_MAX_SOCKETS_PER_USER": "0",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a process if it still runs; SIGKILL it after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


@dataclass
class ChatdProcess:
    """One ``chatd serve`` process. ``start()`` returns once /healthz answers."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    http_port: int = 0
    ws_port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: The module run with ``python -m``: ``chatd`` itself, or a launcher that
    #: wires a test double first (harness.mongomock_serve).
    module: str = "chatd"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/ws"

    def start(self, timeout: float = 20.0) -> ChatdProcess:
        self.http_port = self.http_port or free_port()
        # Two free_port() calls can return the same port (it is free again
        # once the probe closes): chatd refuses one port for both.
        while not self.ws_port or self.ws_port == self.http_port:
            self.ws_port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_path or self.data_dir / f"chatd-{self.http_port}.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CHATD_") or k.startswith("CHATD_TEST_")
        }
        # Every test user logs in and registers from 127.0.0.1: the per-address
        # and per-account caps are off unless a test sets them (its flags beat
        # these).
        env.update(UNLIMITED_LOGINS)
        env.update(self.env)
        if self.module.split(".")[0] == "harness":
            # The harness is not installed (it does not ship): its launcher
            # imports from the source tree.
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(HARNESS_ROOT), env.get("PYTHONPATH", "")) if p
            )
        cmd = [
            sys.executable,
            "-m",
            self.module,
            "serve",
            "--host",
            self.host,
            "--http-port",
            str(self.http_port),
            "--ws-port",
            str(self.ws_port),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process's lifetime
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_http(self.http_url + "/healthz", timeout, self.proc)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""
