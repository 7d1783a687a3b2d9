"""Where an absorbed refresh's CPU goes: a sampling profile of the real registrar process under load.

Run: ``python -m bench.hotpath_profile [--rate 8000] [--seconds 20] [--users 10000] [--out DIR]`` (as root,
or with ptrace allowed: py-spy attaches to another process). The setup is ``bench.throttle_bench
throughput``'s: Kamailio as the main registrar, one ``midregistrar run --mode contact --store memory``
process, 10,000 SIPp users pre-registered and then refreshing inside the window (every refresh absorbed).
While SIPp sends at ``--rate``, py-spy samples the registrar (``--native`` off: Python frames only; the
event loop's own C code shows as the Python frame that called into it). py-spy stops the process for each
sample (coherent stacks; ``--nonblocking`` tore a tenth of them here), which adds ~15 % to its CPU: read
the shares, and take the absolute µs from ``bench.throttle_bench``.

Writes ``profile.svg`` (a flame graph) and ``profile.txt`` (py-spy's collapsed stacks) into ``--out`` and
prints two markdown tables: the share of samples per layer of the process (the innermost frame of each
sample, attributed to the file it belongs to) and the 25 functions with the most samples of their own. The
CPU per REGISTER over the same window comes from /proc (utime+stime), so the shares can be read in µs.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from html import escape
from pathlib import Path

from bench.throttle_bench import TRun, load_sipp, preregister, throughput_registrar
from tests.support import REPO
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port
from tests.support.process import tree_cpu_seconds
from tests.support.registrar import metric
from tests.support.sipp import ensure_sip_tools

# Innermost-frame file → layer, first match wins (paths as py-spy prints them).
LAYERS: tuple[tuple[str, str], ...] = (
    ("registrar/net/", "net: asyncio transport (registrar/net)"),
    ("registrar/sip/message.py", "sip: parser and serializer"),
    ("registrar/sip/headers.py", "sip: parser and serializer"),
    ("registrar/sip/uri.py", "sip: parser and serializer"),
    ("registrar/sip/fastinit.py", "sip: parser and serializer"),
    ("registrar/sip/", "sip: stack and transactions"),
    ("registrar/core/", "core: mid-registrar rules"),
    ("registrar/records.py", "store: records and memory store"),
    ("registrar/store/", "store: records and memory store"),
    ("registrar/", "registrar: app, http, config"),
    ("asyncio/", "event loop (asyncio, uvloop glue)"),
    ("uvloop", "event loop (asyncio, uvloop glue)"),
    ("prometheus_client", "metrics"),
    ("aiohttp", "http server"),
)


def layer_of(frame: str) -> str:
    for needle, name in LAYERS:
        if needle in frame:
            return name
    return "other Python (stdlib, dataclasses, …)"


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw format: one ``frame;frame;…;innermost count`` line per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def function_of(frame: str) -> str:
    """``name (file:line)`` → ``name (file)``: samples are summed per function, not per line."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def tables(stacks: list[tuple[list[str], int]], cpu_us: float) -> str:
    total = sum(n for _, n in stacks) or 1
    by_layer: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        by_layer[layer_of(frames[-1])] += n
        names = [function_of(f) for f in frames]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    lines = [
        f"{total} samples; {cpu_us:.1f} µs of process CPU per REGISTER over the window",
        "",
        "| layer (innermost frame) | share of samples | ≈ µs per REGISTER |",
        "|---|---|---|",
    ]
    for name, n in by_layer.most_common():
        lines.append(f"| {name} | {100 * n / total:.1f} % | {cpu_us * n / total:.1f} |")
    lines += ["", "| function | inclusive | own | ≈ µs inclusive |", "|---|---|---|---|"]
    for name, n in inclusive.most_common(30):
        share, mine = 100 * n / total, 100 * own[name] / total
        lines.append(f"| `{name}` | {share:.1f} % | {mine:.1f} % | {cpu_us * n / total:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath_profile", description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=8000, help="absorbed refreshes per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of load (sampled after 3 s)")
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--sample-rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "profile")
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_sip_tools()
    work = Path(tempfile.mkdtemp(prefix="hotpath-"))
    users = work / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"user{i:05d};x;bench.test\n" for i in range(args.users)))
    ns = argparse.Namespace(
        users=args.users, load_expires=300, prereg_rate=500, cseq_base=int(time.time()) - 10, timer_resol=1
    )
    kam = Kamailio(REPO / "bench" / "kamailio" / "registrar.cfg", children=2, workdir=work / "kam")
    reg = None
    try:
        kam.start()
        reg = throughput_registrar(kam.port, work / "mid").start(ready_timeout=20)
        run = TRun("midregistrar", command=reg.command)
        preregister(run, reg.addr, free_port(), users, ns, work)
        loops = max(1, round(args.rate * args.seconds / args.users))
        sipp = load_sipp(reg.addr, free_port(), users, args.users, args.rate, loops, ns, work, "load")
        sipp.start()
        time.sleep(3)  # every user looping
        window = max(1.0, args.seconds - 6)
        m0, cpu0 = reg.metrics(), tree_cpu_seconds(reg.pid)
        raw, svg = args.out / "profile.txt", args.out / "profile.svg"
        common = [pyspy, "record", "-p", str(reg.pid), "-d", str(int(window)), "-r", str(args.sample_rate)]
        common.append(
            "--nonblocking"
        )  # do not stop the process to sample it: less overhead, rare torn stacks
        subprocess.run([*common, "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
        cpu1, m1 = tree_cpu_seconds(reg.pid), reg.metrics()
        absorbed = metric(m1, "midregistrar_registers", outcome="absorbed") - metric(
            m0, "midregistrar_registers", outcome="absorbed"
        )
        sipp.wait(args.seconds + 90)
        svg.write_text(flamegraph(read_collapsed(raw)))
        cpu_us = (cpu1 - cpu0) / absorbed * 1e6 if absorbed else 0.0
        print(f"`{sys.executable} -m bench.hotpath_profile {' '.join(argv or sys.argv[1:])}`")
        print(
            f"rate {args.rate}/s, {absorbed:.0f} absorbed in the {window:.0f} s window; files in {args.out}\n"
        )
        print(tables(read_collapsed(raw), cpu_us))
    finally:
        if reg is not None:
            reg.stop()
        kam.stop()
    return 0


def flamegraph(stacks: list[tuple[list[str], int]], width: int = 1600, row: int = 16) -> str:
    """A plain SVG flame graph (outermost frame at the bottom, widths proportional to samples), so the
    picture needs no tool beyond py-spy; hover a box for its frame and share."""
    root: dict[str, object] = {}
    for frames, n in stacks:
        node = root
        for frame in map(function_of, frames):
            child = node.setdefault(frame, {"#": 0})
            assert isinstance(child, dict)
            child["#"] = int(child["#"]) + n
            node = child
    total = sum(n for _, n in stacks) or 1
    depth_max = max((len(f) for f, _ in stacks), default=1)
    height = (depth_max + 1) * row
    boxes: list[str] = []

    def walk(node: dict[str, object], x: float, depth: int) -> None:
        for frame, child in sorted((k, v) for k, v in node.items() if k != "#"):
            assert isinstance(child, dict)
            n = int(child["#"])
            w = width * n / total
            if w >= 0.5:
                y = height - (depth + 1) * row
                hue = 30 + zlib.crc32(frame.encode()) % 40
                label = escape(frame if w > 7 * len(frame) else frame[: max(0, int(w / 7) - 1)])
                boxes.append(
                    f"<g><title>{escape(frame)}: {100 * n / total:.1f} %</title>"
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
                    f'fill="hsl({hue},80%,60%)"/>'
                    f'<text x="{x + 2:.1f}" y="{y + row - 4}" font-size="11">{label}</text></g>'
                )
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace">{"".join(boxes)}</svg>\n'
    )


if __name__ == "__main__":
    raise SystemExit(main())
