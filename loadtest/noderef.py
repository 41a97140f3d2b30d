"""The Node.js socket.io reference (``loadtest/reference/node/``) for the benchmark.

:func:`ensure_installed` makes sure ``node`` and ``npm`` exist (installing the
distribution's ``nodejs`` and ``npm`` with apt-get if not) and that the
reference's packages are installed from ``package-lock.json`` (``npm ci``,
again whenever the lock file changes); :class:`NodeRefProcess` runs one
instance of ``server.js`` on a free loopback port, the same way
``loadtest/bench.py``'s ``RefProcess`` runs the python-socketio reference.

Standard library only (plus ``harness.procs``, itself standard library only).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench.py does this already; `python loadtest/noderef.py` not
    sys.path.insert(0, str(ROOT))
from harness.procs import free_port, stop_process, wait_http  # noqa: E402

NODE_DIR = ROOT / "loadtest" / "reference" / "node"
SERVER = NODE_DIR / "server.js"
LOCK = NODE_DIR / "package-lock.json"
STAMP = NODE_DIR / "node_modules" / ".chatd-lock-sha256"
MIN_NODE_MAJOR = 18  # node:util parseArgs, http.Server.closeAllConnections

_apt_updated = False


def _log(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


def _apt_install(packages: list[str], quiet: bool) -> None:
    """apt-get install, with sudo when not root; ``apt-get update`` once per process."""
    global _apt_updated
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{' and '.join(packages)} missing, and there is no apt-get here")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.DEVNULL if quiet else None
    if not _apt_updated:
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env, stdout=out)
        _apt_updated = True
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-q", *packages], check=True, env=env, stdout=out
    )


def _which_node() -> str | None:
    return shutil.which("node") or shutil.which("nodejs")  # older Debian: "nodejs"


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    match = re.match(r"v(\d+)\.", version.stdout.strip())
    return int(match.group(1)) if match else 0


def _lock_digest() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def packages_ready() -> bool:
    """node_modules was installed by ``npm ci`` from the current package-lock.json."""
    return STAMP.exists() and STAMP.read_text().strip() == _lock_digest()


def ensure_installed(quiet: bool = True) -> Path:
    """Make sure node, npm and the reference's packages are there; returns node's path."""
    node, npm = _which_node(), shutil.which("npm")
    if node is None or npm is None:
        _log("installing nodejs and npm with apt-get")
        _apt_install(["nodejs", "npm"], quiet)
        node, npm = _which_node(), shutil.which("npm")
        if node is None or npm is None:
            raise RuntimeError("apt-get installed nodejs and npm, but node or npm is not on PATH")
    major = _node_major(node)
    if major < MIN_NODE_MAJOR:
        raise RuntimeError(
            f"{node} is Node {major}; the reference needs Node {MIN_NODE_MAJOR} or newer"
        )
    if not packages_ready():
        _log(f"installing the node reference's packages into {NODE_DIR / 'node_modules'}")
        cmd = [npm, "ci", "--no-audit", "--no-fund"]
        if quiet:
            cmd.append("--loglevel=error")
        subprocess.run(cmd, cwd=NODE_DIR, check=True, stdout=subprocess.DEVNULL if quiet else None)
        STAMP.write_text(_lock_digest() + "\n")
    return Path(node).absolute()


class NodeRefProcess:
    """One Node reference server (loadtest/reference/node/server.js)."""

    def __init__(self, node_bin: Path, data: Path, secret: str, node: str, redis_url: str = ""):
        self.port = free_port()
        data.mkdir(parents=True, exist_ok=True)
        log = open(data / f"{node}.log", "ab")  # noqa: SIM115 - owned by the process
        cmd = [str(node_bin), str(SERVER), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--secret", secret, "--node", node]
        cmd += ["--redis-url", redis_url] if redis_url else []
        self.proc = subprocess.Popen(cmd, cwd=NODE_DIR, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_http(f"http://127.0.0.1:{self.port}/healthz", 30, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description="Install the Node.js reference (node, npm, npm ci) if needed;"
        " print the path of node."
    ).parse_args()
    print(ensure_installed(quiet=False))
