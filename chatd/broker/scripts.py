"""The Redis broker's Lua scripts: one file each in ``chatd/broker/lua/``.

Owns loading the scripts (with :mod:`importlib.resources`, so they are found
in a wheel or a zipapp as in the source tree; ``setup.cfg`` ships them as
package data), their SHA1 for ``EVALSHA``, and the commands that call them.

A file is one script, named after it (``route.lua`` is ``SCRIPTS["route"]``);
a file whose name starts with ``_`` is a fragment of helper functions that
scripts share. A file's leading ``--`` lines are its documentation (KEYS,
ARGV, what it returns) and are not sent to Redis; among them, ``-- needs:
_queue.lua`` names the fragments that go before the script's code, in that
order. What Redis runs is the fragments' code, then the script's.

Guarantees: every script touches the keys of one user only (one hash tag,
one Redis Cluster slot) or, for TAKE and ROTATE, one key; every script in
:data:`NAMES` is loaded when this module is imported (a missing file fails
the import, not a call); ``tests/contract/test_broker_scripts.py`` checks
that every file is loaded and compiles on a real ``redis-server``.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from chatd.broker import resp

#: The scripts, in the order they are loaded on each new command connection.
NAMES = (
    "route",
    "queued",
    "enqueue",
    "purge",
    "settle",
    "attach",
    "detach",
    "prune",
    "take",
    "rotate",
)

#: The header line that names the fragments a script is built on.
NEEDS = "-- needs:"


def lua_dir() -> Traversable:
    """The folder of the ``.lua`` files (maybe inside a zip)."""
    return resources.files("chatd.broker.lua")


def read(filename: str) -> tuple[list[str], str]:
    """A ``.lua`` file as (the fragments it needs, its code without the
    leading comment lines)."""
    text = lua_dir().joinpath(filename).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    n = 0
    while n < len(lines) and lines[n].startswith("--"):
        n += 1
    needs = [
        name for line in lines[:n] if line.startswith(NEEDS) for name in line[len(NEEDS) :].split()
    ]
    return needs, "".join(lines[n:])


def source_of(name: str) -> str:
    """What Redis runs for the script ``name``: its fragments, then its code."""
    needs, code = read(f"{name}.lua")
    return "".join(read(fragment)[1] for fragment in needs) + code


class Script:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


SCRIPTS = {name: Script(name, source_of(name)) for name in NAMES}

ROUTE_SCRIPT = SCRIPTS["route"]

#: One script call: the script, its KEYS, its ARGV.
Call = tuple[Script, list[str], list[resp.Arg]]


def evalsha(call: Call) -> resp.Command:
    script, keys, args = call
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def eval_source(call: Call) -> resp.Command:
    """The same script with its source (after Redis lost its script cache)."""
    script, keys, args = call
    return ("EVAL", script.source, len(keys), *keys, *args)


def noscript(reply: Any) -> bool:
    return isinstance(reply, resp.ReplyError) and str(reply).startswith("NOSCRIPT")
