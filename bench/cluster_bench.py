"""etcd store benchmarks (issue 4 item 8): leases for N contacts, time to ready with N bindings in etcd,
De-REGISTER delay after expiry, and etcd calls per absorbed refresh.

    python -m bench.cluster_bench leases  [--contacts 100000]
    python -m bench.cluster_bench ready   [--bindings 500000]
    python -m bench.cluster_bench dereg   [--phones 300] [--expires 10]
    python -m bench.cluster_bench refresh [--phones 1000] [--rounds 40] [--scale 20]
    python -m bench.cluster_bench throughput [--users 10000] [--tp-start 2000]
    python -m bench.cluster_bench all

from the repository's root. Each part starts its own etcd (tests/support/etcd.py: loopback, --unsafe-no-fsync,
auto-compaction) and, where it says so, a real ``midregistrar run --store etcd`` process; the phones and the
main registrar of ``dereg`` and ``refresh`` are small asyncio UDP peers in this script (a fake main answers
every REGISTER with 200 and the contacts it got), so what is measured is the registrar and etcd, not SIPp's
pacing. Prints markdown headed by the command that produced it. Throughput with the etcd store against the
memory store is measured with SIPp by the ``throughput`` part, with ``bench.throttle_bench``'s ramp (memory
store, then etcd store). The De-REGISTER delays are nearest-rank percentiles (tests/support/stats.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registrar.config import Settings
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.etcd import EtcdStore
from registrar.store.etcd_client import EtcdClient, op_put
from registrar.store.etcd_layout import EtcdKeys, encode_binding, encode_head, encode_index
from tests.support import REPO
from tests.support.etcd import running_etcd
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port
from tests.support.registrar import Registrar
from tests.support.sip import LOOPBACK
from tests.support.stats import percentile

PREFIX = "/midregistrar/bench/cluster/"


# ------------------------------------------------------------------------------------------ leases


class _Counter:
    """A store listener that only counts finished writes."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.event = asyncio.Event()
        self.want = 0

    def store_ready(self, key: str) -> None:
        pass

    def store_committed(self, ticket: int, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.done >= self.want:
            self.event.set()

    def orphans_expired(self, before: AorRecord, gone: list[Binding]) -> None:
        pass

    def availability_changed(self, available: bool) -> None:
        pass


def _record(i: int, now: float, expires: float) -> AorRecord:
    aor = f"user{i:06d}@bench.test"
    binding = Binding(
        ctid=10_000_000 + i,
        contact=f"<sip:user{i}@192.0.2.{i % 250}:{5060 + i % 1000}>",
        expires_at=now + expires,
        source=Peer("udp", f"192.0.2.{i % 250}", 5060 + i % 1000),
        call_id=f"{i:024x}@phone",
        cseq=1,
        local_expires=int(expires),
        main_expires=3600,
        relayed_at=now,
        relayed_call_id=f"{i:024x}@phone",
        relayed_cseq=1,
    )
    meta = MainMeta(from_uri=f"<sip:{aor}>;tag=x{i}", to_uri=f"<sip:{aor}>", ruri="sip:main.test")
    return AorRecord(aor, {binding.ctid: binding}, 0, meta)


async def _leases(endpoint: str, contacts: int) -> list[tuple[str, str]]:
    settings = Settings.model_validate(
        {"store": "etcd", "etcd_endpoints": [endpoint], "etcd_prefix": PREFIX, "etcd_timeout": 10.0}
    )
    store = EtcdStore(settings, member_id="bench-0")
    counter = _Counter()
    counter.want = contacts
    store.listener = counter
    await store.start("udp:127.0.0.1:5060")
    now = time.time()
    rng = random.Random(1)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(contacts):
        # phones asking 60 s .. 3600 s: a realistic spread of expiries
        ticket = store.commit(_record(i, now, rng.choice((60, 300, 600, 1800, 3600))), None, now)
        assert ticket is not None
        while i + 1 - counter.done > 256:  # as many in flight as a busy registrar, not 100,000 at once
            await asyncio.sleep(0.001)
    await asyncio.wait_for(counter.event.wait(), 600)
    elapsed = time.perf_counter() - t0
    cpu = (time.process_time() - c0) / contacts * 1e6
    async with EtcdClient([endpoint], timeout=10.0) as c:
        leases = len(await c.leases())
    await store.close()
    return [
        ("contacts written through the store (one CAS txn each, ≤ 256 queued)", f"{contacts:,}"),
        ("writes per second / failed", f"{contacts / elapsed:,.0f} / {counter.failed}"),
        ("registrar CPU per write (µs)", f"{cpu:.0f}"),
        (
            f"live etcd leases for {contacts:,} contacts "
            f"(60 s – 3600 s expiries, hold {settings.etcd_hold} s)",
            f"**{leases}**",
        ),
    ]


def _registrar(main: int, endpoint: str, prefix: str, workdir: Path, *more: str) -> Registrar:
    """A ``midregistrar run --store etcd`` in mode contact on loopback (not started yet)."""
    extra = ["--store", "etcd", "--etcd-endpoints", endpoint, "--etcd-prefix", prefix]
    extra += ["--outgoing-expires", "3600", "--log-level", "warning", *more]
    return Registrar((LOOPBACK, main), mode="contact", transports=("udp",), extra=extra, workdir=workdir)


# ------------------------------------------------------------------------------------------ ready


async def _populate(endpoint: str, bindings: int) -> float:
    """``bindings`` AoRs of one binding each, in the store's own layout, in batched transactions."""
    now = time.time()
    hold = now + 7200
    async with EtcdClient([endpoint], timeout=30.0) as c:
        lease = await c.grant(7200)
        keys = EtcdKeys(PREFIX.encode())
        t0 = time.perf_counter()
        starts = iter(range(0, bindings, 40))

        async def worker() -> None:
            for start in starts:  # 16 workers share one iterator: 16 transactions in flight
                ops = []
                for i in range(start, min(start + 40, bindings)):
                    record = _record(i, now, 3600)
                    (binding,) = record.bindings.values()
                    binding = Binding(**{**binding.to_dict(), "source": binding.source, "owner": "gone-pod"})
                    aor, ctid = record.aor, binding.ctid
                    ops.append(op_put(keys.head(aor), encode_head(aor, record.meta, [ctid]), lease))
                    ops.append(op_put(keys.binding(aor, ctid), encode_binding(binding, hold), lease))
                    ops.append(op_put(keys.index(ctid), encode_index(aor), lease))
                await c.txn([], ops)

        await asyncio.gather(*(worker() for _ in range(16)))
        return time.perf_counter() - t0


def _ready(endpoint: str, bindings: int, work: Path) -> list[tuple[str, str]]:
    populate = asyncio.run(_populate(endpoint, bindings))
    main = free_port()
    times = []
    rss = []
    for run in range(3):
        reg = _registrar(main, endpoint, PREFIX, work / f"ready{run}")
        t0 = time.perf_counter()
        reg.start(ready_timeout=120)
        times.append(time.perf_counter() - t0)
        rss.append(_rss_mib(reg.pid))
        reg.stop()
    return [
        (f"bindings in etcd (written in {populate:.0f} s)", f"{bindings:,}"),
        (
            "time from process start to /readyz 200 (median of 3; includes the interpreter start)",
            f"**{statistics.median(times):.2f} s** ({', '.join(f'{t:.2f}' for t in times)})",
        ),
        ("resident memory when ready (median)", f"{statistics.median(rss):.0f} MiB"),
    ]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------------------------------ SIP peers


@dataclass
class FakeMain(asyncio.DatagramProtocol):
    """Answers every REGISTER with 200 and its contacts at ``grant`` seconds; notes De-REGISTERs."""

    grant: int = 3600
    deregs: list[tuple[float, str]] = field(default_factory=list)
    registers: int = 0
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        text = data.decode(errors="replace")
        if not text.startswith("REGISTER"):
            return
        self.registers += 1
        head = text.split("\r\n\r\n", 1)[0].split("\r\n")
        keep = [h for h in head[1:] if re.match(r"(?i)(via|from|to|call-id|cseq):", h)]
        contacts = [h for h in head[1:] if re.match(r"(?i)(contact|m):", h)]
        if any(re.search(r"expires=0\b", c) for c in contacts):
            user = re.search(r"sip:([^@;>]+)", contacts[0])
            self.deregs.append((time.time(), user.group(1) if user else "?"))
            out = keep
        else:
            out = keep + [re.sub(r";expires=\d+", "", c) + f";expires={self.grant}" for c in contacts]
        out = [h + (";tag=main" if h.lower().startswith("to:") and "tag=" not in h else "") for h in out]
        reply = "SIP/2.0 200 OK\r\n" + "\r\n".join(out) + "\r\nContent-Length: 0\r\n\r\n"
        assert self.transport is not None
        self.transport.sendto(reply.encode(), addr)


@dataclass
class Phones(asyncio.DatagramProtocol):
    """Many phones on one socket: REGISTERs out, 200s in (time and granted expires per user)."""

    replies: dict[str, tuple[float, int]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        text = data.decode(errors="replace")
        status = int(text.split(" ", 2)[1])
        self.statuses[status] = self.statuses.get(status, 0) + 1
        call = re.search(r"(?im)^call-id:\s*(\S+)", text)
        exp = re.search(r";expires=(\d+)", text)
        if status == 200 and call and exp:
            self.replies[call.group(1).split("-")[0]] = (time.time(), int(exp.group(1)))

    def register(self, target: tuple[str, int], user: str, cseq: int, expires: int) -> None:
        assert self.transport is not None
        port = self.transport.get_extra_info("sockname")[1]
        msg = (
            f"REGISTER sip:bench.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOOPBACK}:{port};rport;branch=z9hG4bK-{user}-{cseq}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@bench.test>;tag={user}\r\nTo: <sip:{user}@bench.test>\r\n"
            f"Call-ID: {user}-call\r\nCSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{user}@{LOOPBACK}:{port}>;expires={expires}\r\nContent-Length: 0\r\n\r\n"
        )
        self.transport.sendto(msg.encode(), target)


def _metric(http_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") or line.startswith(name + "_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _peers(main: int) -> tuple[FakeMain, Phones, asyncio.DatagramTransport, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    fm = FakeMain()
    t1, _ = await loop.create_datagram_endpoint(lambda: fm, local_addr=(LOOPBACK, main))
    ph = Phones()
    t2, _ = await loop.create_datagram_endpoint(lambda: ph, local_addr=(LOOPBACK, 0))
    return fm, ph, t1, t2


# ------------------------------------------------------------------------------------------ dereg


async def _dereg(
    endpoint: str, phones: int, expires: int, work: Path, processes: int
) -> list[tuple[str, str]]:
    main = free_port()
    fm, ph, t1, t2 = await _peers(main)
    regs = []
    try:
        for i in range(processes):
            regs.append(
                _registrar(main, endpoint, PREFIX + "dereg/", work / f"dereg{i}", "--min-expires", "1").start(
                    ready_timeout=30
                )
            )
        for i in range(phones):
            ph.register(regs[i % processes].addr, f"d{i:05d}", 1, expires)
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(expires + 6)
    finally:
        for reg in regs:
            reg.stop()
        t1.close()
        t2.close()
    delays = []
    seen: dict[str, int] = {}
    for at, user in fm.deregs:
        seen[user] = seen.get(user, 0) + 1
        reply = ph.replies.get(user)
        if reply is not None and seen[user] == 1:
            delays.append(at - (reply[0] + reply[1]))
    dup = sum(n - 1 for n in seen.values())
    if not delays:
        return [("De-REGISTERs received", "none")]
    return [
        (
            f"phones registered ({processes} processes sharing etcd, {expires} s expires), then silent",
            f"{len(ph.replies)}",
        ),
        ("De-REGISTERs at the main registrar / duplicates", f"{len(fm.deregs)} / {dup}"),
        (
            "delay after expiry p50 / p99 / max (s)",
            f"{percentile(delays, 50):.2f} / **{percentile(delays, 99):.2f}** / {max(delays):.2f}",
        ),
    ]


# ------------------------------------------------------------------------------------------ refresh


async def _refresh(endpoint: str, phones: int, rounds: int, scale: int, work: Path) -> list[tuple[str, str]]:
    """Phones refreshing at their expiry, all times divided by ``scale`` (60 s phones and the default 600 s
    hold become 60/scale and 600/scale): etcd calls per absorbed refresh at steady state, in minutes."""
    main = free_port()
    fm, ph, t1, t2 = await _peers(main)
    expires = max(1, round(60 / scale))
    hold = max(5, round(600 / scale))
    reg = _registrar(
        main, endpoint, PREFIX + "refresh/", work / "refresh", "--etcd-hold", str(hold), "--min-expires", "1"
    ).start(ready_timeout=30)
    try:
        for i in range(phones):
            ph.register(reg.addr, f"r{i:05d}", 1, expires)
            if i % 100 == 99:
                await asyncio.sleep(0.02)
        await asyncio.sleep(1)
        calls0 = _metric(reg.http_port, "midregistrar_etcd_calls")
        absorbed0 = _metric(reg.http_port, 'midregistrar_registers_total{outcome="absorbed"}')
        relayed0 = fm.registers
        t0 = time.perf_counter()
        for r in range(rounds):
            start = time.perf_counter()
            for i in range(phones):
                ph.register(reg.addr, f"r{i:05d}", 2 + r, expires)
                if i % 100 == 99:
                    await asyncio.sleep(0.01)
            if r < rounds - 1:
                await asyncio.sleep(max(0.0, expires * 0.9 - (time.perf_counter() - start)))
        await asyncio.sleep(0.3)  # answered, and well before the bindings expire (their delete is no refresh)
        elapsed = time.perf_counter() - t0
        calls = _metric(reg.http_port, "midregistrar_etcd_calls") - calls0
        absorbed = _metric(reg.http_port, 'midregistrar_registers_total{outcome="absorbed"}') - absorbed0
    finally:
        reg.stop()
        t1.close()
        t2.close()
    return [
        (
            f"phones × refreshes ({rounds} rounds in {elapsed:.0f} s; {expires} s expires and "
            f"--etcd-hold {hold}, "
            f"i.e. 60 s and 600 s at 1/{scale} time)",
            f"{phones} × {rounds}",
        ),
        (
            "absorbed refreshes / relayed to main during the rounds",
            f"{absorbed:.0f} / {fm.registers - relayed0}",
        ),
        ("etcd data calls during the rounds", f"{calls:.0f}"),
        ("etcd calls per absorbed refresh", f"**{calls / max(1.0, absorbed):.3f}**"),
    ]


# ------------------------------------------------------------------------------------------ throughput


def _throughput(endpoint: str, args: argparse.Namespace, work: Path) -> list[tuple[str, str]]:
    """The same SIPp ramp as ``bench.throttle_bench throughput`` (10,000 users absorbed after
    pre-registration, Kamailio as main), once on a process with the memory store and once with the etcd
    store."""
    from bench import throttle_bench as tb

    tb_args = argparse.Namespace(
        users=args.users, step=10.0, factor=1.25, max_rate=80000, half_runs=1, rest=2.0, load_expires=300,
        prereg_rate=1000, bisect=2, cseq_base=int(time.time()) - 10,
    )  # fmt: skip
    users = work / "users.csv"
    with users.open("w") as f:
        f.write("SEQUENTIAL\n")
        for i in range(args.users):
            f.write(f"user{i:05d};x;bench.test\n")
    kam = Kamailio(REPO / "bench" / "kamailio" / "registrar.cfg", children=2, workdir=work / "kam")
    runs: dict[str, Any] = {}
    note = ""
    print(tb.HEADER, flush=True)
    try:
        kam.start()
        for store in ("memory", "etcd"):
            extra: tuple[str, ...] = ()
            if store == "etcd":
                extra = ("--store", "etcd", "--etcd-endpoints", endpoint, "--etcd-prefix", PREFIX + "tp/")
            reg = tb.throughput_registrar(kam.port, work / f"tp-{store}", extra).start(ready_timeout=30)
            tr = tb.TRun(f"mid ({store})", command=reg.command)
            try:
                port = free_port()
                tb.preregister(tr, reg.addr, port, users, tb_args, work)
                tb.ramp(tr, reg.addr, reg.pid, port, users, tb_args, work, reg, args.tp_start)
                if store == "etcd":
                    calls = _metric(reg.http_port, "midregistrar_etcd_calls")
                    absorbed = _metric(reg.http_port, 'midregistrar_registers_total{outcome="absorbed"}')
                    note = f"{calls:.0f} etcd calls for {absorbed:.0f} absorbed REGISTERs in all"
            finally:
                reg.stop()
            runs[store] = tr
    finally:
        kam.stop()
    rows: list[tuple[str, str]] = []
    for store, tr in runs.items():
        best = tr.best
        p99s = [x.p99 for x in tr.half if x.p99 is not None]
        rows.append(
            (
                f"max absorbed REGISTER/s with 0 failures, {store} store (p50/p99 ms at max; CPU µs/REG)",
                "no passing step"
                if best is None
                else f"**{best.rate:,}** ({tb.fmt(best.p50)}/{tb.fmt(best.p99)}; {tb.fmt(best.cpu_us)})"
                + (f"; p99 at half rate {tb.fmt(statistics.median(p99s))} ms" if p99s else ""),
            )
        )
    mem, etcd = runs["memory"].best, runs["etcd"].best
    if mem and etcd:
        rows.append(("etcd store / memory store (max rate)", f"**{etcd.rate / mem.rate:.2f}×**"))
    if note:
        rows.append(("etcd store run (pre-registration included)", note))
    rows.append(("SIPp steps", "; ".join(tb.fmt_tstep(x) for x in runs["etcd"].steps[-2:])))
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="+", choices=["leases", "ready", "dereg", "refresh", "throughput", "all"])
    ap.add_argument("--contacts", type=int, default=100_000, help="leases: contacts written")
    ap.add_argument("--bindings", type=int, default=500_000, help="ready: bindings in etcd")
    ap.add_argument("--phones", type=int, default=0, help="dereg/refresh: phones (300 / 2000)")
    ap.add_argument("--expires", type=int, default=10, help="dereg: phones' expires, s")
    ap.add_argument("--processes", type=int, default=3, help="dereg: registrar processes")
    ap.add_argument("--rounds", type=int, default=40, help="refresh: refresh rounds")
    ap.add_argument("--scale", type=int, default=20, help="refresh: time divided by this")
    ap.add_argument("--users", type=int, default=10000, help="throughput: distinct SIPp users")
    ap.add_argument("--tp-start", type=int, default=2000, help="throughput: first rate, REGISTER/s")
    ap.add_argument("--output", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    parts = ["leases", "ready", "dereg", "refresh", "throughput"] if "all" in args.what else args.what
    out = [
        "### etcd store (issue 4)",
        "",
        f"`{sys.executable} {' '.join(sys.argv)}` — {os.cpu_count()} cores, {platform.platform()}, "
        f"load average before {os.getloadavg()[0]:.2f}",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        work = Path(tmp)
        for part in parts:
            with running_etcd(
                work / f"etcd-{part}", extra_args=["--quota-backend-bytes", str(8 << 30)]
            ) as etcd:
                if part == "leases":
                    rows = asyncio.run(_leases(etcd.endpoint, args.contacts))
                elif part == "ready":
                    rows = _ready(etcd.endpoint, args.bindings, work)
                elif part == "dereg":
                    rows = asyncio.run(
                        _dereg(etcd.endpoint, args.phones or 300, args.expires, work, args.processes)
                    )
                elif part == "throughput":
                    rows = _throughput(etcd.endpoint, args, work)
                else:
                    rows = asyncio.run(
                        _refresh(etcd.endpoint, args.phones or 1000, args.rounds, args.scale, work)
                    )
            out += [f"| {k} | {v} |" for k, v in rows]
            print("\n".join(out[-len(rows) :]), flush=True)
    out.append(f"\nload average after: {os.getloadavg()[0]:.2f}")
    text = "\n".join(out)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
