"""Floods (issue 15, item 8): one source sending ten times the process's capacity in REGISTERs, in OPTIONS and
in garbage while 1,000 honest phones refresh; what the honest phones see, what becomes of the flood, and the
process's memory.

    python -m bench.flood_bench [--phones 1000] [--phone-rate 1000] [--duration 20] [--factor 10]
                                [--capacity-rates 8000,16000,24000,32000,40000] [--capacity N]
                                [--variants off,drop,block] [--kinds register,options,garbage] [--senders 1]

What runs, all on loopback: Kamailio as the main registrar (bench/kamailio/registrar.cfg, an in-memory
registrar) on 127.0.0.1 and ONE ``midregistrar run --mode contact --store memory`` (UDP,
``--outgoing-expires 3600``). The honest phones are bench/poissongen on 127.0.0.3, Poisson arrivals, kernel
receive stamps (bench/poisson_bench.py says how it times); that address is in ``--trusted-sources`` as an SBC
would be, since the generator sends every phone from it. The flood comes from 127.0.0.2, trusted by nothing:
tests/support/flood.py, one Python process (``--senders`` more from the same address) sending pre-made
datagrams over a connected socket at a fixed rate.

1. Capacity: 10,000 users registered and refreshed once (warm-up), then Poisson refreshes at each of
   ``--capacity-rates`` for 10 s; the capacity is the highest rate every REGISTER of which got its 200 (no
   loss, the rate reached). ``--capacity N`` skips this.
2. For each variant: ``off`` (``--source-rate-limit 0``: today's behaviour before this work, every message
   processed), ``drop`` (the limit, ``--source-block-seconds 0``: each message over the rate dropped in the
   process) and ``block`` (the defaults: a source at ten times its rate blocked by a kernel socket filter),
   a fresh registrar and Kamailio; the 1,000 phones are registered, then measured for DURATION s at
   ``--phone-rate`` without a flood, then once per kind while one source floods at FACTOR × capacity
   (starting 1 s before the phones' run, ending after it; ``--rest`` s between kinds, longer than a block).

3. A digest brute force (``--brute-force`` s): a registrar with ``--auth-file``; one address answers alice's
   challenge with guesses as fast as the answers come while her honest phone authenticates every 200 guesses.

Per row: the honest phones' p50/p99/max and failures (no 200 within 2 s; the generator never retransmits), the
flood's rate reached, what it got back (answers by code), what the process dropped itself
(``midregistrar_messages_dropped_total``) and what the kernel dropped on the socket (``/proc/net/udp``: the
filter's drops and queue overflows alike), the registrar's CPU, RSS before and after (and its peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.poisson_bench import KAMAILIO_CFG, Target, build_generator, generator_argv, loadavg, run_generator
from bench.poisson_bench import source_state as poisson_source_state
from tests.support.flood import KINDS, DigestPhone, Flooder
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port, udp_drops
from tests.support.process import tree_cpu_seconds
from tests.support.registrar import Registrar, metric
from tests.support.sip import LOOPBACK, status_code
from tests.support.sipp import ensure_sip_tools

PHONES_IP = "127.0.0.3"
FLOOD_IP = "127.0.0.2"
VARIANTS = {
    "off": ["--source-rate-limit", "0"],
    "drop": ["--source-block-seconds", "0"],
    "block": [],
}


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


@dataclass
class Rig:
    """Kamailio main and one registrar, with the generator's users and where their CSeqs stand."""

    kam: Kamailio
    reg: Registrar
    target: Target
    gen: str


def start_rig(work: Path, gen: str, extra: list[str], name: str, users: int, args: argparse.Namespace) -> Rig:
    kam = Kamailio(KAMAILIO_CFG, children=2, workdir=work / f"kam-{name}")
    kam.start()
    reg = Registrar(
        (LOOPBACK, kam.port),
        mode="contact",
        transports=("udp",),
        extra=[
            "--outgoing-expires",
            "3600",
            "--log-level",
            "warning",
            "--trusted-sources",
            PHONES_IP,
            *extra,
        ],
        workdir=work / f"mid-{name}",
    )
    try:
        reg.start(ready_timeout=20)
    except BaseException:
        kam.stop()
        raise
    target = Target(name, reg.addr, reg.pid, reg.command, registrar=reg, source_ports=[free_port(PHONES_IP)])
    rig = Rig(kam, reg, target, gen)
    try:
        for what in ("warm-up", "first refresh"):
            rep = generate(rig, args, users, 0, warmup=True)
            ok = rep["warmup"]["responses"].get("200", 0)
            print(f"{name}: {what} of {users} users: {ok} × 200", flush=True)
            if ok != users:
                raise RuntimeError(f"{what} failed: {json.dumps(rep)[:2000]}")
    except BaseException:
        reg.stop()
        kam.stop()
        raise
    return rig


