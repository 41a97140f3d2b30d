"""Memory under devices that never read: chatd's RSS while others chat.

Starts a ``chatd serve`` (SQLite, no Redis) and, in one group, ``--talkers``
users who chat and ``--devices`` sockets (``--readers`` users with several
devices each) that authenticate and then never read a byte (their receive
buffers are small, so the kernel stops taking data soon). Every message
then queues a frame for every silent device: without bounds chatd's memory
grows with devices times messages. It samples chatd's RSS every 0.5 s, counts
the silent devices chatd closed as too slow (4008), and measures the
delivery latency of one device that does read, to show the others' chat
still flows.

Usage::

    python loadtest/slow_readers.py [--devices 1000] [--rate 20] [--seconds 20]
        [--chatd-args "--outbox-total-mib 64"] [--json out.json]

Run it twice to compare budgets, e.g. ``--chatd-args "--outbox-total-mib 0"``
(no process-wide budget: only the per-connection 1 MiB) against the default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.client import Api, connect, silent_device
from harness.procs import ChatdProcess

PASSWORD = "correct horse"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="chatd-slow-"))
    proc = ChatdProcess(
        work / "data", args=["--log-level", "warning", "--rate", "0", *shlex.split(opts.chatd_args)]
    ).start()
    api = Api(proc.http_url)
    sockets: list[socket.socket] = []
    try:
        tag = os.urandom(3).hex()
        talkers = [f"talk{i}x{tag}" for i in range(opts.talkers)]
        readers = [f"read{i}x{tag}" for i in range(opts.readers)]
        tokens = {}
        for name in [*talkers, *readers, f"fast{tag}"]:
            tokens[name] = await api.user(name, PASSWORD)
        fast = f"fast{tag}"
        status, group = await api.call(
            "POST",
            "/api/conversations",
            tokens[talkers[0]],
            json={"members": [*talkers[1:], *readers, fast], "title": "busy"},
        )
        assert status == 201, group
        for i in range(opts.devices):
            sockets.append(silent_device(proc.ws_port, tokens[readers[i % len(readers)]]))
        baseline = rss_mib(proc.proc.pid)
        body = "x" * opts.body
        samples: list[float] = []
        latencies: list[float] = []
        sent = 0
        async with trio.open_nursery() as nursery:
            conns = []
            for name in talkers:
                c = await nursery.start(_open, proc.ws_url, tokens[name])
                conns.append(c)
            reader = await nursery.start(_open, proc.ws_url, tokens[fast])
            nursery.start_soon(_watch, reader, latencies)
            start = trio.current_time()
            next_sample = start
            interval = 1 / opts.rate
            while trio.current_time() - start < opts.seconds:
                now = trio.current_time()
                if now >= next_sample:
                    samples.append(rss_mib(proc.proc.pid))
                    next_sample += 0.5
                talker = conns[sent % len(conns)]
                stamp = time.time()
                await talker.send(f"{stamp:.6f} {body}", conversation=group["id"])
                sent += 1
                await trio.sleep(interval)
            await trio.sleep(2)
            samples.append(rss_mib(proc.proc.pid))
            nursery.cancel_scope.cancel()
        logs = proc.logs()
        closed = logs.count("closing a slow connection")
        latencies.sort()
        return {
            "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
            "chatd_args": opts.chatd_args,
            "devices": opts.devices,
            "messages": sent,
            "body_bytes": opts.body,
            "rss_baseline_mib": round(baseline, 1),
            "rss_max_mib": round(max(samples), 1),
            "rss_end_mib": round(samples[-1], 1),
            "silent_devices_closed_4008": closed,
            "reader_got": len(latencies),
            "reader_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1)
            if latencies
            else None,
        }
    finally:
        for sock in sockets:
            sock.close()
        await api.aclose()
        proc.stop()


async def _open(
    url: str, token: str, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    async with connect(url, "device") as c:
        await c.auth(token)
        task_status.started(c)
        await trio.sleep_forever()


async def _watch(reader: Any, latencies: list[float]) -> None:
    """Time each message as it reaches the device that reads (10 ms steps)."""
    seen = 0
    while True:
        frames = reader.frames
        now = time.time()
        for frame in frames[seen:]:
            if frame.get("type") == "message":
                latencies.append(now - float(frame["body"].split(" ", 1)[0]))
        seen = len(frames)
        await trio.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--readers", type=int, default=50, help="users the silent devices belong to"
    )
    parser.add_argument("--talkers", type=int, default=5)
    parser.add_argument(
        "--rate", type=float, default=20.0, help="messages per second into the group"
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--body", type=int, default=2000, help="characters per message")
    parser.add_argument("--chatd-args", default="")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    report = trio.run(run, opts)
    text = json.dumps(report, indent=2)
    if opts.json:
        opts.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
