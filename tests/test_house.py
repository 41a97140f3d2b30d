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