def generate(
    rig: Rig, args: argparse.Namespace, users: int, rate: int, *, warmup: bool = False
) -> dict[str, Any]:
    """One poissongen run from PHONES_IP (its users go on where the last run stopped)."""
    t = rig.target
    saved = args.users
    args.users = users
    try:
        argv = [*generator_argv(rig.gen, t, args, rate, warmup), "-local", PHONES_IP]
    finally:
        args.users = saved
    rep = run_generator(argv, args.duration + users / args.warmup_rate + 120)
    rep["command"] = shlex.join(argv)
    t.cseq = int(rep["cseq_next"])
    t.first_user = int(rep.get("first_user_next", t.first_user))
    return rep


def measure_capacity(work: Path, gen: str, args: argparse.Namespace) -> tuple[int, list[str]]:
    rig = start_rig(work, gen, [], "capacity", 10_000, args)
    lines = []
    best = 0
    saved = args.duration
    args.duration = 10.0
    try:
        for rate in [int(r) for r in args.capacity_rates.split(",") if r.strip()]:
            rep = generate(rig, args, 10_000, rate)
            m = rep["measured"]
            ok = m["responses"].get("200", 0)
            passed = ok == m["sent"] and not m["lost"] and m["achieved_send_rate"] >= 0.95 * rate
            lat = m["latency_us"]
            lines.append(
                f"| {rate} | {m['achieved_send_rate']:.0f} | {ok} | {m['lost']} | "
                f"{lat.get('p99', 0) / 1000:.2f} | {'pass' if passed else 'FAIL'} |"
            )
            print(lines[-1], flush=True)
            if not passed:
                break
            best = rate
            time.sleep(args.rest / 5)
    finally:
        args.duration = saved
        rig.reg.stop()
        rig.kam.stop()
    return best, lines


def flood_row(
    rig: Rig, args: argparse.Namespace, variant: str, kind: str | None, rate: int
) -> dict[str, Any]:
    """The phones for DURATION s, with ``kind`` flooding at ``rate`` meanwhile (None: no flood)."""
    reg = rig.reg
    m0 = reg.metrics()
    rss0, _ = memory_kb(reg.pid)
    drops0 = udp_drops(reg.port)
    cpu0 = tree_cpu_seconds(reg.pid)
    procs = []
    flooders = []
    if kind is not None:
        for _ in range(args.senders):
            flooder = Flooder(reg.addr, FLOOD_IP, kind, rate / args.senders, args.duration + 2.0)
            flooders.append(flooder)
            procs.append(flooder.start())
        time.sleep(1.0)
    honest = generate(rig, args, args.phones, args.phone_rate)
    reports = [Flooder.result(p, args.duration + 90) for p in procs]
    cpu = tree_cpu_seconds(reg.pid) - cpu0
    rss1, hwm = memory_kb(reg.pid)
    m1 = reg.metrics()
    h = honest["measured"]
    lat = h["latency_us"]
    sent = sum(r["sent"] for r in reports)
    seconds = max((r["seconds"] for r in reports), default=0.0)
    answers: dict[str, int] = {}
    for r in reports:
        for code, n in r["answers"].items():
            answers[code] = answers.get(code, 0) + n
    row = {
        "variant": variant,
        "kind": kind or "none",
        "offered": rate if kind else 0,
        "reached": round(sent / seconds) if seconds else 0,
        "flood_sent": sent,
        "flood_answers": answers,
        "dropped_in_process": metric(m1, "midregistrar_messages_dropped", reason="source_rate")
        - metric(m0, "midregistrar_messages_dropped", reason="source_rate"),
        "dropped_by_kernel": udp_drops(reg.port) - drops0,
        "blocks": metric(m1, "midregistrar_sources_blocked") - metric(m0, "midregistrar_sources_blocked"),
        "honest_sent": h["sent"],
        "honest_200": h["responses"].get("200", 0),
        "honest_failed": h["sent"] - h["responses"].get("200", 0),
        "p50_ms": lat.get("p50", 0) / 1000,
        "p99_ms": lat.get("p99", 0) / 1000,
        "max_ms": lat.get("max", 0) / 1000,
        "cpu_s": cpu,
        "rss_before_mb": rss0 / 1024,
        "rss_after_mb": rss1 / 1024,
        "rss_peak_mb": hwm / 1024,
        "sender_cpu_s": sum(r["cpu_seconds"] for r in reports),
        "honest_command": honest["command"],
        "flood_command": shlex.join(flooders[0].argv()) if flooders else "",
        "load": loadavg(),
    }
    print(fmt(row), flush=True)
    return row


