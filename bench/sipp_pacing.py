"""How SIPp's load arrives, and what latency it leaves a server of a given service time (issue 3's p99 goal).

    python -m bench.sipp_pacing [--rate 4200] [--seconds 12] [--costs 0,60,113]

For each COST (µs), a stand-in server (this script with ``--serve``: one UDP socket, one thread, nothing but a
busy loop of COST µs per REGISTER, then a 200 OK echoing Via/From/To/Call-ID/CSeq) takes the throughput
bench's SIPp load (10,000 users, ``throttle_bench.load_sipp``) while the latency probe of
``bench.latency_probe`` refreshes beside it. The stand-in records each datagram's kernel arrival time
(SO_TIMESTAMPNS), so the table gives both how bursty the load is (REGISTERs per 1 ms and 10 ms window against
the mean) and the latency the probe sees from a server whose only cost is its service time. With COST near
the mid-registrar's CPU per REGISTER, the probe's p99 is what any single-threaded server of that speed gets
under this load: the part of the registrar's latency that comes from the load's shape, not from its code.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import latency_probe as lp
from bench import throttle_bench as tb
from tests.support import REPO
from tests.support.ports import free_port
from tests.support.sip import LOOPBACK
from tests.support.stats import percentile

SO_TIMESTAMPNS = 35  # Linux
ECHOED = (b"via:", b"from", b"to: ", b"call", b"cseq")


def serve(port: int, cost_us: float, out: Path) -> None:
    """The stand-in server: answer every REGISTER after COST µs of CPU, record kernel arrival times."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tb.BUFF)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((LOOPBACK, port))
    arrivals: list[float] = []
    cost = cost_us / 1e6
    clock = time.perf_counter

    def stop(*_: Any) -> None:
        out.write_text(json.dumps({"arrivals": arrivals, "cpu": time.process_time()}))
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        data, ancillary, _flags, addr = sock.recvmsg(65535, 64)
        for _level, kind, value in ancillary:
            if kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                arrivals.append(sec + nsec * 1e-9)
        until = clock() + cost
        while clock() < until:
            pass
        lines = [ln for ln in data.split(b"\r\n") if ln[:4].lower() in ECHOED]
        lines = [ln + b";tag=standin" if ln[:3].lower() == b"to:" else ln for ln in lines]
        sock.sendto(b"SIP/2.0 200 OK\r\n" + b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n", addr)


def windows(arrivals: list[float], width: float) -> tuple[float, int, int]:
    """Mean, p99 and max of the REGISTERs that arrived in each window of ``width`` s."""
    counts = collections.Counter(int(t / width) for t in arrivals)
    first, last = int(arrivals[0] / width), int(arrivals[-1] / width)
    ordered = sorted(counts.get(i, 0) for i in range(first, last))
    return sum(ordered) / len(ordered), int(percentile(ordered, 99)), ordered[-1]


def one(cost: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port()
    out = work / f"standin-{cost}.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.sipp_pacing", "--serve", str(port), str(cost), str(out)], cwd=REPO
    )
    try:
        time.sleep(0.5)
        target = (LOOPBACK, port)
        users = work / "users.csv"
        users.write_text("SEQUENTIAL\n" + "".join(f"user{i:05d};x;bench.test\n" for i in range(args.users)))
        tb_args = argparse.Namespace(
            load_expires=300, cseq_base=int(time.time()) - 10, timer_resol=args.timer_resol
        )
        loops = max(1, round(args.rate * args.seconds / args.users))
        sipp = tb.load_sipp(
            target, free_port(), users, args.users, args.rate, loops, tb_args, work, f"load-{cost}"
        )
        probe = lp.AbsorbedProbe(target, 200)
        receiver = threading.Thread(target=probe.receive, daemon=True)
        receiver.start()
        sipp.start()
        time.sleep(2.0)  # past SIPp's start-up
        probe.run(args.probe_rate, args.seconds - 4.0)
        result = sipp.wait(args.seconds + 60)
        time.sleep(0.3)
        probe.stop.set()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    data = json.loads(out.read_text())
    arrivals = data["arrivals"]
    start = arrivals[0]
    steady = [t - start for t in arrivals if start + 3.0 < t < arrivals[-1] - 1.0]
    rtts = probe.rtts_us
    return {
        "cost": cost,
        "sipp": f"{result.successful} ok, {result.failed} failed",
        "cpu_us": data["cpu"] / len(arrivals) * 1e6,
        "w1": windows(steady, 0.001),
        "w10": windows(steady, 0.010),
        "p50": percentile(rtts, 50) / 1000,
        "p90": percentile(rtts, 90) / 1000,
        "p99": percentile(rtts, 99) / 1000,
        "n": len(rtts),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=4200, help="SIPp load, REGISTER/s")
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each load")
    ap.add_argument("--costs", default="0,60,113", help="stand-in service times to try, µs")
    ap.add_argument("--users", type=int, default=10000, help="SIPp users")
    ap.add_argument("--probe-rate", type=float, default=200.0, help="probe refreshes per second")
    ap.add_argument("--timer-resol", type=int, default=tb.SIPP_TIMER_RESOL, help="SIPp tick, ms")
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "COST_US", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), float(args.serve[1]), Path(args.serve[2]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="sipp-pacing-") as tmp:
        for cost in (float(c) for c in args.costs.split(",")):
            rows.append(one(cost, args, Path(tmp)))
    print(f"`{sys.executable} {' '.join(sys.argv)}` (load average {tb.loadavg()})")
    print()
    print(
        "| stand-in busy loop | its CPU per REGISTER | REGISTERs per 1 ms: mean / p99 / max "
        "| per 10 ms: mean / p99 / max | probe p50 | p90 | p99 | SIPp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        w1, w10 = r["w1"], r["w10"]
        print(
            f"| {r['cost']:.0f} µs | {r['cpu_us']:.0f} µs | {w1[0]:.1f} / {w1[1]} / {w1[2]} "
            f"| {w10[0]:.1f} / {w10[1]} / {w10[2]} | {r['p50']:.2f} ms | {r['p90']:.2f} ms "
            f"| **{r['p99']:.2f} ms** | {r['sipp']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
