"""An etcd stall under load (issue 15): what a process answers while etcd hangs for a few seconds, and what
the stall costs it afterwards.

    python -m bench.stall_bench [--users 10000] [--rate 4300] [--before 10] [--stall 3] [--after 20]
                                [--mode contact] [--json FILE]

One etcd member, Kamailio as main and one ``midregistrar run --store etcd`` process, all on 127.0.0.1 and
started here (the parts of bench/soak_bench.py). ``--users`` phones register once (relayed to Kamailio), then
``bench/poissongen`` refreshes them at ``--rate`` REGISTER/s (Poisson arrivals, every refresh absorbed) for
``--before`` + ``--stall`` + ``--after`` seconds, and ``--before`` s into that run etcd is paused (SIGSTOP:
its connections stay open and nothing answers, like a hung member or a cut link) for ``--stall`` s. The
registrar's metrics are read every 0.25 s.

Reported: the run's REGISTERs answered 200, 503 and not at all (within 2 s), its latency; how long etcd
counted as unavailable (``midregistrar_etcd_up`` 0); the etcd data calls in the ``--after`` window, and the
reads among them (a process that forgot its cache on recovery reads every phone's AoR again there); the
largest number of asyncio tasks and the resident memory before and after. The same run without ``--stall``
is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.poisson_bench import build_generator
from bench.soak_bench import Member, SoakConfig, Stable, fresh_etcd, rss_mib, start_deployments
from tests.support import REPO
from tests.support.etcd import EtcdServer, find_etcd_binary
from tests.support.registrar import metric, metrics
from tests.support.sip import LOOPBACK

SAMPLE = 0.25  # s between reads of the registrar's metrics


@dataclass
class StallConfig:
    users: int = 10_000
    rate: float = 4300.0  # REGISTER/s: half the measured maximum of one process with the etcd store
    before: float = 10.0
    stall: float = 3.0
    after: float = 20.0
    mode: str = "contact"
    warmup_rate: float = 400.0
    workdir: Path = field(default_factory=lambda: REPO / "build" / "stall")
    quiet: bool = False


@dataclass
class StallResult:
    cfg: StallConfig
    run: dict[str, Any]  # poissongen's report of the measured run
    samples: list[dict[str, float | None]]
    command: str = ""

    def _at(self, t: float) -> dict[str, float | None]:
        """The last sample taken at or before ``t`` s into the run."""
        before = [s for s in self.samples if s["t"] is not None and s["t"] <= t]
        return before[-1] if before else self.samples[0]

    @property
    def sent(self) -> int:
        return int(self.run["sent"])

    @property
    def ok(self) -> int:
        return int(self.run["responses"].get("200", 0))

    @property
    def refused(self) -> int:
        return int(self.run["responses"].get("503", 0))

    @property
    def lost(self) -> int:
        return int(self.run["lost"])

    @property
    def unavailable_s(self) -> float:
        """Seconds during which ``midregistrar_etcd_up`` read 0."""
        down = [s for s in self.samples if s["etcd_up"] == 0]
        return len(down) * SAMPLE

    @property
    def calls_after(self) -> int:
        """etcd data calls from the end of the stall to the end of the run."""
        return self._after("etcd_calls")

    @property
    def reads_after(self) -> int:
        """Of those, reads of AoRs and contact ids memory did not hold (the rest are writes: renewals...)."""
        return self._after("etcd_reads")

    def _after(self, column: str) -> int:
        c = self.cfg
        start, end = self._at(c.before + c.stall), self._at(c.before + c.stall + c.after)
        return int((end[column] or 0) - (start[column] or 0))

    @property
    def max_tasks(self) -> int:
        return int(max(s["tasks"] or 0 for s in self.samples))

    @property
    def rss_mib(self) -> tuple[float, float]:
        return float(self.samples[0]["rss_mib"] or 0), float(self.samples[-1]["rss_mib"] or 0)

    def summary(self) -> dict[str, Any]:
        lat = self.run.get("latency_us", {})
        return {
            "sent": self.sent,
            "ok": self.ok,
            "503": self.refused,
            "lost": self.lost,
            "other": {k: v for k, v in self.run["responses"].items() if k not in ("200", "503")},
            "p50_ms": lat.get("p50", 0) / 1000,
            "p99_ms": lat.get("p99", 0) / 1000,
            "max_ms": lat.get("max", 0) / 1000,
            "etcd_unavailable_s": self.unavailable_s,
            "etcd_calls_after": self.calls_after,
            "etcd_reads_after": self.reads_after,
            "max_tasks": self.max_tasks,
            "rss_mib_before_after": self.rss_mib,
        }


async def _sample(member: Member, t0: float, out: list[dict[str, float | None]], stop: asyncio.Event) -> None:
    reg = member.registrar
    while not stop.is_set():
        t = time.monotonic() - t0
        try:
            m = await asyncio.wait_for(asyncio.to_thread(metrics, LOOPBACK, reg.http_port), 5.0)
        except Exception:  # a process too busy to answer is a finding: the row says so with None
            m = None
        row: dict[str, float | None] = {"t": round(t, 2), "rss_mib": round(rss_mib(reg.pid), 2)}
        for col, name in (
            ("tasks", "midregistrar_asyncio_tasks"),
            ("etcd_up", "midregistrar_etcd_up"),
            ("etcd_calls", "midregistrar_etcd_calls"),
            ("etcd_reads", "midregistrar_etcd_reads"),
            ("store_503s", "midregistrar_store_unavailable"),
            ("cached_aors", "midregistrar_aors"),
        ):
            row[col] = None if m is None else metric(m, name)
        out.append(row)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE)


async def _drive(
    cfg: StallConfig, soak: SoakConfig, etcd: EtcdServer, member: Member, gen: str
) -> StallResult:
    stable = Stable(gen, member.registrar.addr, "stall.test", soak, cfg.workdir / "poissongen", cfg.rate)
    member.stable = stable
    reg = member.registrar
    await stable.register(lambda: int(metric(metrics(LOOPBACK, reg.http_port), "midregistrar_bindings")))
    # one short run first: every phone's template is learnt and the cache is warm, as in steady state
    await stable.refresh(5.0)
    await asyncio.sleep(1.0)
    seconds = cfg.before + cfg.stall + cfg.after
    command = shlex.join(stable.refresh_argv(seconds))
    samples: list[dict[str, float | None]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(_sample(member, t0, samples, stop))
    run = asyncio.create_task(stable.refresh(seconds))

    async def stall() -> None:
        if cfg.stall <= 0:
            return
        await asyncio.sleep(cfg.before)
        etcd.pause()
        try:
            await asyncio.sleep(cfg.stall)
        finally:
            etcd.resume()

    staller = asyncio.create_task(stall())
    try:
        report = await run
        await staller
    finally:
        if etcd.pid is not None:
            with contextlib.suppress(Exception):
                etcd.resume()  # never leave it stopped, whatever happened
        stop.set()
        await sampler
    return StallResult(cfg, report["measured"], samples, command)


def run_stall(cfg: StallConfig) -> StallResult:
    """Start etcd, Kamailio and one registrar, drive the load with the stall, stop everything by its PID."""
    if find_etcd_binary() is None:
        raise RuntimeError("etcd not found: run `make etcd`")
    gen = build_generator()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    soak = SoakConfig(
        modes=(cfg.mode,),
        processes=1,
        users=cfg.users,
        warmup_rate=cfg.warmup_rate,
        workdir=cfg.workdir,
        quiet=True,
    )
    with contextlib.ExitStack() as stack:
        etcd = fresh_etcd(cfg.workdir, stack)
        deps = start_deployments(soak, etcd, stack)
        member = deps[0].members[0]
        return asyncio.run(_drive(cfg, soak, etcd, member, gen))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = StallConfig()
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--rate", type=float, default=d.rate)
    p.add_argument("--before", type=float, default=d.before)
    p.add_argument("--stall", type=float, default=d.stall, help="s etcd is paused (0: the reference run)")
    p.add_argument("--after", type=float, default=d.after)
    p.add_argument("--mode", default=d.mode, choices=("contact", "aor"))
    p.add_argument("--json", type=Path, help="write the summary and the samples here")
    a = p.parse_args(argv)
    cfg = StallConfig(users=a.users, rate=a.rate, before=a.before, stall=a.stall, after=a.after, mode=a.mode)
    result = run_stall(cfg)
    summary = result.summary()
    print(json.dumps({"config": {k: str(v) for k, v in asdict(cfg).items()}, **summary}, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": "python -m bench.stall_bench " + shlex.join(argv or sys.argv[1:])}
        payload |= {"summary": summary, "samples": result.samples, "generator": result.command}
        a.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
