"""Every command line in the repository answers ``--help`` (and exits 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Scripts run with the project's python.
PROJECT = [
    ["-m", "chatd", "--help"],
    ["-m", "chatd", "serve", "--help"],
    ["-m", "admin.cli", "--help"],
    ["loadtest/bench.py", "--help"],
    ["loadtest/pairs.py", "--help"],
    ["loadtest/redis_client_bench.py", "--help"],
    ["loadtest/microbench.py", "--help"],
    ["loadtest/resync_bench.py", "--help"],
    ["loadtest/slow_readers.py", "--help"],
    ["loadtest/login_storm.py", "--help"],
    ["loadtest/runner.py", "--help"],
    ["loadtest/stack.py", "--help"],
    ["loadtest/noderef.py", "--help"],
]
#: Scripts that run in the load tooling's own venv (aiohttp, socketio...).
LOAD_VENV = [
    ["loadtest/driver.py", "--help"],
    ["loadtest/reference/server.py", "--help"],
]


@pytest.mark.parametrize("argv", PROJECT, ids=lambda a: " ".join(a))
def test_project_clis_answer_help(argv):
    result = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower(), result.stdout[:500]


@pytest.mark.parametrize("argv", LOAD_VENV, ids=lambda a: " ".join(a))
def test_load_venv_clis_answer_help(argv):
    from loadtest import loadvenv

    python = loadvenv.ensure()
    result = subprocess.run(
        [str(python), *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower(), result.stdout[:500]


def test_node_reference_answers_help():
    from loadtest import noderef

    node = noderef.ensure_installed()
    result = subprocess.run(
        [str(node), str(noderef.SERVER), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in (result.stdout + result.stderr).lower()
