#!/usr/bin/env python3
"""Draws the fleet simulation (tests/fleet_sim.rs): connected devices over time.

    fleet_plot.py REPORT.json OUT.png

REPORT.json is what `make fleet-sim` writes (target/fleet-sim/report.json): "devices",
"timeline" ([[seconds, connected now, connected at least once], ...]), "all_connected_s",
"all_started_s", "throttled_total", "rate_scale", "calls_per_device", "rss_sum_mib".
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("out")
    args = parser.parse_args()
    with open(args.report) as handle:
        report = json.load(handle)
    times = [point[0] for point in report["timeline"]]
    connected = [point[1] for point in report["timeline"]]
    ever = [point[2] for point in report["timeline"]]
    calls = sum(report["calls_per_device"].values())

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    axis.step(times, ever, where="post", color="#2ca02c", linewidth=2,
              label="connected at least once")
    axis.step(times, connected, where="post", color="#1f77b4", linewidth=1,
              label="connected now (dips: reconnects with refreshed 90-s moto credentials)")
    axis.axvspan(0, report["all_started_s"], color="#dddddd", alpha=0.5,
                 label=f"daemons starting (first to last: {report['all_started_s']:.0f} s)")
    axis.axhline(report["devices"], color="#7f7f7f", linestyle="--", linewidth=1,
                 label=f"{report['devices']} devices")
    axis.axvline(report["all_connected_s"], color="#2ca02c", linestyle=":", linewidth=1,
                 label=f"all had connected after {report['all_connected_s']:.0f} s")
    axis.set_xlabel("seconds since the first daemon started")
    axis.set_ylabel("daemons connected")
    axis.set_ylim(0, report["devices"] * 1.08)
    axis.set_xlim(0, max(times) * 1.05)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(
        f"Fleet simulation: {report['devices']} daemons started together, one self-register stack\n"
        f"Cognito quotas / {report['rate_scale']:g}; {report['throttled_total']} calls throttled; "
        f"{calls:.1f} AWS calls per device (retries included); "
        f"RSS sum {report['rss_sum_mib']:.0f} MiB",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(args.out)


if __name__ == "__main__":
    main()
