"""Start a whole chatd deployment on loopback and keep it up until signalled.

    python -m loadtest.stack --replicas 2 [--workdir DIR] [--ready-file F] [-- chatd args]

One real ``redis-server`` (a free port, never the machine's 6379), N
``chatd serve`` replicas sharing it and one SQLite data dir, and a real
``nginx`` in front with the repository's config: exactly
:class:`harness.cluster.Cluster`. Once everything answers it prints
(and writes to ``--ready-file``) a JSON line with the URLs; on SIGTERM or
SIGINT it stops what it started (NGINX, replicas with a drain, Redis) and
exits with 0 if every replica exited 0.

Run it with the project's Python (``.venv``): it is the only process of a
load run that imports chatd.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cluster import Cluster  # noqa: E402


def describe(cluster: Cluster) -> dict:
    return {
        "url": cluster.url if cluster.nginx else cluster.nodes[0].http_url,
        "ws_url": cluster.ws_url if cluster.nginx else cluster.nodes[0].ws_url,
        "redis": cluster.redis.url if cluster.redis else None,
        "replicas": [
            {"http": n.http_url, "ws": n.ws_url, "pid": n.proc.pid if n.proc else None}
            for n in cluster.nodes
        ],
        "nginx_pid": cluster.nginx.proc.pid if cluster.nginx and cluster.nginx.proc else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("chatd_args", nargs="*", help="extra 'chatd serve' arguments (after --)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chatd-stack-"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(
        workdir,
        replicas=args.replicas,
        extra_args=["--log-level", "warning", *args.chatd_args],
        with_nginx=not args.no_nginx,
    )
    cluster.start()
    try:
        info = json.dumps(describe(cluster))
        if args.ready_file:
            args.ready_file.write_text(info + "\n")
        print(info, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        codes = cluster.close()
    print(json.dumps({"stopped": codes}), flush=True)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
