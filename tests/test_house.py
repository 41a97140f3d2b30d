"""House rules that check themselves (issue 13)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Runtime code: what ships and runs (the contract suites under chatd/testing
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
        for folder in ("chatd", "admin", "harness")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in over.items() if k not in LONGER} == {}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_nothing_that_ships_imports_the_harness():
    """The harness (``harness/``) is not installed: chatd, chatctl and the
    shipped contract suites must run without it."""
    shipped = [p for folder in ("chatd", "admin") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(shipped) > 50
    found = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in shipped
        for name in _imports(p)
        if name == "harness" or name.startswith("harness.")
    }
    assert found == set()
    # The control: the tests do import it (the check reads imports right).
    assert "harness.procs" in _imports(ROOT / "tests" / "e2e" / "test_chat.py") | _imports(
        ROOT / "tests" / "e2e" / "conftest.py"
    )


def test_the_package_list_leaves_the_harness_out():
    """``setup.cfg`` picks the packages of the wheel, the image and the
    zipapp: chatd (with its contract suites) and admin, not the harness."""
    import configparser

    from setuptools import find_packages

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = set(find_packages(where=str(ROOT), include=include))
    assert {"chatd", "chatd.testing", "chatd.testing.store_contract", "admin"} <= packages
    assert "harness" in set(find_packages(where=str(ROOT)))  # it is a package ...
    assert {p for p in packages if p.split(".")[0] == "harness"} == set()  # ... left out
