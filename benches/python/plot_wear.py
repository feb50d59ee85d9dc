#!/usr/bin/env python3
"""Draws the storage wear benchmark (benches/wear.rs): bytes written per message and `ok`
latency, before and after, per mode and rate.

    plot_wear.py BEFORE.json AFTER.json OUT.png

Each input is what `cargo bench --bench wear` writes to target/wear-bench/<label>.json:
{"label": "...", "date": "...", "cores": 2,
 "runs": [{"mode": "connected"|"offline", "rate": 10,
           "figures": {"write_bytes_per_msg": 191.0, "fsyncs_per_msg": 0.007,
                       "ok_p50_ms": 3.8, "ok_p99_ms": 27.5}}, ...],
 "durable_ingest_msgs_per_s": 150000.0}   # not drawn
"""

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COLORS = ["#dd8452", "#4c72b0"]


def load(path):
    with open(path) as handle:
        results = json.load(handle)
    runs = results.get("runs") or []
    if not runs or any("figures" not in run for run in runs):
        sys.exit(f"plot_wear.py: {path}: no runs with figures")
    return results


def scenarios(results):
    return [f"{run['mode']}\n{run['rate']} msg/s" for run in results["runs"]]


def values(results, key):
    return [run["figures"].get(key) or 0.0 for run in results["runs"]]


def panel(axis, inputs, key, title, unit, log):
    names = scenarios(inputs[0])
    width = 0.8 / len(inputs)
    for index, results in enumerate(inputs):
        xs = [i + (index - (len(inputs) - 1) / 2) * width for i in range(len(names))]
        ys = values(results, key)
        bars = axis.bar(xs, ys, width, label=results["label"], color=COLORS[index % len(COLORS)])
        floor = min((y for r in inputs for y in values(r, key) if y > 0), default=1.0) / 2
        for bar, y in zip(bars, ys):
            # A zero has no bar on a log axis: its label sits at the bottom.
            axis.annotate(f"{y:,.0f}" if y >= 10 or y == 0 else f"{y:.2g}",
                          (bar.get_x() + bar.get_width() / 2, y if y > 0 else floor),
                          ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, fontsize=8)
    axis.set_title(title)
    axis.set_ylabel(unit)
    if log:
        axis.set_yscale("log")
    axis.legend(fontsize=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("out")
    args = parser.parse_args()
    inputs = [load(args.before), load(args.after)]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    panel(axes[0], inputs, "write_bytes_per_msg",
          "bytes written to storage per message (/proc/PID/io)", "bytes / message (log)", True)
    panel(axes[1], inputs, "ok_p99_ms", "ok latency p99", "ms (log)", True)
    figure.suptitle(f"iot-cognito-relay storage wear: one app writing ~45-byte readings, "
                    f"{inputs[1]['date']}, {inputs[1]['cores']} cores", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
