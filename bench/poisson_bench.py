"""Absorbed refreshes under Poisson arrivals (issue 14, item 3): CPU per answered REGISTER and latency of one
registrar process when REGISTERs arrive at exponential inter-arrival times, with the load generator's own
pacing error beside every figure.

    python -m bench.poisson_bench [--rates 2000,4000,8000] [--duration 20] [--users 10000]
                                  [--targets mid,kamailio,responder] [--pin]

``--pin`` gives each target core 0 to itself (the rest on the other cores), as a pod with its own CPU has:
on two shared cores the generator's SCHED_FIFO sender preempts a single-threaded target and makes its tail.

What runs, all on 127.0.0.1 and bounded in time (every generator run has a duration and a timeout):

- ``mid`` (the default target): ONE ``midregistrar run --mode contact --store memory`` (UDP only,
  ``--outgoing-expires 3600``: every refresh inside the hour is absorbed) whose main registrar is Kamailio
  as an in-memory registrar (bench/kamailio/registrar.cfg), there to answer 200 to the initial REGISTERs it
  relays.
- ``kamailio``: Kamailio itself as the in-memory registrar (the same bench/kamailio/registrar.cfg, 2 UDP
  children), the baseline of bench/throttle_bench.py, run side by side at the same offered rates.
- ``responder``: the generator's own stand-in server (``poissongen -responder``: one thread, a 200 OK built
  from the request's Via/From/To/Call-ID/CSeq, nothing else), the generator's self-test: what the generator
  and the machine give when the server costs next to nothing.

The load is ``bench/poissongen`` (Go, built from Go modules by scripts/build-poissongen.sh, cached): USERS
distinct users, each an AoR with one binding of its own, a Call-ID that stays the same across runs and a
CSeq that grows. Each target first gets a warm-up run that registers every user once (evenly paced at
``--warmup-rate``); the mid-registrar relays those to its main registrar. Then, for each rate and each
target in turn, one generator run sends refreshes for DURATION s at the instants of a Poisson process of
that rate (round robin over the users, each run going on where the last one stopped, from the same source
ports: a refresh from another source would be relayed), times every answer (its send stamp on the monotonic
clock to the kernel's receive stamp of the answer) and counts a REGISTER with no final answer within
``--timeout`` as lost; it never retransmits. Its sending thread runs SCHED_FIFO (``--rt-priority``, when the
kernel allows it) and spins the last ``--spin-us`` before each instant instead of sleeping: on 2 shared cores
the sends then leave on time while the target keeps the cores busy, so the arrivals stay independent of the
target's load, which is what Poisson arrivals from independent phones are.

Per row: the target's CPU per answered REGISTER (utime+stime from /proc/<pid>/stat of the target and its
children, Kamailio's workers, over the generator run, divided by the 200s), latency percentiles
(nearest-rank, tests/support/stats.py's definition, computed by the generator over every answered REGISTER),
the REGISTERs the mid-registrar relayed during the run (its /metrics ``midregistrar_registers_total
{outcome="relayed"}``; must be 0: every measured REGISTER is an absorbed refresh), datagrams the kernel
dropped on the target's socket, and the generator's pacing error: send stamp minus scheduled instant
(p50/p99/max µs), the coefficient of variation of the actual inter-send gaps (1 for exponential gaps), their
Kolmogorov-Smirnov distance D to the exponential of the offered rate (beside the same D of the drawn schedule,
which is sampling noise only, and the 5 % critical value) and the index of dispersion of the sends per 1 ms
window (1 for a Poisson process). A row passes when every REGISTER got a 200 in time, nothing was relayed and
the achieved send rate is within 5 % of the offered one. The generator shares the 2 cores with the target:
its own CPU per REGISTER is in the table too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import REPO
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port, udp_drops, wait_port
from tests.support.process import Proc, process_tree, tree_cpu_seconds
from tests.support.registrar import Registrar, metric
from tests.support.sip import LOOPBACK
from tests.support.sipp import ensure_sip_tools

BUILD = REPO / "scripts" / "build-poissongen.sh"
KAMAILIO_CFG = REPO / "bench" / "kamailio" / "registrar.cfg"
TARGETS = ("mid", "kamailio", "responder")


def source_state() -> str:
    """The commit the registrar runs from, and whether registrar/ had uncommitted changes (an editable
    install runs the work tree)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "registrar"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in registrar/' if dirty else ''}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build_generator() -> str:
    """The cached poissongen binary (scripts/build-poissongen.sh builds it the first time)."""
    out = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{BUILD} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