def brute_force(work: Path, seconds: float) -> str:
    """One address guessing alice's password as fast as the answers come, against ``--auth-file``; her
    honest phone authenticating every 200 guesses meanwhile. The figures as one line."""
    (work / "users").write_text("alice:right\n")
    kam = Kamailio(KAMAILIO_CFG, children=2, workdir=work / "kam-brute")
    kam.start()
    reg = Registrar(
        (LOOPBACK, kam.port),
        mode="contact",
        transports=("udp",),
        extra=[
            "--outgoing-expires",
            "3600",
            "--auth-file",
            str(work / "users"),
            "--auth-realm",
            "example.test",
        ],
        workdir=work / "mid-brute",
    )
    try:
        reg.start()
        honest, attacker = DigestPhone(reg.addr, "127.0.0.21"), DigestPhone(reg.addr, "127.0.0.22")
        for phone in (honest, attacker):
            if status_code(phone.register()) != 200:
                raise RuntimeError("registration through the main registrar failed")
        honest.authenticate("right")
        nonce = attacker.nonce()
        sent = honest_ok = honest_tries = 0
        checked: dict[int, float] = {}
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            attacker.register(f"guess{sent}", nonce)
            sent += 1
            if sent % 200 == 0:
                honest_tries += 1
                honest_ok += honest.authenticate("right") == 200
            for mark in (10, 30):
                if mark not in checked and elapsed >= mark:
                    checked[mark] = metric(reg.metrics(), "midregistrar_auth_failures")
        m = reg.metrics()
        return (
            f"{seconds:g} s of guesses from one address: {sent:,} sent ({sent / seconds:,.0f}/s, each after "
            f"the last one's answer); checked (wrong answers counted) by 10 s: {checked.get(10, 0):.0f}, by "
            f"30 s: {checked.get(30, 0):.0f}, by {seconds:g} s: "
            f"{metric(m, 'midregistrar_auth_failures'):.0f}; "
            f"answered 503 unchecked: {metric(m, 'midregistrar_auth_refused', reason='source'):,.0f}; the "
            f"honest phone of that user: {honest_ok} / {honest_tries} authenticated; log lines: "
            f"{reg.log().count('digest brute force')}"
        )
    finally:
        reg.stop()
        kam.stop()


