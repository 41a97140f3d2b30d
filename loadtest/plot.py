"""Plot a bench.json (from loadtest/bench.py) as bench.png; runs in the load venv.

    python loadtest/plot.py results/…/bench.json results/…/bench.png

Left: p99 delivery against the offered rate, every step of every
configuration (the knee is the capacity). Middle and right: the latency
percentile curves (delivery, seen-receipt round trip) of each configuration
at its highest rate that held, on a "nines" axis.
"""

from __future__ import annotations

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {
    "chatd1": ("tab:blue", "-"),
    "chatd2": ("tab:blue", "--"),
    "ref1": ("tab:orange", "-"),
    "ref2": ("tab:orange", "--"),
}


def nines(p: float) -> float:
    return -math.log10(1 - p / 100)


def main(src: str, dst: str) -> None:
    with open(src) as f:
        doc = json.load(f)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    ax = axes[0]
    for c in doc["configs"]:
        color, ls = STYLE.get(c["name"], ("gray", "-"))
        last = {s["rate"]: s for s in c["steps"]}  # a retried step: its last attempt
        xs = sorted(last)
        ys = [last[x]["percentiles"]["delivered"]["99"] for x in xs]
        ax.plot(xs, ys, color=color, linestyle=ls, marker="o", label=c["label"])
        missed = [s for s in c["steps"] if s is not last[s["rate"]]]
        ax.scatter(
            [s["rate"] for s in missed],
            [s["percentiles"]["delivered"]["99"] for s in missed],
            facecolors="none",
            edgecolors=color,
        )
    ax.axhline(doc["params"]["slo_ms"], color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("offered load, messages/s")
    ax.set_ylabel("p99 delivery, ms (log)")
    ax.set_yscale("log")
    ax.set_title("p99 delivery vs offered load (hollow: a first attempt, retried)")
    ax.legend(fontsize=8)
    ticks = [50, 90, 99, 99.9, 99.99]
    for ax, key, title in (
        (axes[1], "delivered", "delivery latency at the highest rate held"),
        (axes[2], "seen_rtt", "seen → seen receipt at the highest rate held"),
    ):
        for c in doc["configs"]:
            best = c["best"]
            if not best:
                continue
            color, ls = STYLE.get(c["name"], ("gray", "-"))
            pts = sorted((float(p), v) for p, v in best["percentiles"][key].items())
            ax.plot(
                [nines(p) for p, _ in pts],
                [v for _, v in pts],
                color=color,
                linestyle=ls,
                marker=".",
                label=f"{c['label']} @ {best['rate']:.0f}/s",
            )
        ax.set_xticks([nines(p) for p in ticks], [f"p{p:g}" for p in ticks])
        ax.set_ylabel("ms (log)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(
        f"chatd vs socket.io reference — {m['cpu']}, {m['cores']} cores (driver on the same cores)"
        f" — {doc['when']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
