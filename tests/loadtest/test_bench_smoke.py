"""CI smoke of the capacity benchmark: every configuration, the idle memory
run and the profiles, at a tiny size. It asserts that nothing was lost and
that every figure the report publishes was produced — never a speed (that
is the benchmark's job, on a quiet machine: docs/bench.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.nginx import requires_nginx

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ("chatd1", "chatd2", "node1", "node2", "ref1", "ref2")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_nginx()]


def test_bench_produces_every_figure_and_loses_nothing(tmp_path):
    results = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtest" / "bench.py"),
            "--pairs", "4",
            "--seconds", "2",
            "--warmup", "0.5",
            "--drain", "8",
            # Enough traffic that NGINX and Redis use at least one clock tick
            # (10 ms) of CPU in a 2 s step: at 40/s node2's sometimes read 0.
            "--rates", "150",
            "--retries", "0",
            "--idle", "40",
            "--idle-users", "10",
            "--results", str(results),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )  # fmt: skip
    output = run.stdout[-6000:] + run.stderr[-4000:]
    assert run.returncode == 0, output
    doc = json.loads((results / "bench.json").read_text())

    configs = {c["name"]: c for c in doc["configs"]}
    assert sorted(configs) == sorted(CONFIGS), output
    for name, config in configs.items():
        [step] = config["steps"]
        assert step["scheduled"] > 0, name
        assert step["loss"]["missing"] == 0, (name, step["loss"])
        assert step["receipts_missing"] == 0, (name, step)
        assert step["unconfirmed_sends"] == 0, (name, step)
        # Latency samples: the messages due after the warm-up, all of them delivered.
        assert 0 < step["samples"]["delivered"] <= step["loss"]["delivered"], name
        assert step["samples"]["seen_rtt"] > 0, name
        per = step["per_message"]
        assert per["server_cpu_ms"] > 0, (name, per)
        if name.startswith("chatd"):
            # From chatd's own /metrics: scheduler steps and commits per message.
            assert per["task_steps"] > 0 and per["store_writes"] > 0, (name, per)
        if name.endswith("2"):
            assert per["nginx_redis_cpu_ms"] > 0, (name, per)  # NGINX and Redis ran too

    for name in ("chatd-idle", "node-idle", "ref-idle"):
        [row] = doc["idle"][name]["rows"]
        assert row["connections"] == 40 and row["kib_per_conn"] > 0, (name, row)

    profiles = doc["profiles"]
    assert len(profiles) == 4, profiles
    for profile in profiles:
        assert profile.get("categories"), profile  # py-spy sampled something

    report = (results / "bench.md").read_text()
    for label in ("Node.js", "python-socketio", "server CPU ms / msg", "task steps"):
        assert label in report, label
    assert (results / "bench.png").stat().st_size > 0
