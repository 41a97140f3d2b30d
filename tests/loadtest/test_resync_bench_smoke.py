"""CI smoke of the resync benchmark at a tiny size: every user is re-offered
what is owed, and the store never sees more backlog reads at once than the
concurrency allows — never a speed (docs/redis.md has the measured run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.e2e]


def test_resync_bench_reoffers_everything_within_its_concurrency(tmp_path):
    out = tmp_path / "resync.json"
    args = ["--users", "60", "--owed", "2", "--concurrency", "1,4", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "resync_bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["concurrency"]: r for r in report["results"]}
    assert set(rows) == {1, 4}
    for concurrency, row in rows.items():
        assert row["users"] == 60
        # Each user's backlog reads messages, events, receipts: at least 3 reads each.
        assert row["store_reads"] >= 180
        assert 1 <= row["store_reads_in_flight_max"] <= concurrency
    assert rows[4]["store_reads_in_flight_max"] > 1
    assert "| 4 | 60 |" in run.stdout
