"""Absorbed-refresh latency to the microsecond beside a SIPp load (issue 3's p99 goal).

    python -m bench.latency_probe [--rate 4200] [--seconds 10] [--probe-rate 200]

SIPp reports response times in 4 ms buckets, too coarse for a 5 ms goal. This starts Kamailio as main and one
``midregistrar`` (mode contact, memory store), pre-registers 10,000 SIPp users and 200 probe users, then runs
the ``throttle_bench`` SIPp load at ``--rate`` while a probe thread refreshes its users (same Call-ID,
CSeq + 1: absorbed) at ``--probe-rate`` and times each 200 OK with ``perf_counter``; the figures are
nearest-rank percentiles (tests/support/stats.py). The probe is one more process on the same 2 cores, so its
figures include a little of its own scheduling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import throttle_bench as tb
from tests.support import REPO
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port
from tests.support.sip import LOOPBACK
from tests.support.stats import percentile


class AbsorbedProbe:
    """Users registered once, then refreshed with their own Call-ID: every refresh is absorbed."""

    def __init__(self, target: tuple[str, int], users: int) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.users = [f"probe{i:04d}" for i in range(users)]
        self.cseq = dict.fromkeys(self.users, 0)
        self.sent: dict[str, float] = {}
        self.rtts_us: list[float] = []
        self.codes: dict[int, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def message(self, user: str) -> bytes:
        self.cseq[user] += 1
        cseq = self.cseq[user]
        return (
            f"REGISTER sip:bench.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOOPBACK}:{self.port};rport;branch=z9hG4bK-{user}-{cseq}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@bench.test>;tag={user}\r\nTo: <sip:{user}@bench.test>\r\n"
            f"Call-ID: {user}@probe\r\nCSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{user}@{LOOPBACK}:{self.port}>;expires=300\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    def send(self, user: str) -> None:
        data = self.message(user)
        key = f"{user}-{self.cseq[user]}"
        with self.lock:
            self.sent[key] = time.perf_counter()
        self.sock.sendto(data, self.target)

    def receive(self) -> None:
        while not self.stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            now = time.perf_counter()
            code = int(data.split(b" ", 2)[1])
            if code < 200:
                continue
            branch = data.split(b"branch=z9hG4bK-", 1)[1].split(b"\r\n", 1)[0].split(b";", 1)[0].decode()
            with self.lock:
                t0 = self.sent.pop(branch, None)
            self.codes[code] = self.codes.get(code, 0) + 1
            if t0 is not None and code == 200:
                self.rtts_us.append((now - t0) * 1e6)

    def run(self, rate: float, seconds: float) -> None:
        interval = 1.0 / rate
        deadline = time.perf_counter() + seconds
        next_t = time.perf_counter()
        i = 0
        while time.perf_counter() < deadline:
            self.send(self.users[i % len(self.users)])
            i += 1
            next_t += interval
            time.sleep(max(0.0, next_t - time.perf_counter()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=4200, help="SIPp load, absorbed REGISTER/s")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the measured load")
    ap.add_argument("--probe-rate", type=float, default=200.0, help="probe refreshes per second")
    ap.add_argument("--users", type=int, default=10000, help="SIPp users")
    ap.add_argument(
        "--split",
        action="store_true",
        help="run the registrar through bench.instrumented_cli and report its in-process share",
    )
    ap.add_argument("--timer-resol", type=int, default=tb.SIPP_TIMER_RESOL, help="SIPp tick, ms")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="latency-probe-") as tmp:
        work = Path(tmp)
        timings = work / "timings.json"
        if args.split:
            os.environ["MIDREG_BENCH_TIMINGS"] = str(timings)
            # The registrar runs from its own work directory: the repository's root on its module path.
            os.environ["MIDREG_TEST_CLI"] = f"{sys.executable} -m bench.instrumented_cli"
            os.environ["PYTHONPATH"] = str(REPO)
        tb_args = argparse.Namespace(
            users=args.users, prereg_rate=1000, load_expires=300, cseq_base=int(time.time()) - 10,
            step=args.seconds, timer_resol=args.timer_resol,
        )  # fmt: skip
        users = work / "users.csv"
        users.write_text("SEQUENTIAL\n" + "".join(f"user{i:05d};x;bench.test\n" for i in range(args.users)))
        kam = Kamailio(REPO / "bench" / "kamailio" / "registrar.cfg", children=2, workdir=work / "kam")
        kam.start()
        reg = None
        try:
            reg = tb.throughput_registrar(kam.port, work / "mid").start(ready_timeout=20)
            tr = tb.TRun("mid")
            port = free_port()
            tb.preregister(tr, reg.addr, port, users, tb_args, work)
            probe = AbsorbedProbe(reg.addr, 200)
            receiver = threading.Thread(target=probe.receive, daemon=True)
            receiver.start()
            for user in probe.users:  # first registrations: relayed to Kamailio
                probe.send(user)
                time.sleep(0.005)
            time.sleep(1.0)
            probe.rtts_us.clear()
            loops = max(1, round(args.rate * args.seconds / args.users))
            sipp = tb.load_sipp(
                reg.addr, port, users, args.users, args.rate, loops, tb_args, work, "probe-load"
            )
            sipp.start()
            time.sleep(1.0)  # SIPp ramps up
            probe.run(args.probe_rate, args.seconds - 2.0)
            res = sipp.wait(args.seconds + 60)
            time.sleep(0.5)
            probe.stop.set()
            rtts = probe.rtts_us
            print(f"`{sys.executable} {' '.join(sys.argv)}`")
            print(f"SIPp: {res.successful} ok, {res.failed} failed; probe answers {probe.codes}")
            print(
                f"absorbed refresh latency beside {args.rate}/s: n={len(rtts)} "
                f"p50 {percentile(rtts, 50) / 1000:.2f} ms, p90 {percentile(rtts, 90) / 1000:.2f} ms, "
                f"p99 {percentile(rtts, 99) / 1000:.2f} ms, p99.9 {percentile(rtts, 99.9) / 1000:.2f} ms, "
                f"max {max(rtts) / 1000:.2f} ms, mean {statistics.fmean(rtts) / 1000:.2f} ms"
            )
        finally:
            if reg is not None:
                reg.stop()
            kam.stop()
        if args.split:
            print(in_process_report(json.loads(timings.read_text())))
    return 0


def in_process_report(t: dict[str, list]) -> str:
    """What the registrar itself added (bench.instrumented_cli): read → answer sent, timers, GC."""
    own = [x * 1e6 for x in t["in_process"]]
    timers = [x * 1e3 for x in t["timers"]]
    lines = [
        f"in-process (datagram read → its answer sent), {len(own)} datagrams: "
        f"p50 {percentile(own, 50) / 1000:.2f} ms, p90 {percentile(own, 90) / 1000:.2f} ms,"
        f" p99 {percentile(own, 99) / 1000:.2f} ms, max {max(own) / 1000:.2f} ms",
        f"timer runs: {len(timers)}, p99 {percentile(timers, 99):.2f} ms, max {max(timers):.2f} ms",
    ]
    for gen in (0, 1, 2):
        pauses = [d * 1e3 for g, d in t["collections"] if g == gen]
        if pauses:
            lines.append(f"gc generation {gen}: {len(pauses)} collections, max {max(pauses):.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
