"""Autoscaling on real metrics, from the repository's root, as root:

    python -m bench.autoscaling_bench [--runs 3]

Runs the node tier's autoscaling tests (tests/node/test_autoscaling.py: a real node, the chart, Prometheus,
prometheus-adapter, metrics-server and kube-state-metrics built from Go modules, the real HPA controller with
a 5 s sync) --runs times, each on a fresh node, and reports the median and the spread of what they measure:

- load to decision: 60 REGISTER/s start against a target of 25 per pod until the HPA sets the MidRegistrar's
  replicas to 3 (Prometheus scrapes every 5 s; the adapter's rate() window is 30 s);
- load to Ready: the same, until the third pod is Ready;
- load drop to scale-in: the heavy phones stop until the HPA sets 1 replica (stabilization window 45 s);
- CPU target to decision: the CPU target lowered under the pods' use until the HPA scales out;
- the metrics pipeline's own start (all four processes, both APIServices Available).

A run whose tests fail is reported as failed and left out of the medians. Prints a markdown table and the
exact command.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime

FIGURES = re.compile(r"autoscaling figures: (\{.*\})")
PIPELINE = re.compile(r"metrics pipeline: (\{.*\})")
ROWS = (
    ("load_to_decision_s", "60 REGISTER/s start → HPA sets 3 replicas", "s"),
    ("load_to_3_ready_s", "60 REGISTER/s start → third pod Ready", "s"),
    ("per_pod_rate_after", "per-pod REGISTER rate the HPA reads after scale-out (target 25)", "/s"),
    ("load_drop_to_scale_in_s", "heavy phones stop → HPA sets 1 replica (window 45 s)", "s"),
    ("cpu_target_to_decision_s", "CPU target lowered under use → HPA scales out", "s"),
    ("cpu_utilization_pct", "CPU utilisation the HPA read before (% of the 100m request)", "%"),
    ("p99_absorbed_ms", "REGISTER p99, absorbed (registrar histogram)", "ms"),
    ("p99_relayed_ms", "REGISTER p99, relayed (registrar histogram)", "ms"),
    ("available_s", "metrics pipeline start → both APIServices Available", "s"),
)


def one_run() -> tuple[dict[str, float] | None, str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-s",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/node/test_autoscaling.py",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False, timeout=3600)
    out = proc.stdout
    figures: dict[str, float] = {}
    for pattern in (FIGURES, PIPELINE):
        m = pattern.search(out)
        if m:
            figures.update({k: float(v) for k, v in json.loads(m.group(1)).items()})
    tail = "\n".join(out.splitlines()[-3:])
    return (figures if proc.returncode == 0 else None), tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs: list[dict[str, float]] = []
    for i in range(args.runs):
        t0 = time.monotonic()
        figures, tail = one_run()
        print(
            f"run {i + 1}: {'ok' if figures else 'FAILED'} in {time.monotonic() - t0:.0f} s: {tail}",
            flush=True,
        )
        if figures:
            runs.append(figures)
    print(f"\n{datetime.now():%Y-%m-%d %H:%M}, {len(runs)} of {args.runs} runs passed\n")
    print("| what | median | min – max |\n|---|---|---|")
    for key, what, unit in ROWS:
        values = [r[key] for r in runs if key in r]
        if values:
            median, low, high = statistics.median(values), min(values), max(values)
            print(f"| {what} | {median:.1f} {unit} | {low:.1f} – {high:.1f} {unit} |")
    print(f"\ncommand: python -m bench.autoscaling_bench {shlex.join(sys.argv[1:])}".rstrip())
    return 0 if runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