HEADER = (
    "| variant | flood | offered/s | reached/s | honest 200s / sent | honest p50 / p99 / max ms "
    "| flood answered | dropped in process | dropped by kernel | sources blocked | registrar CPU s "
    "| RSS before → after (peak) MB | load avg |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|---|"


def fmt(r: dict[str, Any]) -> str:
    answered = ", ".join(f"{n} × {code}" for code, n in sorted(r["flood_answers"].items())) or "none"
    return (
        f"| {r['variant']} | {r['kind']} | {r['offered']:,} | {r['reached']:,} | {r['honest_200']:,} / "
        f"{r['honest_sent']:,} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} / {r['max_ms']:.1f} | {answered} | "
        f"{r['dropped_in_process']:,.0f} | {r['dropped_by_kernel']:,} | {r['blocks']:.0f} | "
        f"{r['cpu_s']:.1f} | "
        f"{r['rss_before_mb']:.1f} → {r['rss_after_mb']:.1f} ({r['rss_peak_mb']:.1f}) | {r['load']} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phones", type=int, default=1000, help="honest phones (users)")
    ap.add_argument(
        "--phone-rate", type=int, default=1000, help="their REGISTERs per second in all (Poisson)"
    )
    ap.add_argument("--duration", type=float, default=20.0, help="seconds the phones are measured per row")
    ap.add_argument("--factor", type=float, default=10.0, help="the flood's rate, times the capacity")
    ap.add_argument(
        "--capacity-rates", default="8000,16000,24000,32000,40000", help="Poisson rates tried, ascending"
    )
    ap.add_argument("--capacity", type=int, help="skip the capacity measurement: absorbed refreshes/s")
    ap.add_argument("--variants", default="off,drop,block", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}")
    ap.add_argument("--senders", type=int, default=1, help="flooding processes, all from the one address")
    ap.add_argument("--rest", type=float, default=12.0, help="pause between floods, s (a block lasts 10 s)")
    ap.add_argument("--generator", help="a poissongen binary (default: build or reuse the cached one)")
    ap.add_argument("--brute-force", type=float, default=60.0, help="seconds of digest guessing (0: none)")
    # what bench.poisson_bench's generator_argv reads
    ap.add_argument("--expires", type=int, default=300)
    ap.add_argument("--warmup-rate", type=float, default=500.0)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--sockets", type=int, default=1)
    ap.add_argument("--spin-us", type=int, default=20)
    ap.add_argument("--rt-priority", type=int, default=10)
    args = ap.parse_args(argv)
    args.users = args.phones
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(variants) - set(VARIANTS) or set(kinds) - set(KINDS):
        ap.error("unknown variant or kind")
    if not ensure_sip_tools():
        print("kamailio unavailable: run `make sip-tools`")
        return 1
    gen = args.generator or build_generator()
    work = Path(tempfile.mkdtemp(prefix="flood-bench-"))
    la0 = loadavg()
    cap_lines: list[str] = []
    if args.capacity:
        capacity = args.capacity
    else:
        print(
            "| offered/s | achieved/s | 200s | lost | p99 ms | result |\n|---|---|---|---|---|---|",
            flush=True,
        )
        capacity, cap_lines = measure_capacity(work, gen, args)
        if not capacity:
            print("\n".join(cap_lines))
            print("no capacity rate passed (a busy machine?): lower --capacity-rates, or give --capacity")
            return 1
        time.sleep(args.rest / 4)
    rate = int(capacity * args.factor)
    print(f"capacity {capacity}/s: flooding at {rate}/s", flush=True)
    print(HEADER, flush=True)
    print(RULE, flush=True)
    rows = []
    for variant in variants:
        rig = start_rig(work, gen, VARIANTS[variant], variant, args.phones, args)
        try:
            rows.append(flood_row(rig, args, variant, None, 0))
            for kind in kinds:
                time.sleep(args.rest)
                rows.append(flood_row(rig, args, variant, kind, rate))
        finally:
            rig.reg.stop()
            rig.kam.stop()
    (work / "rows.json").write_text(json.dumps(rows, indent=2))
    brute = brute_force(work, args.brute_force) if args.brute_force else ""
    print(brute, flush=True)
    command = f"{sys.executable} -m bench.flood_bench {shlex.join(sys.argv[1:] if argv is None else argv)}"
    out = [
        "### Floods",
        "",
        f"`{command}`: {args.phones} phones at {args.phone_rate}/s from {PHONES_IP}, {args.duration:g} s per "
        f"row; the flood from {FLOOD_IP} by {args.senders} sender process(es); load average before {la0}, "
        f"after {loadavg()}; {os.cpu_count()} cores, {platform.platform()}; "
        f"registrar at {poisson_source_state()}",
        "",
    ]
    if cap_lines:
        out += [
            f"Capacity (10,000 users, 10 s per rate): **{capacity}/s**",
            "",
            "| offered/s | achieved/s | 200s | lost | p99 ms | result |",
            "|---|---|---|---|---|---|",
            *cap_lines,
            "",
        ]
    out += [HEADER, RULE, *[fmt(r) for r in rows], ""]
    out += ["Commands:", "", *sorted({f"- `{r['flood_command']}`" for r in rows if r["flood_command"]})]
    out += [f"- phones: `{rows[0]['honest_command']}`" if rows else ""]
    if brute:
        out += ["", f"Digest brute force (`--auth-file`, `--auth-failure-limit` 5): {brute}."]
    print("\n".join(out))
    print(f"\nwork dir (JSON per row): {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
