#!/usr/bin/env python3
"""Draws benchmark results: end-to-end throughput and latency per system, side by side.

    plot.py RESULTS.json OUT.png

RESULTS.json:
{
  "date": "2026-11-26",                  # required, shown in the title
  "cores": 2,                            # required, shown in the title
  "machine": "2 vCPU, loopback broker",  # optional, shown in the title
  "systems": [                           # required, one bar (group) per system, in this order
    {"name": "iot-cognito-relay",        # required
     "msgs_per_s": 12345.0,              # required: end-to-end throughput
     "p50_ms": 0.8, "p99_ms": 2.1,       # optional (null or absent: drawn as "n/a")
     "cpu_s_per_10k": 0.5,               # optional: CPU seconds per 10k messages
     "peak_rss_mb": 12.3}                # optional: peak resident memory
  ],
  "quota": {"msgs_per_s": 100,           # optional: a dashed line on the throughput panel
            "label": "AWS IoT Core: 100 publishes/s per connection"}
}
The optional CPU and memory figures are printed under each system's name.
"""

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib import ticker  # noqa: E402

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
P50_COLOR = "#4c72b0"
P99_COLOR = "#dd8452"


def load(path):
    with open(path) as handle:
        results = json.load(handle)
    problems = []
    for key in ("date", "cores", "systems"):
        if key not in results:
            problems.append(f"missing top-level '{key}'")
    systems = results.get("systems") or []
    if not systems:
        problems.append("'systems' is empty")
    for index, system in enumerate(systems):
        for key in ("name", "msgs_per_s"):
            if system.get(key) is None:
                problems.append(f"systems[{index}] has no '{key}'")
    if problems:
        sys.exit(f"plot.py: {path}: " + "; ".join(problems))
    return results


def label_of(system):
    extras = []
    if system.get("cpu_s_per_10k") is not None:
        extras.append(f"{system['cpu_s_per_10k']:.2f} CPU-s/10k")
    if system.get("peak_rss_mb") is not None:
        extras.append(f"{system['peak_rss_mb']:.0f} MB RSS")
    return system["name"] + ("\n" + ", ".join(extras) if extras else "")


def fmt_rate(value):
    return f"{value / 1000:.1f}k" if value >= 10000 else f"{value:,.0f}"


def fmt_ms(value):
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def plot(results, out):
    systems = results["systems"]
    names = [label_of(s) for s in systems]
    positions = list(range(len(systems)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 3.2 * len(systems) + 4), 5.2))

    # Left: throughput.
    rates = [float(s["msgs_per_s"]) for s in systems]
    bars = left.bar(positions, rates, color=[COLORS[i % len(COLORS)] for i in positions],
                    width=0.6)
    left.bar_label(bars, labels=[fmt_rate(r) for r in rates], padding=3)
    left.set_title("End-to-end throughput (higher is better)")
    left.set_ylabel("messages / s")
    left.set_xticks(positions, names, fontsize=9)
    left.set_ylim(0, max(rates) * 1.15)
    quota = results.get("quota") or {}
    if quota.get("msgs_per_s") is not None:
        left.axhline(quota["msgs_per_s"], color="crimson", linestyle="--", linewidth=1.2,
                     label=quota.get("label", f"quota: {quota['msgs_per_s']} msgs/s"))
        left.legend(loc="upper right", fontsize=8)
    left.grid(axis="y", alpha=0.3)
    left.set_axisbelow(True)

    # Right: latency p50 / p99, grouped.
    width = 0.38
    p50 = [s.get("p50_ms") for s in systems]
    p99 = [s.get("p99_ms") for s in systems]
    known = [v for v in p50 + p99 if v is not None and v > 0]
    for offset, values, color, name in ((-width / 2, p50, P50_COLOR, "p50"),
                                        (width / 2, p99, P99_COLOR, "p99")):
        shown = [(p + offset, v) for p, v in zip(positions, values) if v is not None]
        group = right.bar([x for x, _ in shown], [v for _, v in shown], width, color=color,
                          label=name)
        right.bar_label(group, labels=[fmt_ms(v) for _, v in shown], padding=2, fontsize=8)
        for p, v in zip(positions, values):
            if v is None:
                right.annotate(f"{name}\nn/a", (p + offset, 0), xycoords=("data", "axes fraction"),
                               xytext=(0, 4), textcoords="offset points", ha="center",
                               va="bottom", fontsize=8, color="dimgray")
    # A log axis when the values span more than two decades, so small bars stay visible.
    if known and max(known) / min(known) > 100:
        right.set_yscale("log")
        right.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        right.set_ylim(min(known) / 2, max(known) * 2)
        right.set_ylabel("latency, ms (log scale)")
    else:
        right.set_ylabel("latency, ms")
        if known:
            right.set_ylim(0, max(known) * 1.15)
    right.set_xlim(-0.6, len(systems) - 0.4)  # room for bars drawn as "n/a"
    right.set_title("Latency, send to arrival (lower is better)")
    right.set_xticks(positions, names, fontsize=9)
    right.legend(loc="upper left", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    right.set_axisbelow(True)

    title = f"Relay benchmark, {results['date']}, {results['cores']} cores"
    if results.get("machine"):
        title += f" ({results['machine']})"
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results JSON file")
    parser.add_argument("output", help="PNG file to write")
    args = parser.parse_args()
    plot(load(args.results), args.output)


if __name__ == "__main__":
    main()
