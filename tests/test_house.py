"""House rules that check themselves (issue 13)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Runtime code: what ships and runs (the test support under chatd/testing
#: may assert, as tests do).
RUNTIME = [
    p
    for folder in ("chatd", "admin")
    for p in sorted((ROOT / folder).rglob("*.py"))
    if "testing" not in p.relative_to(ROOT).parts
]


def test_runtime_guards_are_explicit_errors_not_asserts():
    """``python -O`` strips asserts: a guard that matters raises."""
    found = [
        f"{p.relative_to(ROOT)}:{node.lineno}"
        for p in RUNTIME
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


#: "No Python module over ~500 lines" (issue 13), checked: the runtime and
#: the test support (the tests themselves are tables and scenarios).
MAX_LINES = 500
#: Modules allowed past it, each with its reason.
LONGER: dict[str, str] = {}


def test_no_module_is_a_room_too_big_to_find_things_in():
    over = {
        str(p.relative_to(ROOT)): n
        for folder in ("chatd", "admin")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in over.items() if k not in LONGER} == {}
