"""Benchmarks: `python -m bench.run all|parse|mirror|kamailio [options]` from the repository's root
(`make bench` runs `all`).

- `parse`: runs `python -m bench.parse_bench` (parse+serialize of a typical REGISTER) as a subprocess.
- `mirror`: the same rate-stepping SIPp REGISTER load against two relays in front of one SIPp main-registrar
  UAS (answering 200): Kamailio as a plain stateful proxy (bench/kamailio/proxy.cfg), then
  `midregistrar run --mode mirror`. Prints markdown tables (per step and summary with the ratio) and the
  exact commands; also written to bench/results/<time>.md.
- `kamailio`: only the Kamailio side of `mirror` (to check the harness without the engine).

Method. SIPp (tests/support/scenarios/load_register.xml) sends one REGISTER per call for 10,000 distinct
users from an injection file, at a fixed rate for `--step` seconds per step; the rate grows by `--factor`
until a step fails, then one step bisects between the last pass and the first failure. A step passes when
SIPp saw 0 failed calls, 0 unexpected messages and achieved at least 95 % of the offered rate. Latency:
SIPp's own response times (-trace_rtt: every REGISTER, millisecond resolution) and a Python probe that sends
`--probe-rate` extra REGISTERs/s through the same target, timed with perf_counter (microseconds); p50 and
p99 are nearest-rank percentiles (tests/support/stats.py). CPU per REGISTER: utime+stime from
/proc/<pid>/stat of the target process and its children over the step, divided by the REGISTERs it relayed.
"drops": datagrams the kernel dropped at the target's UDP socket (receive buffer full: the target fell
behind). "other" is the CPU (in cores) used during the step by processes outside this benchmark (e.g. a
build running at the same time): figures with other > 0.1 are not comparable.
Every loop is bounded (SIPp -m and -timeout; a maximum rate); only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port, udp_drops, wait_port
from tests.support.process import CLK_TCK, Proc, cpu_seconds, tree_cpu_seconds
from tests.support.registrar import registrar_argv
from tests.support.sip import LOOPBACK, sip_request, status_code, wait_sip_ready
from tests.support.sipp import Sipp, ensure_sip_tools
from tests.support.stats import percentile
from tests.support.wait import WaitTimeout

BUFF = 4194304


def run_parse() -> int:
    """`python -m bench.parse_bench` as a subprocess (a process of its own: nothing else warms its caches)."""
    argv = [sys.executable, "-m", "bench.parse_bench"]
    print(f"$ {shlex.join(argv)}")
    return subprocess.run(argv, cwd=REPO, check=False).returncode


# ----------------------------------------------------------------------------------------------- probe


class Probe:
    """Sends REGISTERs at a low rate through the target and times each answer with perf_counter."""

    def __init__(self, target: tuple[str, int], rate: float) -> None:
        self.target = target
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.local = self.sock.getsockname()
        self.pending: dict[str, float] = {}
        self.rtts_us: list[float] = []
        self.sent = 0
        self.other_codes: dict[int, int] = {}
        self.stop_evt = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]

    def start(self) -> Probe:
        if self.interval:
            for t in self.threads:
                t.start()
        return self

    def _send(self) -> None:
        n = 0
        next_t = time.perf_counter()
        while not self.stop_evt.is_set():
            user = f"probe{n % 1000:04d}"
            cid = uuid.uuid4().hex
            msg = sip_request(
                "REGISTER",
                "sip:bench.test",
                self.local,
                call_id=cid,
                from_uri=f"sip:{user}@bench.test",
                to_uri=f"sip:{user}@bench.test",
                headers=[("Contact", f"<sip:{user}@{self.local[0]}:{self.local[1]}>;expires=3600")],
            )
            with self.lock:
                self.pending[cid] = time.perf_counter()
            self.sock.sendto(msg, self.target)
            self.sent += 1
            n += 1
            next_t += self.interval
            delay = next_t - time.perf_counter()
            if delay > 0:
                self.stop_evt.wait(delay)

    def _recv(self) -> None:
        while not self.stop_evt.is_set():
            try:
                data, _ = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            now = time.perf_counter()
            code = status_code(data)
            if code is None or code < 200:
                continue
            cid = ""
            for line in data.split(b"\r\n"):
                low = line.lower()
                if low.startswith(b"call-id:") or low.startswith(b"i:"):
                    cid = line.split(b":", 1)[1].strip().decode()
                    break
            with self.lock:
                t0 = self.pending.pop(cid, None)
            if t0 is None:
                continue
            if code == 200:
                self.rtts_us.append((now - t0) * 1e6)
            else:
                self.other_codes[code] = self.other_codes.get(code, 0) + 1

    def stop(self) -> None:
        time.sleep(0.5)
        self.stop_evt.set()
        for t in self.threads:
            if t.is_alive():
                t.join(2)
        self.sock.close()

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtts_us) - sum(self.other_codes.values())


# ----------------------------------------------------------------------------------------------- steps


def busy_jiffies() -> float:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


@dataclass
class Step:
    target: str
    rate: int
    seconds: float
    ok: int
    failed: int
    unexpected: int
    retrans: int
    achieved: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    probe_p50_us: float | None
    probe_p99_us: float | None
    probe_lost: int
    cpu_us_per_reg: float | None
    drops: int
    target_cores: float
    other_cores: float
    passed: bool
    note: str = ""


@dataclass
class TargetRun:
    name: str
    command: str
    steps: list[Step] = field(default_factory=list)
    uac_command: str = ""
    uas_command: str = ""

    @property
    def best(self) -> Step | None:
        passed = [s for s in self.steps if s.passed]
        return max(passed, key=lambda s: s.rate) if passed else None


def write_users(path: Path, n: int) -> None:
    with path.open("w") as f:
        f.write("SEQUENTIAL\n")
        for i in range(n):
            f.write(f"user{i:05d};secret{i:05d};bench.test\n")


def parse_duration_us(value: str | None) -> float | None:
    """SIPp's statistics duration "HH:MM:SS:micro" → microseconds."""
    if not value:
        return None
    try:
        h, m, s, us = (int(x) for x in value.split(":"))
    except ValueError:
        return None
    return ((h * 60 + m) * 60 + s) * 1e6 + us


