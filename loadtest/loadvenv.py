"""The load tooling's own virtualenv, kept apart from the project's.

Locust runs on gevent, which monkey-patches the standard library, and the
benchmark's driver and socket.io reference need packages chatd does not
(aiohttp, python-socketio, redis-py). They live in ``build/loadtest-venv``
(or ``$CHATD_LOADTEST_VENV``), made on first use from
``loadtest/requirements.txt`` and remade when that file changes; the
project's ``.venv`` and the trio test process never import any of it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "loadtest" / "requirements.txt"


def venv_dir() -> Path:
    return Path(os.environ.get("CHATD_LOADTEST_VENV") or ROOT / "build" / "loadtest-venv")


def _digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def bin_path(name: str) -> Path:
    return venv_dir() / "bin" / name


def is_ready() -> bool:
    stamp = venv_dir() / ".requirements-sha256"
    return stamp.exists() and stamp.read_text().strip() == _digest()


def ensure(quiet: bool = True) -> Path:
    """Create or update the venv if needed; returns its python."""
    venv = venv_dir()
    if not is_ready():
        print(f"loadtest: installing the load tooling into {venv}", file=sys.stderr, flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        if not (venv / "bin" / "python").exists():
            subprocess.run([base, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        if quiet:
            pip.append("-q")
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        (venv / ".requirements-sha256").write_text(_digest() + "\n")
    return venv / "bin" / "python"


if __name__ == "__main__":
    print(ensure(quiet=False))
