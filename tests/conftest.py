import itertools
import os

import pytest

_names = itertools.count(1)


@pytest.fixture
def names():
    """Fresh, valid usernames, unique across the whole run."""
    tag = f"{os.getpid() % 10000:04d}"

    def make(prefix: str = "u") -> str:
        return f"{prefix}{tag}x{next(_names)}"

    return make


def pytest_configure(config):
    """`make test` sets CHATD_TEST_STRICT: there, a missing nginx, chromium or
    redis-server is an error, not a quiet skip of everything that needs it."""
    if not os.environ.get("CHATD_TEST_STRICT"):
        return
    import shutil

    from harness.nginx import nginx_binary

    missing = [
        name
        for name, found in (
            ("nginx", nginx_binary()),
            ("chromium", shutil.which("chromium") or os.path.exists("/usr/bin/chromium") or None),
            ("redis-server", shutil.which("redis-server")),
        )
        if not found
    ]
    if missing:
        raise pytest.UsageError(
            f"CHATD_TEST_STRICT: {', '.join(missing)} missing (scripts/install-system-deps)"
        )
