"""Fixtures for chatctl's tests: a real redis-server, a real ``chatd serve``
using it, and a way to run chatctl against them (in-process through
click's CliRunner, or as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from admin.cli import main
from harness.procs import ChatdProcess, shared_secrets
from harness.redis_server import RedisServer


@dataclass
class Deployment:
    redis: RedisServer
    chatd: ChatdProcess

    @property
    def env(self) -> dict[str, str]:
        return {"CHATD_REDIS_URL": self.redis.url, "CHATD_DATA_DIR": str(self.chatd.data_dir)}


def clean_environ() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHATD_") or k.startswith("CHATD_TEST_")
    }


def ctl(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    """Run chatctl in this process with exactly ``env`` as its CHATD_* settings."""
    unset = {k: None for k in os.environ if k.startswith("CHATD_") and k not in env}
    return CliRunner().invoke(main, list(args), env={**unset, **env}, input=input)


def ctl_process(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run chatctl as its own process (``python -m admin.cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "admin.cli", *args],
        env={**clean_environ(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    with RedisServer() as redis:
        data = tmp_path_factory.mktemp("chatd")
        chatd = ChatdProcess(
            data,
            env={"CHATD_REDIS_URL": redis.url, "CHATD_NODE_ID": "solo", **shared_secrets(data)},
        ).start()
        try:
            yield Deployment(redis, chatd)
        finally:
            code = chatd.stop()
            assert code == 0, chatd.logs()[-3000:]


async def until(check, timeout: float = 10.0, step: float = 0.1):
    """Poll ``check()`` (sync or async) until it returns something truthy."""
    import inspect

    import trio

    with trio.fail_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await trio.sleep(step)
