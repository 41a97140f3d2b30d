"""``loadtest/run``: one command for a Locust run against a local deployment.

    loadtest/run [--users 40] [--spawn-rate 10] [--time 30s] [--replicas 2]
                 [--results DIR] [--smoke] [-- extra locust arguments]

1. makes the load tooling's venv if needed (``build/loadtest-venv``);
2. starts Redis, N chatd replicas and NGINX on loopback
   (:class:`harness.cluster.Cluster`, as ``python -m loadtest.stack`` does);
3. runs Locust headless from the load venv, in its own process, against the
   NGINX URL, writing ``locust_stats.csv`` (and the other CSVs),
   ``report.html`` and ``locust.log``;
4. prints the zero-loss report (``loss.json``) and checks that every request
   type was recorded;
5. stops everything it started.

Results go to ``loadtest/results/<UTC timestamp>/`` unless ``--results``
says otherwise. Exit status: 0 only if Locust exited 0, nothing that got
``sent`` went missing, no receipt went missing, and all four WebSocket
request types appear in the stats.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cluster import Cluster  # noqa: E402
from loadtest import loadvenv  # noqa: E402

PLAIN_NAMES = ("send→sent", "send→delivered", "send→delivered receipt", "seen→seen receipt")
# End-to-end rooms (half of them by default) report the same four, marked.
REQUEST_NAMES = PLAIN_NAMES + tuple(f"{n} (e2e)" for n in PLAIN_NAMES)
SMOKE = {"users": 30, "spawn_rate": 15, "time": "15s", "replicas": 2}


def seconds(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
    return total


def recorded_names(stats_csv: Path) -> dict[str, int]:
    """Request name -> request count, from Locust's ``*_stats.csv``."""
    with stats_csv.open(newline="", encoding="utf-8") as f:
        return {row["Name"]: int(row["Request Count"]) for row in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loadtest/run", description=__doc__.split("\n\n")[0].strip("`: ")
    )
    parser.add_argument("--users", "-u", type=int, default=40)
    parser.add_argument("--spawn-rate", "-r", type=float, default=10)
    parser.add_argument("--time", "-t", default="30s", help="run time (Locust syntax: 30s, 2m)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="the CI size: 30 users, 15 s, 2 replicas"
    )
    parser.add_argument("locust_args", nargs="*", help="passed to locust (after --)")
    args = parser.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = (args.results or ROOT / "loadtest" / "results" / stamp).resolve()
    results.mkdir(parents=True, exist_ok=True)
    python = loadvenv.ensure()
    locust = python.parent / "locust"

    def terminate(*_: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, terminate)
    cluster = Cluster(
        results / "stack", replicas=args.replicas, extra_args=["--log-level", "warning"]
    )
    print(f"loadtest: starting Redis, {args.replicas} replica(s) and NGINX", flush=True)
    cluster.start()
    codes: list[int] = []
    try:
        print(f"loadtest: NGINX at {cluster.url}; results in {results}", flush=True)
        cmd = [
            str(locust),
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "--host",
            cluster.url,
            "-u",
            str(args.users),
            "-r",
            str(args.spawn_rate),
            "-t",
            args.time,
            "--csv",
            str(results / "locust"),
            "--html",
            str(results / "report.html"),
            "--loss-file",
            str(results / "loss.json"),
            "--only-summary",
            *args.locust_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
        with (results / "locust.log").open("wb") as logf:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            rc = proc.wait(timeout=seconds(args.time) + 120)
    finally:
        codes = cluster.close()
        print(f"loadtest: stack stopped (replica exit codes {codes})", flush=True)

    problems = []
    if rc != 0:
        problems.append(f"locust exited with {rc}")
    loss_file = results / "loss.json"
    if loss_file.exists():
        loss = json.loads(loss_file.read_text())
        print(f"loadtest: zero-loss: {loss['summary']} receipts_missing={loss['receipts_missing']}")
        if loss["missing"]:
            problems.append(f"{loss['missing']} message deliveries missing")
        if loss["receipts_missing"]:
            problems.append(f"{loss['receipts_missing']} receipts missing")
    else:
        problems.append("no loss report (loss.json) was written")
    stats_csv = results / "locust_stats.csv"
    if stats_csv.exists():
        names = recorded_names(stats_csv)
        absent = [n for n in REQUEST_NAMES if names.get(n, 0) == 0]
        if absent:
            problems.append(f"request types never recorded: {', '.join(absent)}")
    else:
        problems.append("no locust_stats.csv")
    if any(c != 0 for c in codes):
        problems.append(f"a replica exited with {codes}")
    print(f"loadtest: report {results / 'report.html'}")
    if problems:
        print("loadtest: FAILED: " + "; ".join(problems), flush=True)
        return 1
    print("loadtest: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
