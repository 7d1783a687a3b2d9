"""Memory per registered contact (issue 3 goal: ≤ 1 KB per contact with 100,000 contacts).

Run: ``python -m bench.memory_bench [--contacts 100000] [--mode contact]`` from the repository's root.
Registers N distinct phones (one contact each) through the real sans-IO pipeline — the stack, the mode's core
and the in-memory store, with the main registrar's 200 OK fed back — lets the transactions end, and reports
the growth of the process's resident set size (RSS from /proc) divided by N, with the store's own count as a
check.

It also reports the cyclic GC's collections during the run (pauses by generation, from ``gc.callbacks``), how
many objects they found to free, and how long one full collection takes with the N contacts held.
``--gc-tuned`` first applies the process's own tuning (``registrar.app.tune_gc``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import random
import statistics
import time
from typing import Any

from registrar.config import Settings
from registrar.core.service import MidRegistrar
from registrar.sip.stack import LocalAddress, Stack
from registrar.sip.transport import Peer
from registrar.store.memory import MemoryStore

TEMPLATE = (
    "REGISTER sip:example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 10.{a}.{b}.{c}:5060;rport;branch=z9hG4bK-{i}\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:user{i}@example.com>;tag=f{i}\r\n"
    "To: <sip:user{i}@example.com>\r\n"
    "Call-ID: reg-{i}@10.{a}.{b}.{c}\r\n"
    "CSeq: 1 REGISTER\r\n"
    'Contact: <sip:user{i}@10.{a}.{b}.{c}:5060;transport=udp>;+sip.instance="<urn:uuid:{i:08d}-0000>"\r\n'
    "Expires: 3600\r\n"
    "User-Agent: Phone/1.0\r\n"
    "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE\r\n"
    "Content-Length: 0\r\n\r\n"
)


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class GcPauses:
    """Collections the interpreter runs on its own, timed through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.collected = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._start)
            self.collected += info["collected"]

    def report(self) -> str:
        lines = []
        for generation, pauses in self.pauses.items():
            if pauses:
                median, worst = statistics.median(pauses) * 1e3, max(pauses) * 1e3
                lines.append(
                    f"gen{generation}: {len(pauses):,} collections, median {median:.1f} ms,"
                    f" max {worst:.1f} ms, total {sum(pauses):.2f} s"
                )
        lines.append(f"objects they freed: {self.collected:,}")
        return "\n".join(lines)


def full_collection_ms() -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ok_for(relayed: bytes) -> bytes:
    head = relayed.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = [
        h for h in head[1:] if h.split(b":", 1)[0].lower() in (b"via", b"from", b"to", b"call-id", b"cseq")
    ]
    contact = next(h for h in head if h.lower().startswith(b"contact:")).split(b";expires=")[0]
    return (
        b"\r\n".join([b"SIP/2.0 200 OK", *keep, contact + b";expires=3600", b"Content-Length: 0"])
        + b"\r\n\r\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contacts", type=int, default=100_000)
    ap.add_argument("--mode", default="contact", choices=["mirror", "contact", "aor"])
    ap.add_argument("--gc-tuned", action="store_true", help="apply registrar.app.tune_gc() first")
    args = ap.parse_args()
    settings = Settings(main_registrar="sip:10.0.0.3:5070", listen=["udp:10.0.0.2:5060"], mode=args.mode)
    counter = itertools.count()
    stack = Stack([LocalAddress("udp", "10.0.0.2", 5060)], unique=lambda: str(next(counter)))
    store = MemoryStore(random.Random(1))
    core = MidRegistrar(settings, stack, store, random.Random(2))
    main_peer = Peer("udp", "10.0.0.3", 5070)
    gc.collect()
    if args.gc_tuned:
        from registrar.app import tune_gc

        tune_gc()
    before = rss_bytes()
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    started = time.perf_counter()
    now = 0.0
    for i in range(args.contacts):
        a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
        data = TEMPLATE.format(i=i, a=a, b=b, c=c).encode()
        phone = Peer("udp", f"10.{a}.{b}.{c}", 5060)
        stack.receive(data, phone, now)
        for event in stack.pop_events():
            core.handle(event, now)
        out = stack.pop_outgoing()
        stack.receive(ok_for(out[0][0]), main_peer, now)
        for event in stack.pop_events():
            core.handle(event, now)
        stack.pop_outgoing()
        if i % 1000 == 999:
            now += 0.001
            stack.handle_timers(now + 40)  # let transactions end as they would in real time
    stack.handle_timers(now + 40)
    elapsed = time.perf_counter() - started
    gc.callbacks.remove(pauses)
    gc.collect()
    after = rss_bytes()
    aors, bindings = store.counts()
    per = (after - before) / max(bindings, 1)
    left = stack.active_transactions
    print(f"mode {args.mode}: {bindings:,} contacts in {aors:,} AoRs; transactions left {left}")
    print(f"RSS {before / 2**20:.1f} MiB → {after / 2**20:.1f} MiB: {per:,.0f} bytes per contact")
    print(f"{elapsed:.1f} s; GC{' (tuned)' if args.gc_tuned else ''} {gc.get_threshold()}:")
    print(pauses.report())
    tracked = len(gc.get_objects())
    print(f"one full collection now: {full_collection_ms():.1f} ms ({tracked:,} objects tracked)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
