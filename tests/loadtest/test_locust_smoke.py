"""CI smoke of the Locust suite, through the same entry point as a real run.

``loadtest/run --smoke`` starts Redis, two replicas and NGINX, runs Locust
headless in its own process (gevent never enters this one) with a few dozen
users for about fifteen seconds, and stops the stack. This test asserts the
run's exit code, zero missing messages and receipts, and that every request
type reached Locust's stats — never a timing threshold.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.nginx import requires_nginx

ROOT = Path(__file__).resolve().parent.parent.parent
PLAIN_NAMES = ("send→sent", "send→delivered", "send→delivered receipt", "seen→seen receipt")
# End-to-end rooms (half of them by default) report the same four, marked.
REQUEST_NAMES = PLAIN_NAMES + tuple(f"{n} (e2e)" for n in PLAIN_NAMES)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    requires_nginx(),
]


@pytest.fixture(scope="module")
def load_venv() -> None:
    """The load tooling's venv (build/loadtest-venv), installed if missing."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "loadvenv.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot install loadtest/requirements.txt: {result.stderr[-1500:]}")


def test_locust_smoke_run_loses_nothing_and_records_every_request_type(load_venv, tmp_path):
    results = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtest" / "runner.py"),
            "--smoke",
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, output

    loss = json.loads((results / "loss.json").read_text())
    assert loss["sent"] > 0, output
    assert loss["missing"] == 0, loss["missing_sample"]
    assert loss["receipts_missing"] == 0, output
    # Nothing reached a user it was not sent to.
    assert loss["unexpected"] == 0, loss

    with (results / "locust_stats.csv").open(newline="", encoding="utf-8") as f:
        counts = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in csv.DictReader(f)}
    for name in REQUEST_NAMES:
        assert counts.get(("WS", name), 0) > 0, f"{name} never recorded: {counts}"
    for name in ("/api/register", "/api/login"):
        assert counts.get(("POST", name), 0) > 0, counts
    assert (results / "report.html").stat().st_size > 0
