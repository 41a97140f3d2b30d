"""A whole deployment on loopback, for tests and load runs: one real
``redis-server`` (or a Redis given by URL: a cluster, sentinels), N ``chatd
serve`` replicas sharing it (and one SQLite data dir, as replicas on one
host can), and a real ``nginx`` in front with the repository's config.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.nginx import NginxProcess
from harness.procs import ChatdProcess, shared_secrets
from harness.redis_server import RedisServer


@dataclass
class Cluster:
    workdir: Path
    replicas: int = 2
    extra_args: list[str] = field(default_factory=list)
    with_nginx: bool = True
    nginx_access_log: bool = False
    redis: RedisServer | None = None
    #: Use this Redis (not started or stopped here) instead of starting one.
    redis_url: str = ""
    nodes: list[ChatdProcess] = field(default_factory=list)
    nginx: NginxProcess | None = None
    #: The JWT secret and key file every replica shares (see shared_secrets).
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def _replica(self, i: int, http_port: int = 0, ws_port: int = 0) -> ChatdProcess:
        url = self.redis_url or (self.redis.url if self.redis is not None else "")
        if not self.secrets:
            self.secrets = shared_secrets(self.data_dir)
        return ChatdProcess(
            self.data_dir,
            env={"CHATD_REDIS_URL": url, "CHATD_NODE_ID": f"r{i + 1}", **self.secrets},
            args=["--public-ws-url", "/ws", *self.extra_args],
            http_port=http_port,
            ws_port=ws_port,
            log_path=self.workdir / f"r{i + 1}.log",
        )

    def start(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.redis = RedisServer().start()
        try:
            for i in range(self.replicas):
                self.nodes.append(self._replica(i).start())
            if self.with_nginx:
                self.nginx = NginxProcess(
                    self.workdir / "nginx",
                    http_upstreams=[f"127.0.0.1:{n.http_port}" for n in self.nodes],
                    ws_upstreams=[f"127.0.0.1:{n.ws_port}" for n in self.nodes],
                    access_log=self.nginx_access_log,
                ).start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    @property
    def ws_url(self) -> str:
        assert self.nginx is not None
        return self.nginx.ws_url

    def kill(self, i: int) -> None:
        """kill -9 replica ``i`` (no drain, no cleanup)."""
        proc = self.nodes[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, i: int) -> int:
        """SIGTERM replica ``i`` (drain) and wait; returns its exit code."""
        return self.nodes[i].stop()

    def restart(self, i: int) -> ChatdProcess:
        """Start replica ``i`` again on its old ports (NGINX knows those)."""
        old = self.nodes[i]
        if old.proc is not None and old.proc.poll() is None:
            old.stop()
        self.nodes[i] = self._replica(i, old.http_port, old.ws_port).start()
        return self.nodes[i]

    def close(self) -> list[int]:
        codes = []
        if self.nginx is not None:
            self.nginx.stop()
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                try:
                    codes.append(node.stop())
                except subprocess.TimeoutExpired:
                    codes.append(-9)
        if self.redis is not None:
            self.redis.close()
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- r{i + 1} ---\n{n.logs()[-3000:]}" for i, n in enumerate(self.nodes))
