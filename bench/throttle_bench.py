"""Throttling benchmarks (issue 3, item 8).

`python -m bench.throttle_bench absorption|throughput|all [options]`, from the repository's root:

- `absorption`: SIPp phones (tests/support/scenarios/thr_bench_phone.xml: AORS users × DEVICES devices,
  each refreshing every INTERVAL s with a lifetime of EXPIRES s, digest-authenticated by Kamailio when
  challenged) against `midregistrar run --mode contact` and `--mode aor` (run side by side, each with its own
  Kamailio main registrar from tests/support/main_registrar.cfg, digest auth on) for DURATION s.
  Counts the REGISTERs reaching Kamailio (its own counters, `kamcmd stats.get_statistics`) and compares them
  with the theory of behaviour §5.2 / §6.2: replaying the rules on the phones' schedule (relay the first
  REGISTER of each device; then, per contact in mode contact / per AoR in mode aor, relay the first refresh at
  or after LRTs + (outgoing − e)), and the steady-state rate (one relay per contact, or per AoR, every
  outgoing − e s).
  Kamailio's raw count includes its 401 challenges: every relayed REGISTER costs two (challenge, retry);
  the comparison is on the accepted ones (reg_saved).
- `throughput`: 10,000 distinct users (injection file), pre-registered, then a rate-stepping refresh load
  (tests/support/scenarios/thr_load_register.xml: one Call-ID per user, growing CSeq, same Contact and
  source) against Kamailio as a plain in-memory registrar (bench/kamailio/registrar.cfg, no auth, 2 children)
  and against ONE `midregistrar run --mode contact --store memory` process (main registrar: that Kamailio),
  where every refresh is absorbed (each user's first refresh, sent once at the pre-registration rate
  before the steps, goes through the full pipeline, which keeps the template the later ones are answered
  from). A step passes with 0 failed calls, 0 retransmissions, 0 unexpected
  messages, every REGISTER answered, ≥ 95 % of the offered rate and, for the mid-registrar, 0 REGISTERs
  relayed. Rates grow by FACTOR until a step fails, then BISECT bisection steps between the last passing and
  the first failing rate; then HALF_RUNS runs at half the best rate give the p99 there (median quoted).
  Latency: SIPp response times (-trace_rtt, ms resolution), p50 and p99 as nearest-rank percentiles
  (tests/support/stats.py). CPU per REGISTER: utime+stime of the target (and
  its children) from /proc/<pid>/stat over the step. CPU wait: time the target and SIPp spent runnable but
  waiting for a core (/proc/<pid>/schedstat), in ms per second of the step: other work on the machine.

The SIPp load is closed-loop per user (a user's next REGISTER leaves `d` ms after the answer to the previous
one): the offered rate is users × 1000 / d. Only 127.0.0.1 is used; every loop is bounded (SIPp -m, -timeout,
a maximum rate). Prints markdown tables with the exact commands and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO
from tests.support.kamailio import Kamailio, KamailioMain
from tests.support.ports import free_port
from tests.support.process import process_tree, tree_cpu_seconds
from tests.support.registrar import Registrar, metric
from tests.support.sip import LOOPBACK
from tests.support.sipp import SCENARIOS, Sipp, ensure_sip_tools
from tests.support.stats import percentile

BUFF = 4194304
SIPP_TIMER_RESOL = 10  # ms: SIPp's own default tick for its pause timers
PASSWORD = "s3cret"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_delay(pids: list[int]) -> float:
    """Seconds these processes spent runnable but waiting for a CPU (/proc/<pid>/schedstat, 2nd field): how
    much other work on the machine held the target or SIPp back during a step."""
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


# ------------------------------------------------------------------------------------------- absorption


def theory(mode: str, starts: list[tuple[int, float]], period: float, window: float, e: int, out: int) -> int:
    """Relays accepted by main for devices (aor index, first REGISTER time) refreshing every `period` s, up
    to `window` s, by the rules (mode contact, behaviour §5.2: per contact, relay when now − LRTs ≥ out − e;
    mode aor, behaviour §6.2: per AoR, relay when now ≥ LRTs + max(expO − exp) = LRTs + out − e; a new
    device's first REGISTER is relayed in both modes — behaviour §11 [REC], issue 3 item 5)."""
    threshold = out - e
    events: list[tuple[float, int, int]] = []  # (time, aor, device)
    for dev, (aor, t0) in enumerate(starts):
        t = t0
        while t <= window:
            events.append((t, aor, dev))
            t += period
    events.sort()
    lrt: dict[int, float] = {}
    seen: set[int] = set()
    relays = 0
    for t, aor, dev in events:
        key = dev if mode == "contact" else aor
        if dev not in seen:
            seen.add(dev)
            relays += 1
            lrt[key] = t
        elif t - lrt[key] >= threshold:
            relays += 1
            lrt[key] = t
    return relays


@dataclass
class AbsorptionRun:
    mode: str
    reg_cmd: str = ""
    kam_cmd: str = ""
    sipp_cmd: str = ""
    devices: int = 0
    aors: int = 0
    seconds: float = 0.0
    kam_total: int = 0
    kam_saved: int = 0
    kam_challenged: int = 0
    saved_initial: int = 0
    theory_total: int = 0
    theory_initial: int = 0
    relayed: float = 0.0
    absorbed: float = 0.0
    phone_failed: int = 0
    steady_theory_rate: float = 0.0
    error: str = ""


def absorption_one(mode: str, args: argparse.Namespace, work: Path, out: AbsorptionRun) -> None:
    mid_port = free_port()
    kam = KamailioMain(work / f"kam-{mode}", mid_port=mid_port, password=PASSWORD, quiet=True)
    reg = Registrar(
        kam.addr,
        mode=mode,
        port=mid_port,
        transports=("udp",),
        extra=["--outgoing-expires", str(args.outgoing), "--log-level", "warning"],
        workdir=work / f"mid-{mode}",
    )
    users = work / f"phones-{mode}.csv"
    n_dev = args.aors * args.devices
    with users.open("w") as f:
        f.write("SEQUENTIAL\n")
        for d in range(args.devices):  # all first devices, then all second devices, ...
            for a in range(args.aors):
                f.write(f"ph{a:05d};{PASSWORD};bench.test;d{d}\n")
    out.devices, out.aors = n_dev, args.aors
    out.kam_cmd = kam.command
    phones: Sipp | None = None
    try:
        kam.start()
        reg.start(ready_timeout=20)
        out.reg_cmd = reg.command
        phones = Sipp(
            "thr_bench_phone",
            reg.addr,
            keys={"expires": args.expires},
            calls=n_dev,
            rate=args.start_rate,
            limit=n_dev + 10,
            timeout_s=args.duration + 120,
            inf=users,
            trace_msg=False,
            trace_logs=False,
            buff_size=BUFF,
            extra=["-d", str(int(args.interval * 1000)), "-recv_timeout", "10000"],
            workdir=work / f"phones-{mode}",
            name=f"phones-{mode}",
        )
        out.sipp_cmd = phones.command
        t0 = time.monotonic()
        phones.start()
        ramp = n_dev / args.start_rate
        time.sleep(ramp + 3.0)
        out.saved_initial = kam.counter("reg_saved")
        time.sleep(max(0.0, args.duration - (time.monotonic() - t0)))
        out.seconds = time.monotonic() - t0
        c = kam.counters()
        m = reg.metrics()
        out.kam_total, out.kam_saved, out.kam_challenged = c["reg_total"], c["reg_saved"], c["reg_challenged"]
        out.relayed = metric(m, "midregistrar_registers", outcome="relayed")
        out.absorbed = metric(m, "midregistrar_registers", outcome="absorbed")
        res = phones.stop()
        out.phone_failed = res.failed
        # Device i (0-based, file order) starts at i / rate; refreshes every interval (+ ~1 ms response).
        starts = [(i % args.aors, i / args.start_rate) for i in range(n_dev)]
        period = args.interval + 0.001
        out.theory_total = theory(mode, starts, period, out.seconds, args.expires, args.outgoing)
        out.theory_initial = theory(mode, starts, period, ramp + 3.0, args.expires, args.outgoing)
        per = n_dev if mode == "contact" else args.aors
        out.steady_theory_rate = per / (args.outgoing - args.expires)
    except Exception as exc:  # reported in the table
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        if phones is not None and phones.proc is not None and phones.proc.poll() is None:
            phones.stop()
        reg.stop()
        kam.stop()


def run_absorption(args: argparse.Namespace, work: Path) -> str:
    la0 = loadavg()
    runs = [AbsorptionRun("contact"), AbsorptionRun("aor")]
    threads = [
        threading.Thread(target=absorption_one, args=(r.mode, args, work, r), daemon=True) for r in runs
    ]
    print(
        f"absorption: {args.aors} AoRs × {args.devices} devices per mode, expires {args.expires} s, refresh "
        f"every {args.interval} s, outgoing {args.outgoing} s, {args.duration} s (both modes side by side)",
        flush=True,
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + 300)
    la1 = loadavg()
    lines = [
        "### Absorption (REGISTERs reaching Kamailio vs behaviour §5.2/§6.2 theory)",
        "",
        f"`{sys.executable} {' '.join(sys.argv)}` — load average before {la0}, after {la1}",
        "",
        "| mode | devices (AoRs) | s | Kamailio REGISTERs (raw, incl. 401) | accepted by Kamailio | "
        "theory (replay of the rules) | deviation | of which initial (accepted / theory) | "
        "steady-state theory | mid relayed / absorbed | phone failures | absorbed share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r.error:
            lines.append(f"| {r.mode} | error: {r.error} |")
            continue
        dev = (r.kam_saved - r.theory_total) / r.theory_total * 100 if r.theory_total else float("nan")
        total_regs = r.relayed + r.absorbed
        share = r.absorbed / total_regs * 100 if total_regs else 0.0
        lines.append(
            f"| {r.mode} | {r.devices} ({r.aors}) | {r.seconds:.0f} | {r.kam_total} | {r.kam_saved} | "
            f"{r.theory_total} | {dev:+.1f} % | {r.saved_initial} / {r.theory_initial} | "
            f"{r.steady_theory_rate:.3f}/s | "
            f"{r.relayed:.0f} / {r.absorbed:.0f} | {r.phone_failed} | {share:.2f} % |"
        )
    lines += ["", "Commands:", ""]
    for r in runs:
        lines += [f"- {r.mode} Kamailio: `{r.kam_cmd}`", f"- {r.mode} mid: `{r.reg_cmd}`"]
        lines += [f"- {r.mode} phones: `{r.sipp_cmd}`"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- throughput


@dataclass
class TStep:
    target: str
    rate: int
    seconds: float
    regs: int
    failed: int
    retrans: int
    unexpected: int
    achieved: float
    p50: float | None
    p99: float | None
    cpu_us: float | None
    relayed: float
    passed: bool
    load: str
    note: str = ""
    wait_target: float | None = None  # ms per second the target waited for a CPU (runqueue), over the step
    wait_sipp: float | None = None  # the same for the SIPp load generator


@dataclass
class TRun:
    name: str
    command: str = ""
    sipp_command: str = ""
    steps: list[TStep] = field(default_factory=list)
    half: list[TStep] = field(default_factory=list)

    @property
    def best(self) -> TStep | None:
        ok = [s for s in self.steps if s.passed]
        return max(ok, key=lambda s: s.rate) if ok else None


def load_scenario(work: Path, loops: int) -> Path:
    text = (SCENARIOS / "thr_load_register.xml").read_text().replace('value="LOOPS"', f'value="{loops}"')
    p = work / f"thr_load_register_{loops}.xml"
    p.write_text(text)
    return p


def throughput_registrar(main_port: int, workdir: Path, extra: tuple[str, ...] = ()) -> Registrar:
    """The one registrar process every throughput figure is taken on: mode contact, one UDP socket, a
    lifetime at main far above the users' so that every refresh is absorbed (memory store unless ``extra``
    says otherwise)."""
    return Registrar(
        (LOOPBACK, main_port),
        mode="contact",
        transports=("udp",),
        extra=["--outgoing-expires", "3600", "--log-level", "warning", *extra],
        workdir=workdir,
    )


def load_sipp(
    target: tuple[str, int],
    port: int,
    users: Path,
    n: int,
    rate: float,
    loops: int,
    args: argparse.Namespace,
    work: Path,
    name: str,
) -> Sipp:
    d_ms = max(1, round(n * 1000.0 / rate))
    seconds = loops * d_ms / 1000.0
    return Sipp(
        load_scenario(work, loops),
        target,
        port=port,
        keys={"expires": args.load_expires, "cseq_base": args.cseq_base},
        calls=n,
        rate=rate,
        limit=n + 100,
        timeout_s=seconds + 60,
        inf=users,
        trace_msg=False,
        trace_logs=False,
        trace_stat=True,
        trace_rtt=True,
        rtt_freq=100,
        buff_size=BUFF,
        extra=[
            "-d",
            str(d_ms),
            "-cid_str",
            "%u-thr@bench",
            "-recv_timeout",
            "5000",
            "-max_recv_loops",
            "10000",
            "-skip_rlimit",
            "-timer_resol",
            str(getattr(args, "timer_resol", SIPP_TIMER_RESOL)),  # callers' own Namespaces may lack it
        ],
        workdir=work / name,
        name=name,
    )


def t_step(
    tr: TRun,
    target: tuple[str, int],
    pid: int,
    port: int,
    users: Path,
    rate: int,
    args: argparse.Namespace,
    work: Path,
    reg: Registrar | None,
    tag: str,
) -> TStep:
    n = args.users
    loops = max(1, round(rate * args.step / n))
    s = load_sipp(target, port, users, n, rate, loops, args, work, f"{tr.name}-{tag}-{rate}")
    tr.sipp_command = s.command
    m0 = reg.metrics() if reg else {}
    cpu0 = tree_cpu_seconds(pid)
    targets = process_tree(pid)
    wait0 = run_delay(targets)
    t0 = time.monotonic()
    s.start()
    sipp_pid = s.proc.pid if s.proc is not None else None
    sipp_wait0 = run_delay([sipp_pid]) if sipp_pid else 0.0
    sipp_wait1 = sipp_wait0
    deadline = time.monotonic() + loops * n / rate + 90
    while sipp_pid and s.proc is not None and s.proc.poll() is None and time.monotonic() < deadline:
        sipp_wait1 = run_delay([sipp_pid]) or sipp_wait1  # read while SIPp lives: /proc goes with it
        time.sleep(0.2)
    res = s.wait(max(1.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    cpu = tree_cpu_seconds(pid) - cpu0
    wait_target = (run_delay(targets) - wait0) / elapsed * 1e3
    wait_sipp = (sipp_wait1 - sipp_wait0) / elapsed * 1e3 if sipp_pid else None
    relayed = 0.0
    if reg:
        m1 = reg.metrics()
        relayed = metric(m1, "midregistrar_registers", outcome="relayed") - metric(
            m0, "midregistrar_registers", outcome="relayed"
        )
    rows = res.rtt_rows()
    rtts = [r[1] for r in rows]
    # Achieved rate over the middle of the run (all users looping), from the response timestamps.
    if len(rows) > 10:
        span = (rows[-1][0] - rows[0][0]) / 1000.0
        achieved = len(rows) / span if span > 0 else 0.0
    else:
        achieved = 0.0
    expected = n * loops
    failed = res.failed
    retrans = res.retransmissions
    unexpected = res.counter("FailedUnexpectedMessage(C)")
    ok_calls = res.successful
    regs = ok_calls * loops if ok_calls == n else len(rows)
    passed = (
        failed == 0
        and retrans == 0
        and unexpected == 0
        and ok_calls == n
        and achieved >= 0.95 * rate
        and relayed == 0
    )
    notes = []
    if failed:
        notes.append(f"{failed} failed")
    if retrans:
        notes.append(f"{retrans} retrans")
    if ok_calls != n:
        notes.append(f"{n - ok_calls} users incomplete")
    if achieved < 0.95 * rate:
        notes.append("rate not reached")
    if relayed:
        notes.append(f"{relayed:.0f} relayed")
    # The last partial -trace_rtt batch (< rtt_freq) is not written: ≤ 100 samples missing is normal.
    if ok_calls == n and expected - len(rows) > 100:
        notes.append(f"{expected - len(rows)} rtt samples missing")
    step = TStep(
        target=tr.name,
        rate=rate,
        seconds=round(elapsed, 1),
        regs=regs,
        failed=failed,
        retrans=retrans,
        unexpected=unexpected,
        achieved=achieved,
        p50=percentile(rtts, 50) if rtts else None,
        p99=percentile(rtts, 99) if rtts else None,
        cpu_us=cpu / regs * 1e6 if regs else None,
        relayed=relayed,
        passed=passed,
        load=loadavg(),
        note=", ".join(notes),
        wait_target=wait_target,
        wait_sipp=wait_sipp,
    )
    print(fmt_tstep(step), flush=True)
    time.sleep(args.rest)
    if not passed:  # let an overloaded target finish its backlog (CPU < 5 % over 1 s, at most 30 s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            c0 = tree_cpu_seconds(pid)
            time.sleep(1.0)
            if tree_cpu_seconds(pid) - c0 < 0.05:
                break
    return step


HEADER = (
    "| target | rate/s | s | REGISTERs | achieved/s | failed/retrans/unexp | p50 ms | p99 ms | CPU µs/REG | "
    "relayed | result | load avg | CPU wait ms/s target, SIPp | note |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fmt_tstep(s: TStep) -> str:
    return (
        f"| {s.target} | {s.rate} | {s.seconds} | {s.regs} | {s.achieved:.0f} | {s.failed}/{s.retrans}/"
        f"{s.unexpected} | {fmt(s.p50)} | {fmt(s.p99)} | {fmt(s.cpu_us)} | {s.relayed:.0f} | "
        f"{'pass' if s.passed else 'FAIL'} | {s.load} | {fmt(s.wait_target, 0)}, {fmt(s.wait_sipp, 0)} | "
        f"{s.note} |"
    )


def ramp(tr: TRun, target, pid, port, users, args, work, reg, start: int) -> None:
    rate = float(start)
    last_pass = first_fail = None
    while rate <= args.max_rate:
        r = int(round(rate / 100.0) * 100)
        st = t_step(tr, target, pid, port, users, r, args, work, reg, "step")
        tr.steps.append(st)
        if st.passed:
            last_pass = r
            rate *= args.factor
        else:
            first_fail = r
            break
    for i in range(args.bisect):  # narrow the bracket [last pass, first fail] by halving it
        if not (last_pass and first_fail):
            break
        mid = int(round((last_pass + first_fail) / 2 / 100.0) * 100)
        if not last_pass < mid < first_fail:
            break
        st = t_step(tr, target, pid, port, users, mid, args, work, reg, f"bisect{i}")
        tr.steps.append(st)
        if st.passed:
            last_pass = mid
        else:
            first_fail = mid
    best = tr.best
    if best:
        half = int(round(best.rate / 2 / 100.0) * 100)
        for i in range(args.half_runs):
            tr.half.append(t_step(tr, target, pid, port, users, half, args, work, reg, f"half{i}"))


def preregister(tr: TRun, target, port, users, args, work, what: str = "pre-registration") -> None:
    """One REGISTER per user at ``--prereg-rate``, before the measured steps."""
    tag = "prereg" if what == "pre-registration" else "warm"
    s = load_sipp(target, port, users, args.users, args.prereg_rate, 1, args, work, f"{tr.name}-{tag}")
    s.start()
    res = s.wait(args.users / args.prereg_rate + 90)
    print(f"{what} of {args.users} users on {tr.name}: {res.successful} ok, {res.failed} failed", flush=True)
    if res.successful != args.users:
        raise RuntimeError(f"{what} failed on {tr.name}: {res.describe()[-2000:]}")


def run_throughput(args: argparse.Namespace, work: Path) -> str:
    la0 = loadavg()
    users = work / "users.csv"
    with users.open("w") as f:
        f.write("SEQUENTIAL\n")
        for i in range(args.users):
            f.write(f"user{i:05d};x;bench.test\n")
    args.cseq_base = int(time.time()) - 10
    print(HEADER, flush=True)
    print(RULE, flush=True)
    kam = Kamailio(REPO / "bench" / "kamailio" / "registrar.cfg", children=2, workdir=work / "kam")
    kam_run = TRun("kamailio", command=kam.command)
    mid_run = TRun("midregistrar")
    reg: Registrar | None = None
    try:
        kam.start()
        if "kamailio" in args.targets:
            port = free_port()
            preregister(kam_run, (LOOPBACK, kam.port), port, users, args, work)
            ramp(kam_run, (LOOPBACK, kam.port), kam.pid, port, users, args, work, None, args.start)
        if "mid" in args.targets:
            reg = throughput_registrar(kam.port, work / "mid").start(ready_timeout=20)
            mid_run.command = reg.command
            port = free_port()
            preregister(mid_run, reg.addr, port, users, args, work)
            # Each user's first refresh goes through the full pipeline, which keeps its template; the measured
            # steps are the steady state that follows, as in the field (a phone refreshes every minute or so).
            preregister(mid_run, reg.addr, port, users, args, work, "first refresh")
            ramp(mid_run, reg.addr, reg.pid, port, users, args, work, reg, args.mid_start)
    finally:
        if reg is not None:
            reg.stop()
        kam.stop()
    la1 = loadavg()
    lines = [
        "### Throughput: absorbed refreshes (mid-registrar, mode contact, memory store) vs Kamailio",
        "",
        f"`{sys.executable} {' '.join(sys.argv)}` — {args.users} users, {args.step} s steps, load average "
        f"before {la0}, after {la1}; {os.cpu_count()} cores, {platform.platform()}",
        "",
        HEADER,
        RULE,
    ]
    for tr in (kam_run, mid_run):
        lines += [fmt_tstep(s) for s in tr.steps + tr.half]
    lines += [
        "",
        "| target | max sustained rate/s (0 failures) | p50 / p99 ms at max | CPU µs/REG at max | "
        "half rate | p99 ms at half (median of runs) | p50 ms at half |",
        "|---|---|---|---|---|---|---|",
    ]
    for tr in (kam_run, mid_run):
        b = tr.best
        if b is None:
            lines.append(f"| {tr.name} | no passing step | | | | | |")
            continue
        p99s = [s.p99 for s in tr.half if s.p99 is not None]
        p50s = [s.p50 for s in tr.half if s.p50 is not None]
        lines.append(
            f"| {tr.name} | {b.rate} | {fmt(b.p50)} / {fmt(b.p99)} | {fmt(b.cpu_us)} | "
            f"{tr.half[0].rate if tr.half else '–'} | {fmt(statistics.median(p99s)) if p99s else '–'} "
            f"({', '.join(fmt(p) for p in p99s)}) | {fmt(statistics.median(p50s)) if p50s else '–'} |"
        )
    kb, mb = kam_run.best, mid_run.best
    if kb and mb:
        lines += ["", f"Ratio mid-registrar / Kamailio (max sustained rate): **{mb.rate / kb.rate:.2f}×**"]
    lines += [
        "",
        "Commands:",
        "",
        f"- Kamailio: `{kam_run.command}`",
        f"- mid-registrar: `{mid_run.command}`",
        f"- SIPp (last step, Kamailio): `{kam_run.sipp_command}`",
        f"- SIPp (last step, mid-registrar): `{mid_run.sipp_command}`",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["absorption", "throughput", "all"])
    ap.add_argument("--duration", type=float, default=180.0, help="absorption: seconds of phone traffic")
    ap.add_argument("--aors", type=int, default=100, help="absorption: users (AoRs) per mode")
    ap.add_argument("--devices", type=int, default=2, help="absorption: devices per AoR")
    ap.add_argument("--interval", type=float, default=5.0, help="absorption: phone refresh interval, s")
    ap.add_argument("--expires", type=int, default=10, help="lifetime asked by the phones, s")
    ap.add_argument("--outgoing", type=int, default=600, help="absorption: --outgoing-expires")
    ap.add_argument("--start-rate", type=float, default=20.0, help="absorption: phones started per second")
    ap.add_argument("--load-expires", type=int, default=300, help="throughput: lifetime asked by the users")
    ap.add_argument("--users", type=int, default=10000, help="throughput: distinct users")
    ap.add_argument("--step", type=float, default=10.0, help="throughput: seconds per rate step")
    ap.add_argument("--start", type=int, default=2000, help="throughput: first rate, REGISTER/s")
    ap.add_argument("--prereg-rate", type=int, default=500, help="throughput: pre-registration rate")
    ap.add_argument("--mid-start", type=int, default=500, help="throughput: first rate for the mid-registrar")
    ap.add_argument("--factor", type=float, default=1.5, help="throughput: rate growth per step")
    ap.add_argument("--max-rate", type=int, default=80000, help="throughput: highest rate tried")
    ap.add_argument("--half-runs", type=int, default=3, help="throughput: runs at half the max rate")
    ap.add_argument(
        "--bisect", type=int, default=2, help="throughput: bisection steps after the first failing rate"
    )
    ap.add_argument("--rest", type=float, default=2.0, help="throughput: pause between steps, s")
    ap.add_argument("--targets", default="kamailio,mid", help="throughput: kamailio,mid")
    ap.add_argument(
        "--timer-resol", type=int, default=SIPP_TIMER_RESOL, help="throughput: SIPp's pause timer tick, ms"
    )
    args = ap.parse_args(argv)
    if not ensure_sip_tools():
        print("sipp/kamailio unavailable: run `make sip-tools`")
        return 1
    work = Path(tempfile.mkdtemp(prefix="thr-bench-"))
    out = []
    if args.what in ("absorption", "all"):
        out.append(run_absorption(args, work))
        print(out[-1], flush=True)
    if args.what in ("throughput", "all"):
        out.append(run_throughput(args, work))
        print(out[-1], flush=True)
    print(f"\nwork dir: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