@dataclass
class Target:
    """One server under load: its address, the PID whose process tree is charged, and where its users'
    round robin and CSeqs stand."""

    name: str
    addr: tuple[str, int]
    pid: int
    command: str
    registrar: Registrar | None = None
    source_ports: list[int] = field(default_factory=list)  # the generator's, the same in every run
    cseq: int = 1
    first_user: int = 0
    warmup: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    target: str
    rate: int
    command: str
    report: dict[str, Any]
    cpu_us: float | None
    relayed: float | None
    absorbed: float | None
    drops: int
    load: str
    passed: bool
    note: str


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its children onto ``cpus``."""
    for proc in process_tree(pid):
        for task in Path(f"/proc/{proc}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:  # the thread ended meanwhile
                continue


def run_generator(argv: list[str], timeout: float) -> dict[str, Any]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {p.returncode}: {p.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(p.stdout)
    return report


def generator_argv(gen: str, t: Target, args: argparse.Namespace, rate: int, warmup: bool) -> list[str]:
    argv = [
        gen,
        "-target",
        f"{t.addr[0]}:{t.addr[1]}",
        "-users",
        str(args.users),
        "-expires",
        str(args.expires),
        "-sockets",
        str(args.sockets),
        "-local-ports",
        ",".join(str(p) for p in t.source_ports),
        "-timeout",
        f"{args.timeout}s",
        "-cseq-base",
        str(t.cseq),
        "-callid-tag",
        "pb",
    ]
    if warmup:
        return [*argv, "-warmup", "-warmup-rate", str(args.warmup_rate), "-duration", "0"]
    argv += ["-rate", str(rate), "-duration", str(args.duration), "-first-user", str(t.first_user)]
    argv += ["-spin", f"{args.spin_us}us", "-rt-priority", str(args.rt_priority)]
    return argv


def warm_up(gen: str, t: Target, args: argparse.Namespace) -> None:
    """Register every user (relayed by the mid-registrar), then send each one first refresh: absorbed by
    the full pipeline, which keeps the template later refreshes are answered from, as happens once per
    phone in the field. The measured runs are the steady state after that."""
    for what in ("warm-up", "first refresh"):
        argv = generator_argv(gen, t, args, 0, warmup=True)
        rep = run_generator(argv, args.users / args.warmup_rate + args.timeout + 60)
        w = rep["warmup"]
        t.cseq = int(rep["cseq_next"])
        t.warmup.setdefault("commands", []).append(shlex.join(argv))
        ok = w["responses"].get("200", 0)
        print(
            f"{what} of {args.users} users on {t.name}: {ok} × 200, {w['lost']} lost, {w['responses']}",
            flush=True,
        )
        if ok != args.users:
            raise RuntimeError(f"{what} failed on {t.name}: {json.dumps(rep)[:3000]}")


def step(gen: str, t: Target, args: argparse.Namespace, rate: int, work: Path) -> Row:
    argv = generator_argv(gen, t, args, rate, warmup=False)
    m0 = t.registrar.metrics() if t.registrar else {}
    drops0 = udp_drops(t.addr[1])
    cpu0 = tree_cpu_seconds(t.pid)
    rep = run_generator(argv, args.duration + args.timeout + 90)
    cpu = tree_cpu_seconds(t.pid) - cpu0
    drops = udp_drops(t.addr[1]) - drops0
    (work / f"{t.name}-{rate}.json").write_text(json.dumps(rep, indent=2))
    t.cseq, t.first_user = int(rep["cseq_next"]), int(rep["first_user_next"])
    m = rep["measured"]
    ok200 = int(m["responses"].get("200", 0))
    relayed = absorbed = None
    if t.registrar:
        m1 = t.registrar.metrics()
        relayed = metric(m1, "midregistrar_registers", outcome="relayed") - metric(
            m0, "midregistrar_registers", outcome="relayed"
        )
        absorbed = metric(m1, "midregistrar_registers", outcome="absorbed") - metric(
            m0, "midregistrar_registers", outcome="absorbed"
        )
    notes = []
    others = {k: v for k, v in m["responses"].items() if k != "200"}
    if others:
        notes.append(f"other answers {others}")
    if m["lost"]:
        notes.append(f"{m['lost']} lost ({m['late']} late)")
    if m["send_errors"]:
        notes.append(f"{m['send_errors']} send errors")
    for key in ("mismatched", "unmatched", "duplicates"):
        if rep[key]:
            notes.append(f"{rep[key]} {key}")
    bad_checks = {k: v for k, v in rep["sipgo_checks"].items() if v != "ok"}
    if bad_checks:
        notes.append(f"sipgo checks {bad_checks}")
    skew = abs(float(rep.get("clock_skew_us") or 0.0))
    if skew > 1000:
        # The generator turns the kernel's wall-clock receive stamps into monotonic time with the clocks'
        # offset at each read, so a wall clock corrected during the run (a VM's) does not shift latencies.
        notes.append(f"wall clock moved {skew / 1000:.1f} ms against the monotonic one during the run")
    achieved = float(m.get("achieved_send_rate") or 0.0)
    if achieved < 0.95 * rate:
        notes.append("rate not reached")
    if relayed:
        notes.append(f"{relayed:.0f} relayed")
    if drops:
        notes.append(f"{drops} dropped by the kernel")
    passed = ok200 == m["sent"] and not m["lost"] and achieved >= 0.95 * rate and not relayed
    row = Row(
        target=t.name,
        rate=rate,
        command=shlex.join(argv),
        report=rep,
        cpu_us=cpu / ok200 * 1e6 if ok200 else None,
        relayed=relayed,
        absorbed=absorbed,
        drops=drops,
        load=loadavg(),
        passed=passed,
        note=", ".join(notes),
    )
    print(fmt_row(row), flush=True)
    return row


HEADER = (
    "| target | offered/s | sent | achieved/s | 200s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | "
    "CPU µs/REG | relayed / absorbed | pacing error p50 / p99 / max µs | "
    "gaps CV, KS D (schedule's D, 5 % crit.) | dispersion 1 ms | generator CPU µs/REG | load avg | result | "
    "note |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"


def fmt(v: Any, digits: int = 1, scale: float = 1.0) -> str:
    if v is None:
        return "–"
    return f"{float(v) * scale:.{digits}f}"


def fmt_row(r: Row) -> str:
    m = r.report["measured"]
    lat = m["latency_us"]
    pace = m["pacing"]
    late = pace["lateness_us"]
    ms = 1e-3
    return (
        f"| {r.target} | {r.rate} | {m['sent']} | {fmt(m.get('achieved_send_rate'), 0)} | "
        f"{m['responses'].get('200', 0)} | {fmt(lat.get('p50'), 2, ms)} | {fmt(lat.get('p90'), 2, ms)} | "
        f"{fmt(lat.get('p99'), 2, ms)} | {fmt(lat.get('p999'), 2, ms)} | {fmt(lat.get('max'), 1, ms)} | "
        f"{fmt(r.cpu_us)} | {fmt(r.relayed, 0)} / {fmt(r.absorbed, 0)} | "
        f"{fmt(late.get('p50'), 0)} / {fmt(late.get('p99'), 0)} / {fmt(late.get('max'), 0)} | "
        f"{fmt(pace.get('gap_cv'), 3)}, {fmt(pace.get('ks_d'), 4)} "
        f"({fmt(pace.get('ks_d_schedule'), 4)}, {fmt(pace.get('ks_crit_05'), 4)}) | "
        f"{fmt(pace.get('dispersion_1ms'), 2)} | {fmt(m.get('generator_cpu_us_per_send'), 1)} | {r.load} | "
        f"{'pass' if r.passed else 'FAIL'} | {r.note} |"
    )


def start_targets(names: list[str], gen: str, work: Path, stack: list[Any]) -> list[Target]:
    out: list[Target] = []
    for name in names:
        if name == "mid":
            main = Kamailio(KAMAILIO_CFG, children=2, workdir=work / "kam-main")
            stack.append(main)
            main.start()
            reg = Registrar(
                (LOOPBACK, main.port),
                mode="contact",
                transports=("udp",),
                extra=["--outgoing-expires", "3600", "--log-level", "warning"],
                workdir=work / "mid",
            )
            stack.append(reg)
            reg.start(ready_timeout=20)
            command = f"{reg.command}  (main registrar: {main.command})"
            out.append(Target("midregistrar", reg.addr, reg.pid, command, registrar=reg))
        elif name == "kamailio":
            kam = Kamailio(KAMAILIO_CFG, children=2, workdir=work / "kam")
            stack.append(kam)
            kam.start()
            out.append(Target("kamailio", (LOOPBACK, kam.port), kam.pid, kam.command))
        elif name == "responder":
            port = free_port()
            argv = [gen, "-responder", f"{LOOPBACK}:{port}"]
            proc = Proc(argv, work / "responder", "responder")
            stack.append(proc)
            wait_port(port, "udp", 10, proc)
            out.append(Target("responder", (LOOPBACK, port), proc.pid, shlex.join(argv)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2000,4000,8000", help="offered rates, REGISTER/s, comma-separated")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of Poisson load per rate")
    ap.add_argument("--users", type=int, default=10000, help="distinct users (one binding each)")
    ap.add_argument(
        "--targets",
        "--target",
        default="mid",
        help="comma-separated, run side by side at each rate: mid, kamailio, responder",
    )
    ap.add_argument("--expires", type=int, default=300, help="lifetime the users ask for, s")
    ap.add_argument("--warmup-rate", type=float, default=1000.0, help="warm-up REGISTERs per second")
    ap.add_argument("--timeout", type=float, default=2.0, help="a REGISTER unanswered this long is lost, s")
    ap.add_argument("--sockets", type=int, default=1, help="generator sockets (source ports)")
    ap.add_argument("--spin-us", type=int, default=20, help="generator: busy-wait the last µs before a send")
    ap.add_argument(
        "--rt-priority",
        type=int,
        default=10,
        help="generator: run its sending thread SCHED_FIFO at this priority (0: normal)",
    )
    ap.add_argument("--rest", type=float, default=2.0, help="pause between runs, s")
    ap.add_argument("--generator", help="a poissongen binary (default: build or reuse the cached one)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="give each target core 0 to itself and run this script, the generator and the main "
        "registrar on the other cores (a pod with its own CPU), instead of sharing every core",
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        ap.error(f"unknown targets {unknown}: choose from {', '.join(TARGETS)}")
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    if ({"mid", "kamailio"} & set(names)) and not ensure_sip_tools():
        print("kamailio unavailable: run `make sip-tools`")
        return 1
    if args.sockets < 1:
        ap.error("--sockets must be at least 1")
    gen = args.generator or build_generator()
    version = subprocess.run([gen, "-version"], capture_output=True, text=True, check=False).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="poisson-bench-"))
    la0 = loadavg()
    source = source_state()
    rows: list[Row] = []
    stack: list[Any] = []
    targets: list[Target] = []
    if args.pin:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))  # inherited by all this starts
    try:
        targets = start_targets(names, gen, work, stack)
        if args.pin:
            for t in targets:
                pin(t.pid, {0})
        for t in targets:
            t.source_ports = [free_port() for _ in range(args.sockets)]
            if t.name != "responder":
                warm_up(gen, t, args)
        time.sleep(args.rest)
        print(HEADER, flush=True)
        print(RULE, flush=True)
        for rate in rates:
            for t in targets:
                rows.append(step(gen, t, args, rate, work))
                time.sleep(args.rest)
    finally:
        for thing in reversed(stack):
            thing.stop()
    la1 = loadavg()
    sched = rows[0].report.get("sender_sched", "?") if rows else "?"
    lines = [
        "### Poisson arrivals: absorbed refreshes, CPU per REGISTER, latency, the generator's pacing error",
        "",
        f"`{sys.executable} -m bench.poisson_bench {shlex.join(sys.argv[1:] if argv is None else argv)}` — "
        f"{args.users} users, {args.duration:g} s per rate, timeout {args.timeout:g} s; load average before "
        f"{la0}, after {la1}; {os.cpu_count()} cores, {platform.platform()}; registrar at {source}; "
        f"generator {version}, sending thread {sched}",
        "",
        HEADER,
        RULE,
        *[fmt_row(r) for r in rows],
        "",
        "Latency: the generator's send stamp to its answer stamp (monotonic clock), nearest-rank percentiles "
        "over every answered REGISTER. Pacing error: send stamp minus scheduled instant. CPU: the target's "
        "process tree (utime+stime) over the generator run / 200s received.",
        "",
        "Commands:",
        "",
    ]
    for t in targets:
        lines.append(f"- {t.name}: `{t.command}`")
        for label, command in zip(("warm-up", "first refresh"), t.warmup.get("commands", []), strict=False):
            lines.append(f"  - {label}: `{command}`")
    lines += ["", "Generator runs:", ""]
    lines += [f"- {r.target} {r.rate}/s: `{r.command}`" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    print(f"\nwork dir (generator reports as JSON): {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
