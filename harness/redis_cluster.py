"""Throwaway Redis Cluster and Sentinel set-ups on loopback, for tests.

Never the machine's own Redis: every server listens on a free loopback
port, keeps nothing on disk, and is killed (its directory removed) on
:meth:`close`.

* :class:`RedisClusterSet`: ``masters`` masters with ``replicas`` replicas
  each, joined with ``redis-cli --cluster create … --cluster-yes``; it can
  kill a master (its replica is promoted), move slots (``redis-cli
  --cluster reshard``) and say which node owns a slot.
* :class:`SentinelSet`: a master, a replica and three sentinels watching
  them; :meth:`SentinelSet.fail_over` kills the master and waits until the
  sentinels name the promoted replica.

Both are synchronous, like :class:`~harness.redis_server.RedisServer`:
their calls take milliseconds to seconds, so async tests call them through
``trio.to_thread.run_sync`` when something must go on meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from harness.redis_server import (
    REDIS_SERVER,
    RedisError,
    RedisServer,
    cluster_free_port,
    free_port,
)

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _wait(check: Any, timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, RedisError) as exc:
            last = exc
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what} ({last})")


@dataclass
class ClusterNode:
    server: RedisServer
    node_id: str = ""

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"


class RedisClusterSet:
    """A real Redis Cluster: ``masters`` masters with ``replicas`` replicas each."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.masters_wanted = masters
        self.replicas_wanted = replicas
        # validity factor 0: a replica may always take over (in a test its
        # link may be younger than the factor's window allows).
        extra = (
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--cluster-replica-validity-factor",
            "0",
        )
        self.nodes = [
            ClusterNode(
                RedisServer(
                    cluster_free_port(), cluster=True, own_all_slots=False, extra_args=extra
                )
            )
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """A seed URL: any node's (the first that runs)."""
        for node in self.nodes:
            if node.server.running:
                return node.server.url
        raise RuntimeError("no node of the cluster runs")

    def start(self) -> RedisClusterSet:
        try:
            for node in self.nodes:
                node.server.start()
            cmd = [REDIS_CLI, "--cluster", "create", *(n.address for n in self.nodes)]
            cmd += ["--cluster-replicas", str(self.replicas_wanted), "--cluster-yes"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
            for node in self.nodes:
                node.node_id = str(node.server.command("CLUSTER", "MYID"))
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0, replicas: bool = True) -> None:
        """Until every running node says ``cluster_state:ok``, agrees that
        every slot is served and (``replicas``) lists every shard's replicas."""

        def ok() -> bool:
            for node in self.nodes:
                if not node.server.running:
                    continue
                info = str(node.server.command("CLUSTER", "INFO"))
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                replication = str(node.server.command("INFO", "replication"))
                if "role:slave" in replication and "master_link_status:up" not in replication:
                    return False
                # Replicas show in CLUSTER SLOTS only once the others see them synced.
                if replicas and any(
                    len(entry) - 3 < self.replicas_wanted
                    for entry in node.server.command("CLUSTER", "SLOTS")
                ):
                    return False
            return True

        _wait(ok, timeout, "the cluster to be ok")

    def masters(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.server.running and self.role(n) == "master"]

    def role(self, node: ClusterNode) -> str:
        return str(node.server.command("ROLE")[0])

    def owner(self, slot: int) -> ClusterNode:
        """The master that serves ``slot`` now (as the running nodes see it)."""
        for node in self.nodes:
            if not node.server.running:
                continue
            for start, end, master, *_ in node.server.command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.server.port == port)
        raise RuntimeError(f"nobody serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for node in self.nodes:
            if node is master or not node.server.running:
                continue
            role = node.server.command("ROLE")
            if role[0] == "slave" and int(role[2]) == master.server.port:
                return node
        raise RuntimeError(f"no replica of {master.address}")

    def kill_master(self, master: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """``kill -9`` a master and wait until its replica took over; the
        promoted replica."""
        replica = self.replica_of(master)
        master.server.kill()
        _wait(lambda: self.role(replica) == "master", timeout, "the replica's promotion")
        self.wait_ok(timeout, replicas=False)  # the promoted one has none now
        return replica

    def reshard(self, source: ClusterNode, target: ClusterNode, slots: int) -> None:
        """Move ``slots`` slots (keys and all) from ``source`` to ``target``."""
        cmd = [REDIS_CLI, "--cluster", "reshard", target.address]
        cmd += ["--cluster-from", source.node_id, "--cluster-to", target.node_id]
        cmd += ["--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "100"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"reshard failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        self.wait_ok(replicas=False)

    def close(self) -> None:
        for node in self.nodes:
            node.server.close()

    def __enter__(self) -> RedisClusterSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SentinelSet:
    """A master, one replica and three sentinels (quorum 2) named ``name``."""

    def __init__(self, name: str = "chatd", down_after_ms: int = 1000) -> None:
        self.name = name
        self.down_after_ms = down_after_ms
        self.master = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []
        self.dir = tempfile.mkdtemp(prefix="chatd-sentinel-")

    @property
    def url(self) -> str:
        """chatd's Sentinel URL: every sentinel, then the master's name."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.name}"

    def start(self) -> SentinelSet:
        try:
            self.master.start()
            self.replica = RedisServer(
                extra_args=("--replicaof", self.master.host, str(self.master.port))
            ).start()
            _wait(
                lambda: "master_link_status:up" in self.replica.command("INFO", "replication"),
                15,
                "the replica to sync",
            )
            for i in range(3):
                port = free_port()
                conf = os.path.join(self.dir, f"sentinel-{i}.conf")
                with open(conf, "w") as f:
                    f.write(
                        f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
                        f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {self.name} 5000\n"
                        f"sentinel parallel-syncs {self.name} 1\n"
                    )
                log = open(os.path.join(self.dir, f"sentinel-{i}.log"), "ab")  # noqa: SIM115
                self.sentinels.append(
                    subprocess.Popen(
                        [REDIS_SERVER, conf, "--sentinel"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
                log.close()
                self.sentinel_ports.append(port)
            _wait(lambda: self.master_port() == self.master.port, 15, "the sentinels")
            # Each sentinel must know the others before a failover can be voted.
            _wait(lambda: self._known_sentinels() >= 2, 15, "the sentinels to meet")
        except BaseException:
            self.close()
            raise
        return self

    def _sentinel(self, port: int, *args: str) -> Any:
        probe = RedisServer(port)  # only its blocking client: never started here
        return probe.command(*args)

    def _known_sentinels(self) -> int:
        return min(
            len(self._sentinel(p, "SENTINEL", "SENTINELS", self.name)) for p in self.sentinel_ports
        )

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it (0:
        none answers)."""
        for port in self.sentinel_ports:
            try:
                _host, mport = self._sentinel(
                    port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name
                )
                return int(mport)
            except (OSError, RedisError, TypeError, ValueError):
                continue
        return 0

    def fail_over(self, timeout: float = 30.0) -> RedisServer:
        """``kill -9`` the master; wait until the sentinels promoted the
        replica and it accepts writes. Returns the new master."""
        assert self.replica is not None
        old = self.master
        old.kill()
        new = self.replica
        _wait(lambda: self.master_port() == new.port, timeout, "the sentinels' failover")
        _wait(lambda: new.command("ROLE")[0] == "master", timeout, "the promotion")
        self.master, self.replica = new, None
        old.close()
        return new

    def close(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for server in (self.master, self.replica):
            if server is not None:
                server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
