"""``python -m tests.faults.run [FAULT ...] [--mode contact|aor] [--seconds S] [--phones N]``: fault runs under
steady SIPp load (tests/faults/faults.py), each checked by the history checker; prints one line per run and
writes the reports as JSON (``--json``). The long runs of ``make bench``; the short ones are in
tests/faults/test_faults.py. Root only (network namespaces)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

from tests.faults.faults import FAULTS, run
from tests.faults.rig import RigConfig
from tests.support.netns import available


def markdown(rows: list[dict[str, object]]) -> str:
    """The reports as the table of docs/operations.md "What it survives"."""
    out = [
        "| fault | mode | REGISTERs | failed | longest outage | bindings lost | duplicates | De-REGISTERs "
        "| calls | violations |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['fault']} | {r['mode']} | {r['registers']} | {r['failed']} | {r['longest_outage_s']} s "
            f"| {r['lost']} | {r['duplicates']} | {r['deregisters']} | {r['calls']} | {len(r['violations'])} |"  # type: ignore[arg-type]
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("faults", nargs="*", help=f"default: all of {', '.join(FAULTS)}")
    ap.add_argument("--mode", action="append", choices=["contact", "aor"], help="repeatable; default both")
    ap.add_argument("--seconds", type=float, help="how long each fault lasts (default: each fault's own)")
    ap.add_argument("--phones", type=int, default=20, help="phones refreshing through each of 3 registrars")
    ap.add_argument("--every-ms", type=int, default=3000, help="refresh interval of the phones")
    ap.add_argument("--json", type=Path, help="write the reports here")
    args = ap.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: every process it started is stopped by PID on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    why = available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    names = args.faults or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        ap.error(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    rows, bad = [], 0
    for mode in args.mode or ["contact", "aor"]:
        for name in names:
            config = RigConfig(mode=mode, phones=args.phones, every_ms=args.every_ms)
            with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
                report = run(Path(tmp), FAULTS[name], config, args.seconds)
            print(report.describe(), flush=True)
            rows.append({**report.row(), "violations": report.violations, "notes": report.notes})
            bad += not report.ok
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    print(f"{len(rows) - bad}/{len(rows)} runs kept every property")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