def run_step(
    name: str,
    target: tuple[str, int],
    pid: int,
    rate: int,
    seconds: float,
    users: Path,
    work: Path,
    probe_rate: float,
    port: int | None = None,
) -> tuple[Step, str]:
    calls = max(1, int(rate * seconds))
    uac = Sipp(
        "load_register",
        target,
        port=port,
        keys={"expires": 3600},
        calls=calls,
        rate=rate,
        limit=max(2000, rate * 2),
        timeout_s=seconds + 30,
        inf=users,
        trace_msg=False,
        trace_logs=False,
        trace_stat=True,
        trace_rtt=True,
        rtt_freq=max(100, min(1000, calls // 20)),
        buff_size=BUFF,
        extra=["-recv_timeout", "5000", "-max_recv_loops", "10000", "-skip_rlimit"],
        workdir=work / f"{name}-{rate}",
        name="load_register",
    )
    cpu0 = tree_cpu_seconds(pid)
    drops0 = udp_drops(target[1])
    busy0 = busy_jiffies()
    own0 = cpu_seconds(os.getpid())
    probe = Probe(target, probe_rate)
    t0 = time.monotonic()
    uac.start()
    probe.start()
    # The UAC's own CPU is "ours": sample it before it exits.
    uac_cpu = 0.0
    while uac.running() and time.monotonic() - t0 < seconds + 40:
        uac_cpu = cpu_seconds(uac.proc.pid) if uac.proc else uac_cpu
        time.sleep(0.25)
    res = uac.wait(5)
    probe.stop()
    elapsed = time.monotonic() - t0
    cpu1 = tree_cpu_seconds(pid)
    drops = udp_drops(target[1]) - drops0
    busy1 = busy_jiffies()
    own1 = cpu_seconds(os.getpid())
    ok, failed = res.successful, res.failed
    unexpected = res.counter("FailedUnexpectedMessage(C)")
    rows = res.rtt_rows()
    if rows:
        span_s = (rows[-1][0] - rows[0][0]) / 1000.0
        achieved = len(rows) / span_s if span_s > 0 else float(ok)
    else:
        achieved = ok / elapsed if elapsed else 0.0
    rtts = [r[1] for r in rows]
    target_cpu = cpu1 - cpu0
    relayed = ok + len(probe.rtts_us)
    # Everything else that ran on the machine meanwhile (UAS and UAC SIPp, this script, the target are ours).
    ours = target_cpu + uac_cpu + (own1 - own0) + _UAS_CPU.delta()
    other = max(0.0, (busy1 - busy0) - ours) / elapsed if elapsed else 0.0
    passed = failed == 0 and unexpected == 0 and ok >= calls and achieved >= 0.95 * rate and probe.lost == 0
    note = []
    if failed:
        note.append(f"{failed} failed")
    if ok < calls:
        note.append(f"{calls - ok} not completed")
    if achieved < 0.95 * rate:
        note.append("rate not reached")
    if probe.lost:
        note.append(f"probe lost {probe.lost}")
    if probe.other_codes:
        note.append(f"probe codes {probe.other_codes}")
    if res.returncode not in (0,):
        note.append(f"sipp rc {res.returncode}")
    step = Step(
        target=name,
        rate=rate,
        seconds=round(elapsed, 1),
        ok=ok,
        failed=failed,
        unexpected=unexpected,
        retrans=res.retransmissions,
        achieved=achieved,
        p50_ms=percentile(rtts, 50) if rtts else None,
        p99_ms=percentile(rtts, 99) if rtts else None,
        mean_ms=(parse_duration_us(res.stat("ResponseTime1(C)")) or 0) / 1000.0 if res.stat_rows() else None,
        probe_p50_us=percentile(probe.rtts_us, 50) if probe.rtts_us else None,
        probe_p99_us=percentile(probe.rtts_us, 99) if probe.rtts_us else None,
        probe_lost=probe.lost,
        cpu_us_per_reg=(target_cpu / relayed * 1e6) if relayed else None,
        drops=drops,
        target_cores=target_cpu / elapsed if elapsed else 0.0,
        other_cores=other,
        passed=passed,
        note=", ".join(note),
    )
    return step, uac.command


class _UasCpu:
    """Tracks the SIPp UAS CPU so it counts as "ours" in the other-load figure."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.last = 0.0

    def set(self, pid: int | None) -> None:
        self.pid = pid
        self.last = cpu_seconds(pid) if pid else 0.0

    def delta(self) -> float:
        if not self.pid:
            return 0.0
        now = cpu_seconds(self.pid)
        d, self.last = now - self.last, now
        return d


_UAS_CPU = _UasCpu()


def wait_idle(pid: int, limit: float = 45.0) -> None:
    """After an overload, let the target finish its backlog (its CPU use < 5 % over 1 s; at most `limit`)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = tree_cpu_seconds(pid)
        time.sleep(1.0)
        if tree_cpu_seconds(pid) - c0 < 0.05:
            return


def step_rates(start: int, factor: float, max_rate: int) -> list[int]:
    rates, r = [], float(start)
    while r <= max_rate:
        rates.append(int(round(r / 100.0) * 100) or int(r))
        r *= factor
    return rates


def ramp(
    name: str,
    target: tuple[str, int],
    pid: int,
    args: argparse.Namespace,
    users: Path,
    work: Path,
    alive: Callable[[], bool],
) -> tuple[list[Step], str]:
    steps: list[Step] = []
    cmd = ""
    last_pass: int | None = None
    first_fail: int | None = None
    # One SIPp port for every step: each user keeps one contact (a new port per step would add a binding
    # per user per step and grow every reply).
    port = free_port()

    def one(rate: int) -> bool:
        nonlocal cmd
        step, cmd = run_step(name, target, pid, rate, args.step, users, work, args.probe_rate, port)
        steps.append(step)
        print(fmt_step(step), flush=True)
        if not alive():
            step.note += " (target died)"
            raise RuntimeError(f"{name} died")
        time.sleep(args.rest)
        if not step.passed:
            wait_idle(pid)
        return step.passed

    try:
        for rate in step_rates(args.start, args.factor, args.max_rate):
            if one(rate):
                last_pass = rate
            else:
                first_fail = rate
                break
        # The first step already failed: halve (at most 4 times, not below 50/s) until one passes.
        rate = args.start
        while last_pass is None and first_fail is not None and rate > 100 and len(steps) < 5:
            rate = max(50, rate // 2)
            if one(rate):
                last_pass = rate
            else:
                first_fail = rate
        if last_pass and first_fail and args.bisect:
            mid = (last_pass + first_fail) // 2
            mid = int(round(mid / 100.0) * 100) if mid >= 1000 else int(round(mid / 10.0) * 10)
            if last_pass < mid < first_fail:
                one(mid)
    except RuntimeError as e:
        print(f"stopped: {e}", flush=True)
    return steps, cmd


# ------------------------------------------------------------------------------------------- targets


def bench_target(kind: str, args: argparse.Namespace, work: Path, users: Path) -> TargetRun:
    uas = Sipp(
        "load_uas",
        None,
        keys={"expires": 3600},
        trace_msg=False,
        trace_logs=False,
        trace_stat=True,
        buff_size=BUFF,
        timeout_s=args.max_minutes * 60,
        extra=["-max_recv_loops", "10000", "-skip_rlimit"],
        workdir=work / f"uas-{kind}",
        name="load_uas",
    )
    uas.start().wait_bound()
    _UAS_CPU.set(uas.proc.pid if uas.proc else None)
    run: TargetRun
    try:
        if kind == "kamailio":
            kam = Kamailio(
                REPO / "bench" / "kamailio" / "proxy.cfg",
                children=args.kamailio_children,
                shm_mb=1024,
                defines={"NEXT_HOP": f'"sip:{LOOPBACK}:{uas.port}"'},
                workdir=work / "kamailio",
            )
            kam.start()
            run = TargetRun("kamailio proxy.cfg", kam.command, uas_command=uas.command)
            print(f"\n## {run.name}\n$ {run.command}\n$ {uas.command}", flush=True)
            try:
                run.steps, run.uac_command = ramp(
                    "kamailio",
                    (LOOPBACK, kam.port),
                    kam.pid,
                    args,
                    users,
                    work,
                    lambda: kam.proc is not None and kam.proc.poll() is None,
                )
            finally:
                kam.stop()
        else:
            port = free_port()
            argv = [
                *registrar_argv(),
                "run",
                "--mode",
                "mirror",
                "--main-registrar",
                f"sip:{LOOPBACK}:{uas.port}",
                "--listen",
                f"udp:{LOOPBACK}:{port}",
                "--store",
                "memory",
                *args.midreg_arg,
            ]
            proc = Proc(argv, work / "midregistrar", "midregistrar")
            run = TargetRun("midregistrar mirror", shlex.join(argv), uas_command=uas.command)
            print(f"\n## {run.name}\n$ {run.command}\n$ {uas.command}", flush=True)
            try:
                wait_port(port, "udp", 20, proc)
                wait_sip_ready((LOOPBACK, port), 20, proc)
                run.steps, run.uac_command = ramp(
                    "midregistrar",
                    (LOOPBACK, port),
                    proc.pid,
                    args,
                    users,
                    work,
                    lambda: proc.poll() is None,
                )
            except (RuntimeError, WaitTimeout) as e:
                print(f"midregistrar did not start: {e}", flush=True)
            finally:
                proc.stop(10)
    finally:
        res = uas.stop()
        if res.failed:
            print(f"(main UAS counted {res.failed} failed calls)", flush=True)
    return run


# ------------------------------------------------------------------------------------------- output


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


STEP_HEADER = (
    "| target | offered/s | achieved/s | OK | failed | retrans | p50 ms | p99 ms | mean ms "
    "| probe p50 µs | probe p99 µs | CPU µs/REG | drops | target cores | other cores | pass | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def fmt_step(s: Step) -> str:
    return (
        f"| {s.target} | {s.rate} | {s.achieved:.0f} | {s.ok} | {s.failed} | {s.retrans} | {_f(s.p50_ms, 0)} "
        f"| {_f(s.p99_ms, 0)} | {_f(s.mean_ms, 2)} | {_f(s.probe_p50_us, 0)} | {_f(s.probe_p99_us, 0)} "
        f"| {_f(s.cpu_us_per_reg)} | {s.drops} | {s.target_cores:.2f} | {s.other_cores:.2f} "
        f"| {'yes' if s.passed else 'no'} | {s.note} |"
    )


def report(runs: list[TargetRun], args: argparse.Namespace, started: str) -> str:
    out = [f"# REGISTER relay benchmark, {started}", ""]
    out.append(
        f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}; loadavg at start "
        f"{args.loadavg}."
    )
    out.append(
        f"Load: SIPp load_register.xml, {args.users} users, {args.step:g} s per step, start "
        f"{args.start}/s x{args.factor:g}, probe {args.probe_rate:g}/s. Command: "
        f"`{' '.join(sys.argv)}`"
    )
    out += ["", "## Steps", "", STEP_HEADER, *[fmt_step(s) for r in runs for s in r.steps], ""]
    out += [
        "## Summary (highest rate with 0 failures)",
        "",
        "| target | max REGISTER/s | p50 ms | p99 ms | probe p50 µs | probe p99 µs | CPU µs/REG "
        "| other cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b = r.best
        if b is None:
            out.append(f"| {r.name} | none passed | | | | | | |")
        else:
            out.append(
                f"| {r.name} | {b.rate} | {_f(b.p50_ms, 0)} | {_f(b.p99_ms, 0)} | {_f(b.probe_p50_us, 0)} "
                f"| {_f(b.probe_p99_us, 0)} | {_f(b.cpu_us_per_reg)} | {b.other_cores:.2f} |"
            )
    by = {r.name.split()[0]: r.best for r in runs}
    k, m = by.get("kamailio"), by.get("midregistrar")
    if k and m:
        cpu_ratio = (
            f"{m.cpu_us_per_reg / k.cpu_us_per_reg:.2f}" if m.cpu_us_per_reg and k.cpu_us_per_reg else "-"
        )
        out += [
            "",
            f"Ratio midregistrar/kamailio: max rate {m.rate / k.rate:.2f}, CPU per REGISTER {cpu_ratio}.",
        ]
    if any(s.other_cores > 0.1 for r in runs for s in r.steps):
        out += [
            "",
            "WARNING: other processes used CPU during some steps (other cores > 0.1): "
            "those figures are not comparable.",
        ]
    out += ["", "## Commands", ""]
    for r in runs:
        out += [
            f"- {r.name}: `{r.command}`",
            f"  - main UAS: `{r.uas_command}`",
            f"  - load (last step): `{r.uac_command}`",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "what", choices=["all", "parse", "mirror", "kamailio", "midregistrar"], nargs="?", default="all"
    )
    ap.add_argument("--step", type=float, default=20.0, help="seconds per rate step (default 20)")
    ap.add_argument("--start", type=int, default=1000, help="first rate, REGISTER/s (default 1000)")
    ap.add_argument("--factor", type=float, default=1.5, help="rate multiplier between steps (default 1.5)")
    ap.add_argument("--max-rate", type=int, default=80000, help="never offer more than this (default 80000)")
    ap.add_argument("--no-bisect", dest="bisect", action="store_false", help="no bisecting step at the end")
    ap.add_argument("--rest", type=float, default=2.0, help="seconds between steps (default 2)")
    ap.add_argument("--users", type=int, default=10000, help="distinct users in the injection file")
    ap.add_argument("--probe-rate", type=float, default=100.0, help="probe REGISTERs/s (0: off)")
    ap.add_argument("--kamailio-children", type=int, default=2, help="Kamailio UDP workers (default 2)")
    ap.add_argument(
        "--midreg-arg", action="append", default=[], help="extra argument for `midregistrar run` (repeatable)"
    )
    ap.add_argument("--max-minutes", type=float, default=30.0, help="hard bound on a target's run")
    ap.add_argument(
        "--out", type=Path, default=None, help="markdown report (default bench/results/<time>.md)"
    )
    args = ap.parse_args(argv)

    if args.what == "parse":
        return run_parse()
    rc = run_parse() if args.what == "all" else 0
    if not ensure_sip_tools():
        print("sipp/kamailio missing: run `make sip-tools`", file=sys.stderr)
        return 1
    args.loadavg = Path("/proc/loadavg").read_text().split()[:3]
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    work = Path(tempfile.mkdtemp(prefix="midreg-bench-"))
    users = work / "users.csv"
    write_users(users, args.users)
    print(f"work dir: {work}; loadavg {' '.join(args.loadavg)}", flush=True)
    print(STEP_HEADER, flush=True)
    kinds = {
        "all": ["kamailio", "midregistrar"],
        "mirror": ["kamailio", "midregistrar"],
        "kamailio": ["kamailio"],
        "midregistrar": ["midregistrar"],
    }[args.what]
    runs = [bench_target(k, args, work, users) for k in kinds]
    text = report(runs, args, started)
    print("\n" + text)
    out = args.out or REPO / "bench" / "results" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{args.what}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"report written to {out}")
    with contextlib.suppress(Exception):
        if not any(r.best for r in runs):
            rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
