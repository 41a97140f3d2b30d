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
