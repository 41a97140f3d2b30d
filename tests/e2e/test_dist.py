"""dist/chatd, the single-file build, on a Python that has nothing installed.

The zipapp is built by ``scripts/build-dist`` (or reused when it is newer
than every source it is made of), then started straight from its shebang
with a bare venv's ``python3.11`` first on PATH: only the standard library
is there, so every import chatd makes has to come from inside the archive.
Through it: the bundled web client, two users registered over HTTP, and one
message over WebSocket with sent, message, ack and the receipts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.client import Api, connect
from harness.procs import free_port, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "scripts" / "build-dist"
DIST = ROOT / "dist" / "chatd"
CHATCTL = ROOT / "dist" / "chatctl"
#: What pip prints when the package registry cannot be reached ("versions:
#: none" is an index that answered nothing, or no index at all).
OFFLINE = (
    "(from versions: none)",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ProxyError",
)


def sources() -> Iterator[Path]:
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        yield ROOT / name
    yield BUILD
    for tree in ("chatd", "admin", "web"):
        for path in (ROOT / tree).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                yield path


def is_fresh() -> bool:
    if not DIST.is_file():
        return False
    built = DIST.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in sources())


@pytest.fixture(scope="module")
def dist_chatd() -> Path:
    if not is_fresh():
        try:
            result = subprocess.run(
                [str(BUILD)], cwd=ROOT, capture_output=True, text=True, timeout=300
            )
        except subprocess.TimeoutExpired:
            pytest.skip("scripts/build-dist took over 300 s (no package registry reachable?)")
        if result.returncode != 0:
            out = result.stdout + result.stderr
            offline = next((m for m in OFFLINE if m in out), None)
            if offline:
                pytest.skip(
                    f"scripts/build-dist could not reach the package registry ({offline!r}):"
                    " building dist/chatd downloads chatd's dependencies for this platform"
                )
            pytest.fail(f"scripts/build-dist failed ({result.returncode}):\n{out[-4000:]}")
    assert DIST.is_file() and os.access(DIST, os.X_OK)
    return DIST


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory, dist_chatd) -> str:
    """A PATH whose python3.X (the one the shebang names) has only the stdlib."""
    shebang = dist_chatd.open("rb").readline().decode().strip()
    wanted = shebang.rsplit(" ", 1)[-1].rsplit("/", 1)[-1]  # e.g. python3.11
    mine = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if wanted != mine:
        pytest.skip(f"dist/chatd was built for {wanted}; this test runs on {mine}")
    venv = tmp_path_factory.mktemp("bare-python") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bare = venv / "bin" / wanted
    probe = subprocess.run([str(bare), "-c", "import trio"], capture_output=True, env={})
    assert probe.returncode != 0, "the bare venv must not see chatd's dependencies"
    return f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory, bare_path) -> dict[str, str]:
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and (not k.startswith("CHATD_") or k.startswith("CHATD_TEST_"))
    }
    env["PATH"] = bare_path
    env["PYTHONNOUSERSITE"] = "1"
    # Where the zipapp unpacks itself on first start (default ~/.shiv).
    env["SHIV_ROOT"] = str(tmp_path_factory.mktemp("shiv-root"))
    return env


def test_dist_runs_chatctl_both_ways(dist_chatd, clean_env):
    for argv, prog in (([str(dist_chatd), "ctl"], "chatctl"), ([str(CHATCTL)], "chatctl")):
        out = subprocess.run(
            [*argv, "--version"], env=clean_env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{prog}, version"), out.stdout
    top = subprocess.run(
        [str(dist_chatd), "--help"], env=clean_env, capture_output=True, text=True, timeout=60
    )
    assert top.returncode == 0 and "serve" in top.stdout and "ctl" in top.stdout, top


@pytest.fixture
def dist_server(dist_chatd, clean_env, tmp_path) -> Iterator[tuple[str, str]]:
    http_port, ws_port = free_port(), free_port()
    log = tmp_path / "chatd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(dist_chatd),
                "serve",
                "--host",
                "127.0.0.1",
                "--http-port",
                str(http_port),
                "--ws-port",
                str(ws_port),
                "--data-dir",
                str(tmp_path / "data"),
                "--log-format",
                "text",
            ],
            env=clean_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_http(f"http://127.0.0.1:{http_port}/healthz", 45, proc)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"{exc}\n{log.read_text()[-4000:]}")
        yield f"http://127.0.0.1:{http_port}", f"ws://127.0.0.1:{ws_port}/ws"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_chat_through_the_single_binary(dist_server, names):
    http_url, ws_url = dist_server

    api = Api(http_url)
    try:
        # The web client travels inside the archive and is served at /.
        status, page = await api.call("GET", "/")
        assert status == 200 and page == (ROOT / "web" / "index.html").read_text()
        status, _ = await api.call("GET", "/js/wsurl.js")
        assert status == 200
        alice, bob = names("alice"), names("bob")
        ta, tb = await api.user(alice), await api.user(bob)
    finally:
        await api.aclose()

    async with connect(ws_url, alice) as a, connect(ws_url, bob) as b:
        await a.auth(ta)
        await b.auth(tb)
        cid = await a.send("hello from the zipapp", to=bob)
        sent = await a.expect("sent", cid=cid)
        msg = await b.expect("message", id=sent["id"])
        assert msg["body"] == "hello from the zipapp" and msg["from"] == alice
        await b.ack([msg["id"]])
        delivered = await a.expect("receipt", id=sent["id"], status="delivered")
        assert delivered["by"] == bob
        await b.seen([msg["id"]])
        seen = await a.expect("receipt", id=sent["id"], status="seen")
        await a.ack(receipts=[delivered["rid"], seen["rid"]])


def test_dist_ships_the_contract_suites_not_the_harness(dist_chatd):
    """The archive holds chatd's contract suites (a third-party store or
    broker runs them) and none of the test harness (issue 13)."""
    with zipfile.ZipFile(dist_chatd) as archive:
        names = archive.namelist()
    shipped = {n.split("site-packages/", 1)[1] for n in names if "site-packages/" in n}
    assert "chatd/testing/store_contract/__init__.py" in shipped
    assert "chatd/testing/broker_contract.py" in shipped
    assert "chatd/server.py" in shipped
    assert [n for n in shipped if n.startswith("harness/")] == []
