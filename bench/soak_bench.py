"""Soak (issue 15, item 6): an hour of absorbed refreshes at half the maximum rate, with the etcd store and
phones joining, leaving and vanishing all along; every process's memory, file descriptors, asyncio tasks and
the etcd keys must stay flat after the warm-up. Prints the least-squares slope of every series.

    python -m bench.soak_bench [--duration 3600] [--warmup 600] [--interval 10]
                               [--rates contact=4300,aor=3000]
                               [--modes contact,aor] [--processes 1] [--users 10000]
                               [--join-rate 10] [--churn-expires 30] [--lifetime 90] [--leave-share 0.5]
                               [--etcd-hold 600]

What runs, all on 127.0.0.1, every process started here and stopped by its PID (also on SIGTERM, SIGINT and
SIGHUP): one etcd member (tests/support/etcd.py), and for each mode of ``--modes`` a deployment of its own
(etcd prefix ``/midregistrar/soak/<mode>/``): Kamailio as the main registrar
(tests/support/main_registrar.cfg, no digest, quiet) and ``--processes`` ``midregistrar run --store etcd``
processes sharing the prefix (``--outgoing-expires 3600``, ``--etcd-hold`` as given, hand-offs keyed).
Each process gets two kinds of phones:

- the stable ones: ``--users`` AoRs of one binding each (``--expires`` 300), registered once at the start
  (relayed to Kamailio), then refreshed by ``bench/poissongen`` at the mode's ``--rates`` REGISTER/s per
  process with Poisson arrivals, in back-to-back runs of ``--chunk`` s (each run goes on with the users' CSeqs
  from the same source port, so every refresh is absorbed). Each run's latency percentiles and losses are
  kept;
- the churn: new AoRs join at ``--join-rate`` per second per process (Poisson), register with
  ``--churn-expires``, refresh at half of it, and after a lifetime drawn from an exponential of mean
  ``--lifetime`` s either leave (a De-REGISTER, expires=0, with probability ``--leave-share``) or vanish
  (stop refreshing: their binding expires, and the registrar De-REGISTERs it at Kamailio). These phones are
  asyncio peers in this script; every answer is timed and every phone's state is known, so the number of
  bindings that must be live at any time (``expected_lo``..``expected_hi``: the upper bound adds requests in
  flight and bindings within 2 s of their expiry) is computed from the churn itself.

The default rates are half the highest absorbed REGISTER rate with 0 failures measured with the etcd store
on this machine (one process, Kamailio as main): mode contact 8,600/s (docs/benchmarks.md, "The etcd store
keeps its figures": ``bench.cluster_bench throughput``, SIPp's ceiling, so the registrar's own is higher),
mode aor 6,000/s (``--ramp aor``: every refresh there is parsed and runs a transaction, ~150 µs each
against ~50 µs for a templated refresh in mode contact).

Every ``--interval`` s a sample is taken: per registrar process its RSS (``/proc/<pid>/status`` VmRSS), open
file descriptors (``/proc/<pid>/fd``), asyncio tasks (the ``midregistrar_asyncio_tasks`` gauge), bindings
held, cached AoRs, refresh templates and leases; per deployment the keys under its prefix by kind (heads,
bindings, index, claims, members), Kamailio's contacts (usrloc statistics) and its processes' proportional
memory (PSS from smaps_rollup); etcd's RSS and database size. The samples go to
``bench/results/soak-<time>.csv`` (one row per sample), the generator runs and the summary to a ``.json``
beside it. After ``--warmup`` s a least-squares line is fitted to every
series: its slope per hour, also as a percentage of the series' mean, is the figure reported. Then the load
stops, the churn phones all vanish, and once their bindings have expired a last sample is compared with what
must remain: the stable phones' keys and contacts only, the churn's claims, and the idle process's tasks and
descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.poisson_bench import build_generator, loadavg, source_state
from registrar.store.etcd_client import EtcdClient
from tests.support import REPO
from tests.support.etcd import EtcdServer, find_etcd_binary
from tests.support.kamailio import KamailioMain
from tests.support.ports import free_port, udp_drops
from tests.support.process import cpu_seconds, process_tree
from tests.support.registrar import Registrar, metric, metrics
from tests.support.sip import LOOPBACK
from tests.support.stats import percentile

# Highest absorbed REGISTER/s with 0 failures, etcd store, one process, Kamailio as main (docs/benchmarks.md,
# "Soak"): mode contact from "The etcd store keeps its figures" (bench.cluster_bench throughput, SIPp); mode
# aor measured by this script's --ramp (poissongen, quiet machine: 6,000/s passed, 7,000/s lost answers).
MEASURED_MAX = {"contact": 8600, "aor": 6000}
ANSWER_TIMEOUT = 4.0  # a churn REGISTER unanswered this long is lost (no retransmissions: loopback)
EDGE = 2.0  # s around a vanished binding's expiry when it may or may not be gone yet


@dataclass
class SoakConfig:
    """What to run; the defaults are the hour-long soak of ``make bench``."""

    duration: float = 3600.0
    warmup: float = 600.0
    interval: float = 10.0
    rates: dict[str, float] = field(default_factory=lambda: {k: v / 2 for k, v in MEASURED_MAX.items()})
    modes: tuple[str, ...] = ("contact", "aor")
    processes: int = 1
    users: int = 10_000
    expires: int = 300
    warmup_rate: float = 400.0  # new AoRs/s per process: each is an etcd write and a relay
    chunk: float = 60.0
    join_rate: float = 10.0
    churn_expires: int = 30
    lifetime: float = 90.0
    leave_share: float = 0.5
    etcd_hold: int = 600  # the registrars' --etcd-hold: shorter shows more lease-renewal cycles in less time
    seed: int = 1
    workdir: Path = field(default_factory=lambda: REPO / "build" / "soak")
    out: Path | None = None  # CSV of the samples (default bench/results/soak-<time>.csv)
    quiet: bool = False


# ------------------------------------------------------------------------------------------ /proc


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pss_mib(pid: int) -> float:
    """Proportional set size of a process tree (Kamailio's workers share its memory: RSS would count it in
    every one)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


# ------------------------------------------------------------------------------------------ churn phones


@dataclass
class Phone:
    name: str
    cseq: int = 0
    state: str = "new"  # new, joining, live, leaving, left, vanished, failed
    until: float = 0.0  # monotonic time its binding ends at the registrar (last 200 + granted expires)
    inflight: bool = False


@dataclass
class ChurnStats:
    joined: int = 0
    left: int = 0
    vanished: int = 0
    failed: int = 0
    latency: dict[str, list[float]] = field(default_factory=lambda: {"join": [], "refresh": [], "leave": []})
    errors: Counter[str] = field(default_factory=Counter)  # "<kind> <code or timeout>"


class Churn(asyncio.DatagramProtocol):
    """Phones joining, refreshing, leaving and vanishing, on one UDP socket, towards one registrar."""

    def __init__(self, name: str, target: tuple[str, int], domain: str, cfg: SoakConfig) -> None:
        self.name = name
        self.target = target
        self.domain = domain
        self.cfg = cfg
        self.rng = random.Random(f"{cfg.seed}-{name}")
        self.phones: dict[str, Phone] = {}
        self.stats = ChurnStats()
        self.pending: dict[bytes, asyncio.Future[tuple[int, int, float]]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.stopping = False
        self.lives: dict[asyncio.Task[None], Phone] = {}

    # -- socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        at = time.monotonic()
        m = re.match(rb"SIP/2\.0 (\d{3})", data)
        branch = re.search(rb"branch=([^;,\s]+)", data)
        if m is None or branch is None:
            return
        code = int(m.group(1))
        if code < 200:
            return
        fut = self.pending.get(branch.group(1))
        if fut is None or fut.done():
            return
        granted = re.search(rb"(?im)^(?:contact|m):[^\r\n]*;\s*expires=(\d+)", data)
        fut.set_result((code, int(granted.group(1)) if granted else -1, at))

    # -- phones

    async def send(self, phone: Phone, kind: str, expires: int) -> bool:
        """One REGISTER of ``phone``; True on a 200 (its binding's end noted)."""
        assert self.transport is not None
        phone.cseq += 1
        branch = f"z9hG4bK-{phone.name}-{phone.cseq}"
        user = phone.name
        msg = (
            f"REGISTER sip:{self.domain} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOOPBACK}:{self.port};rport;branch={branch}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@{self.domain}>;tag={user}\r\n"
            f"To: <sip:{user}@{self.domain}>\r\nCall-ID: {user}-soak\r\nCSeq: {phone.cseq} REGISTER\r\n"
            f"Contact: <sip:{user}@{LOOPBACK}:{self.port}>;expires={expires}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        fut: asyncio.Future[tuple[int, int, float]] = asyncio.get_running_loop().create_future()
        self.pending[branch.encode()] = fut
        phone.inflight = True
        sent = time.monotonic()
        self.transport.sendto(msg, self.target)
        try:
            code, granted, at = await asyncio.wait_for(fut, ANSWER_TIMEOUT)
        except TimeoutError:
            self.stats.errors[f"{kind} timeout"] += 1
            return False
        finally:
            self.pending.pop(branch.encode(), None)
            phone.inflight = False
        self.stats.latency[kind].append(at - sent)
        if code != 200:
            self.stats.errors[f"{kind} {code}"] += 1
            return False
        if expires:
            phone.until = sent + (granted if granted >= 0 else expires)
        return True

    async def life(self, phone: Phone) -> None:
        try:
            await self._life(phone)
        except asyncio.CancelledError:  # stopped: a phone that was refreshing vanishes
            if phone.state == "live":
                phone.state = "vanished"
                self.stats.vanished += 1
            elif phone.state in ("joining", "leaving"):
                self._failed(phone)
            raise

    async def _life(self, phone: Phone) -> None:
        cfg = self.cfg
        lifetime = min(self.rng.expovariate(1 / cfg.lifetime), 5 * cfg.lifetime)
        leaves = self.rng.random() < cfg.leave_share
        end = time.monotonic() + lifetime
        phone.state = "joining"
        if not await self.send(phone, "join", cfg.churn_expires):
            self._failed(phone)
            return
        phone.state = "live"
        self.stats.joined += 1
        while not self.stopping:
            refresh_at = phone.until - cfg.churn_expires / 2
            if refresh_at >= end:
                break
            await asyncio.sleep(max(0.0, refresh_at - time.monotonic()))
            if self.stopping:
                break
            if not await self.send(phone, "refresh", cfg.churn_expires):
                self._failed(phone)
                return
        if not self.stopping:
            await asyncio.sleep(max(0.0, end - time.monotonic()))
        if leaves and not self.stopping:
            phone.state = "leaving"
            if not await self.send(phone, "leave", 0):
                self._failed(phone)
                return
            phone.state = "left"
            phone.until = 0.0
            self.stats.left += 1
        else:
            phone.state = "vanished"
            self.stats.vanished += 1

    def _failed(self, phone: Phone) -> None:
        """No answer or not a 200: whether the registrar holds a binding is unknown until it would expire."""
        phone.state = "failed"
        phone.until = max(phone.until, time.monotonic() + self.cfg.churn_expires + EDGE)
        self.stats.failed += 1

    async def run(self) -> None:
        """Phones join at Poisson instants until stopped."""
        n = 0
        while not self.stopping:
            await asyncio.sleep(self.rng.expovariate(self.cfg.join_rate))
            if self.stopping:
                break
            phone = Phone(f"c{n:07d}")
            n += 1
            self.phones[phone.name] = phone
            task = asyncio.create_task(self.life(phone))
            self.lives[task] = phone
            task.add_done_callback(lambda t: self.lives.pop(t, None))

    async def stop(self) -> None:
        """Every phone vanishes (no De-REGISTER): the idle ones at once, the ones with a REGISTER in flight
        once it is answered."""
        self.stopping = True
        for task, phone in list(self.lives.items()):
            if not phone.inflight:
                task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.lives, return_exceptions=True), ANSWER_TIMEOUT + 5)

    def expected(self, now: float) -> tuple[int, int]:
        """(surely live, possibly live) churn bindings at the registrar at monotonic ``now``."""
        lo = hi = 0
        for p in self.phones.values():
            if p.state == "live":
                lo += 1
                hi += 1
            elif p.state in ("joining", "leaving"):
                hi += 1  # in flight: before or after the registrar acted
            elif p.state in ("vanished", "failed"):
                if p.until > now + EDGE and p.state == "vanished":
                    lo += 1
                if p.until > now - EDGE:
                    hi += 1
        return lo, hi

    def forget_done(self, now: float) -> None:
        """Drop phones that can no longer hold a binding (keeps ``expected`` cheap over an hour)."""
        gone = [
            k
            for k, p in self.phones.items()
            if p.state == "left" or (p.state in ("vanished", "failed") and p.until < now - 3 * EDGE)
        ]
        for k in gone:
            del self.phones[k]


# ------------------------------------------------------------------------------------------ stable phones


@dataclass
class Stable:
    """The stable phones of one registrar process, refreshed by poissongen runs back to back."""

    gen: str
    target: tuple[str, int]
    domain: str
    cfg: SoakConfig
    workdir: Path
    rate: float = 1000.0  # REGISTER/s
    source_port: int = field(default_factory=free_port)
    cseq: int = 1
    first_user: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, Any] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None

    def argv(self) -> list[str]:
        c = self.cfg
        return [
            self.gen,
            "-target", f"{self.target[0]}:{self.target[1]}",
            "-users", str(c.users),
            "-expires", str(c.expires),
            "-sockets", "1",
            "-local-ports", str(self.source_port),
            "-timeout", "2s",
            "-cseq-base", str(self.cseq),
            "-callid-tag", "soak",
            "-domain", self.domain,
        ]  # fmt: skip

    async def _run(self, argv: list[str], timeout: float) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "poissongen.stderr").open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True
            )
            try:
                out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
            finally:
                if self.proc.returncode is None:  # cancelled or timed out: stop it by its PID
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.proc.pid, signal.SIGKILL)
                    await self.proc.wait()
        if self.proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited {self.proc.returncode}")
        report: dict[str, Any] = json.loads(out)
        self.cseq = int(report["cseq_next"])
        self.first_user = int(report["first_user_next"])
        return report

    async def register(self, held: Callable[[], int]) -> None:
        """Every user once, paced at ``warmup_rate``. poissongen does not retransmit, so on a busy machine a
        first REGISTER answered after its 2-s timeout counts as lost although the registrar holds it: the
        pass is repeated (a user already registered is then absorbed as a refresh) until ``held()``, the
        registrar's bindings, counts every user."""
        argv: list[str] = []
        for _ in range(4):
            argv = [*self.argv(), "-warmup", "-warmup-rate", str(self.cfg.warmup_rate), "-duration", "0"]
            rep = await self._run(argv, self.cfg.users / self.cfg.warmup_rate + 60)
            w = rep["warmup"]
            self.warmup.setdefault("passes", []).append({"responses": w["responses"], "lost": w["lost"]})
            await asyncio.sleep(2)
            if await asyncio.to_thread(held) >= self.cfg.users:
                self.warmup["command"] = shlex.join(argv)
                return
        raise RuntimeError(f"registering the stable phones of {self.target} failed: {self.warmup}")

    def refresh_argv(self, seconds: float) -> list[str]:
        """One run of refreshes at ``rate`` for ``seconds``, going on from where the last run stopped."""
        argv = [*self.argv(), "-rate", str(self.rate), "-duration", f"{seconds:.3f}"]
        return [*argv, "-first-user", str(self.first_user)]

    async def refresh(self, seconds: float) -> dict[str, Any]:
        """poissongen's report of one :meth:`refresh_argv` run."""
        return await self._run(self.refresh_argv(seconds), seconds + 60)

    async def refresh_until(self, t_end: float, t0: float) -> None:
        """poissongen runs of ``chunk`` s until monotonic ``t_end``."""
        while (left := t_end - time.monotonic()) > 1.0:
            seconds = min(self.cfg.chunk, left)
            start = time.monotonic() - t0
            try:
                rep = await self.refresh(seconds)
            except (RuntimeError, ValueError, TimeoutError) as exc:  # noted; the next run goes on
                self.runs.append({"t_start": round(start, 1), "error": str(exc)[:300], "sent": 0, "ok": 0})
                await asyncio.sleep(1)
                continue
            m = rep["measured"]
            self.runs.append(
                {
                    "t_start": round(start, 1),
                    "t_end": round(time.monotonic() - t0, 1),
                    "sent": m["sent"],
                    "ok": m["responses"].get("200", 0),
                    "other": {k: v for k, v in m["responses"].items() if k != "200"},
                    "lost": m["lost"],
                    "achieved_rate": m.get("achieved_send_rate"),
                    "latency_ms": {k: v / 1000 for k, v in m["latency_us"].items() if k != "n"},
                    "generator_cpu_us": m.get("generator_cpu_us_per_send"),
                }
            )
            if not self.cfg.quiet:
                r = self.runs[-1]
                lat = r["latency_ms"]
                print(
                    f"  {self.domain} t={r['t_start']:.0f}-{r['t_end']:.0f}s sent {r['sent']} ok {r['ok']} "
                    f"other {r['other']} lost {r['lost']} p50/p99/max "
                    f"{lat.get('p50', 0):.2f}/{lat.get('p99', 0):.2f}/{lat.get('max', 0):.1f} ms",
                    flush=True,
                )


# ------------------------------------------------------------------------------------------ deployment


@dataclass
class Member:
    name: str
    registrar: Registrar
    stable: Stable | None = None
    churn: Churn | None = None


@dataclass
class Deployment:
    """One mode: Kamailio as main, registrar processes on one etcd prefix."""

    mode: str
    prefix: str
    kam: KamailioMain
    members: list[Member]


def fresh_etcd(workdir: Path, stack: contextlib.ExitStack) -> EtcdServer:
    """An etcd started on an empty data directory, stopped with ``stack``: a run within the last one's leases
    would find its phones' bindings (same Call-IDs, higher CSeqs) and get 400 for every REGISTER."""
    shutil.rmtree(workdir / "etcd", ignore_errors=True)
    etcd = EtcdServer(workdir / "etcd", extra_args=["--quota-backend-bytes", str(8 << 30)])
    stack.callback(etcd.stop)
    etcd.start()
    return etcd


def start_deployments(cfg: SoakConfig, etcd: EtcdServer, stack: contextlib.ExitStack) -> list[Deployment]:
    key_file = cfg.workdir / "handoff.keys"
    key_file.write_text(secrets.token_hex(24) + "\n")
    out: list[Deployment] = []
    for mode in cfg.modes:
        prefix = f"/midregistrar/soak/{mode}/"
        kam = KamailioMain(cfg.workdir / f"kam-{mode}", auth=False, quiet=True)
        stack.callback(kam.stop)
        kam.start()
        members = []
        for i in range(cfg.processes):
            port = free_port()
            extra = [
                "--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix,
                "--internal-address", f"udp:{LOOPBACK}:{port}", "--handoff-key-file", str(key_file),
                "--outgoing-expires", "3600", "--log-level", "warning", "--etcd-hold", str(cfg.etcd_hold),
            ]  # fmt: skip
            reg = Registrar(
                kam.addr, mode=mode, port=port, transports=("udp",), extra=extra,
                workdir=cfg.workdir / f"{mode}-{i}", name=f"{mode}-{i}",
            )  # fmt: skip
            stack.callback(reg.stop)
            reg.launch()
            members.append(Member(f"{mode}-{i}", reg))
        for m in members:
            m.registrar.wait_ready(30)
        out.append(Deployment(mode, prefix, kam, members))
    return out


# ------------------------------------------------------------------------------------------ sampling


class Sampler:
    def __init__(self, cfg: SoakConfig, etcd: EtcdServer, deps: list[Deployment], client: EtcdClient) -> None:
        self.cfg = cfg
        self.etcd = etcd
        self.deps = deps
        self.client = client
        self.rows: list[dict[str, Any]] = []
        self.errors: Counter[str] = Counter()
        self.t0 = time.monotonic()

    async def keys(self, prefix: str) -> dict[str, int]:
        """Keys under ``prefix`` by kind, all counted at one revision (a head and its binding are written and
        deleted together, so heads = bindings for AoRs of one binding)."""
        p = prefix.encode()
        first = await self.client.get_prefix(p + b"aor/", limit=1, keys_only=True)

        async def count(sub: bytes) -> int:
            page = await self.client.get_prefix(p + sub, limit=1, keys_only=True, revision=first.revision)
            return page.count

        aor = first.count
        ctid, claims, members = [await count(s) for s in (b"ctid/", b"claims/", b"members/")]
        return {"heads": aor - ctid, "bindings": ctid, "claims": claims, "members": members}

    async def _read(self, what: str, fn: Callable[[], Any]) -> Any:
        """One blocking read (HTTP, kamcmd, etcdctl) in a thread; None when it fails or takes over 10 s (a
        process too busy to answer its /metrics is a finding, not a reason to stop the soak)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), 10.0)
        except Exception as exc:  # any failure of one read is noted and the sample goes on
            self.errors[f"{what}: {type(exc).__name__}"] += 1
            return None

    async def take(self, phase: str) -> dict[str, Any]:
        now = time.monotonic()
        row: dict[str, Any] = {"t": round(now - self.t0, 2), "phase": phase, "load1": os.getloadavg()[0]}
        for dep in self.deps:
            stable = 0
            before: list[tuple[int, int]] = []
            for m in dep.members:
                pid = m.registrar.pid
                mets = await self._read(
                    f"{m.name} /metrics", partial(metrics, LOOPBACK, m.registrar.http_port)
                )
                row[f"{m.name}.rss_mib"] = round(rss_mib(pid), 2)
                row[f"{m.name}.fds"] = fd_count(pid)
                for col, name in (
                    ("tasks", "midregistrar_asyncio_tasks"),
                    ("bindings", "midregistrar_bindings"),
                    ("cached_aors", "midregistrar_aors"),
                    ("templates", "midregistrar_refresh_templates"),
                    ("leases", "midregistrar_etcd_leases"),
                    ("transactions", "midregistrar_transactions_active"),
                    ("store_503s", "midregistrar_store_unavailable"),
                    ("etcd_calls", "midregistrar_etcd_calls"),
                ):
                    row[f"{m.name}.{col}"] = None if mets is None else metric(mets, name)
                row[f"{m.name}.udp_drops"] = udp_drops(m.registrar.port)
                if m.stable is not None and m.stable.warmup:
                    stable += self.cfg.users
                before.append(m.churn.expected(time.monotonic()) if m.churn else (0, 0))
            try:
                keys: dict[str, int | None] = dict(await asyncio.wait_for(self.keys(dep.prefix), 10.0))
            except Exception as exc:
                self.errors[f"{dep.mode} etcd keys: {type(exc).__name__}"] += 1
                keys = dict.fromkeys(("heads", "bindings", "claims", "members"))
            end = time.monotonic()
            lo = hi = 0
            for m, (a, b) in zip(dep.members, before, strict=True):  # bounds over the time the counts took
                a2, b2 = m.churn.expected(end) if m.churn else (0, 0)
                lo, hi = lo + min(a, a2), hi + max(b, b2)
            for k, v in keys.items():
                row[f"{dep.mode}.keys_{k}"] = v
            row[f"{dep.mode}.expected_lo"] = stable + lo
            row[f"{dep.mode}.expected_hi"] = stable + hi
            size = await self._read(f"{dep.mode} kamcmd", dep.kam.location_size)
            row[f"{dep.mode}.kamailio_contacts"] = None if size is None else size[1]
            row[f"{dep.mode}.kamailio_pss_mib"] = round(pss_mib(dep.kam.pid), 2)
        assert self.etcd.pid is not None
        row["etcd.rss_mib"] = round(rss_mib(self.etcd.pid), 2)
        status = await self._read("etcdctl", partial(self.etcd.etcdctl, "endpoint", "status", "-w", "json"))
        st = json.loads(status)[0]["Status"] if status else {}
        row["etcd.db_mib"] = round(st["dbSize"] / 2**20, 2) if "dbSize" in st else None
        row["etcd.db_in_use_mib"] = round(st["dbSizeInUse"] / 2**20, 2) if "dbSizeInUse" in st else None
        self.rows.append(row)
        return row


# ------------------------------------------------------------------------------------------ figures


@dataclass
class Trend:
    series: str
    n: int
    mean: float
    first: float
    last: float
    lo: float
    hi: float
    slope_per_hour: float
    pct_per_hour: float | None


def fit(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope dy/dt (per second)."""
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 0.0 if den == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den


def trends(rows: list[dict[str, Any]], after: float) -> list[Trend]:
    window = [r for r in rows if r["phase"] == "load" and r["t"] >= after]
    if len(window) < 3:
        return []
    out = []
    for name in rows[0]:
        if name in ("t", "phase"):
            continue
        points = [(float(r["t"]), float(r[name])) for r in window if isinstance(r.get(name), int | float)]
        if len(points) < 3:
            continue
        ts = [t for t, _ in points]
        ys = [y for _, y in points]
        per_hour = fit(ts, ys) * 3600
        mean = statistics.fmean(ys)
        pct = per_hour / mean * 100 if mean else None
        out.append(Trend(name, len(ys), mean, ys[0], ys[-1], min(ys), max(ys), per_hour, pct))
    return out


@dataclass
class SoakResult:
    cfg: SoakConfig
    rows: list[dict[str, Any]]
    baseline: dict[str, Any]  # idle, after the stable phones registered, before any load
    final: dict[str, Any]  # idle again, after the load and every churn binding's expiry
    trends: list[Trend]
    churn: dict[str, ChurnStats]
    stable: dict[str, list[dict[str, Any]]]
    stable_warmup: dict[str, dict[str, Any]]
    registrar_commands: list[str]
    sample_errors: dict[str, int] = field(default_factory=dict)  # reads that failed or took over 10 s
    csv_path: Path | None = None

    def churn_created(self, member: str) -> int:
        """Churn bindings the registrar may have created (each is deleted once, leaving one claim key)."""
        s = self.churn[member]
        return s.joined + sum(v for k, v in s.errors.items() if k.startswith("join"))


async def drive(cfg: SoakConfig, etcd: EtcdServer, deps: list[Deployment], gen: str) -> SoakResult:

    def say(*parts: object) -> None:
        if not cfg.quiet:
            print(*parts, flush=True)

    loop = asyncio.get_running_loop()
    async with EtcdClient([etcd.endpoint], timeout=10.0, keepalive_time=60.0) as client:
        sampler = Sampler(cfg, etcd, deps, client)
        members = [m for d in deps for m in d.members]
        for m in members:
            domain = f"{m.name}.soak"
            rate = cfg.rates[m.name.rsplit("-", 1)[0]]
            m.stable = Stable(gen, m.registrar.addr, domain, cfg, cfg.workdir / m.name / "poissongen", rate)
            churn = m.churn = Churn(m.name, m.registrar.addr, domain, cfg)
            await loop.create_datagram_endpoint(lambda: churn, local_addr=(LOOPBACK, 0))  # noqa: B023 (awaited here)
        say(f"registering {cfg.users} stable phones on each of {len(members)} processes")
        for m in members:  # one at a time: a new AoR costs an etcd write and a relay
            assert m.stable is not None
            await m.stable.register(partial(_bindings_held, m.registrar))
        await asyncio.sleep(2)
        sampler.t0 = t0 = time.monotonic()
        baseline = await sampler.take("baseline")
        say("baseline:", _brief(baseline))
        t_end = t0 + cfg.duration
        tasks = [asyncio.create_task(m.stable.refresh_until(t_end, t0)) for m in members if m.stable]
        tasks += [asyncio.create_task(m.churn.run()) for m in members if m.churn]
        try:
            next_at = t0
            last_print = 0.0
            while time.monotonic() < t_end:
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise RuntimeError(f"load stopped: {t.exception()!r}")
                row = await sampler.take("load")
                for m in members:
                    assert m.churn is not None
                    m.churn.forget_done(time.monotonic())
                if row["t"] - last_print >= 60 or cfg.interval >= 60:
                    say(f"t={row['t']:.0f}s", _brief(row))
                    last_print = row["t"]
                next_at += cfg.interval
                await asyncio.sleep(max(0.0, min(next_at, t_end) - time.monotonic()))
            for m in members:
                assert m.churn is not None
                m.churn.stopping = True
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(m.churn.stop() for m in members if m.churn))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for m in members:
                if m.churn is not None:
                    m.churn.stopping = True
                    lives = list(m.churn.lives)
                    for life in lives:
                        life.cancel()
                    await asyncio.gather(*lives, return_exceptions=True)
                    if m.churn.transport is not None:
                        m.churn.transport.close()
        # Every churn binding has now stopped refreshing: wait until the last one has expired at its registrar
        # and been De-REGISTERed at Kamailio, then take the idle sample.
        last = max((p.until for m in members if m.churn for p in m.churn.phones.values()), default=0.0)
        wait = max(0.0, last - time.monotonic()) + 3 * EDGE
        say(f"load over; waiting {wait:.0f} s for the churn's bindings to expire")
        await asyncio.sleep(wait)
        final = await sampler.take("final")
        say("final:", _brief(final))
    return SoakResult(
        cfg=cfg,
        rows=sampler.rows,
        baseline=baseline,
        final=final,
        trends=trends(sampler.rows, cfg.warmup),
        churn={m.name: m.churn.stats for m in members if m.churn},
        stable={m.name: m.stable.runs for m in members if m.stable},
        stable_warmup={m.name: m.stable.warmup for m in members if m.stable},
        registrar_commands=[m.registrar.command for m in members],
        sample_errors=dict(sampler.errors),
    )


def _bindings_held(registrar: Registrar) -> int:
    return int(metric(metrics(LOOPBACK, registrar.http_port), "midregistrar_bindings"))


def _brief(row: dict[str, Any]) -> str:
    keep = (
        "rss_mib", "fds", "tasks", "keys_bindings", "expected_lo", "expected_hi", "kamailio_contacts",
        "cached_aors", "templates", "store_503s",
    )  # fmt: skip
    return " ".join(f"{k}={v}" for k, v in row.items() if k.endswith(keep) or k.startswith("etcd.rss"))


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C: every ``finally`` runs and every process is stopped."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_soak(cfg: SoakConfig) -> SoakResult:
    """Start everything, drive the load, stop every process by its PID (also when interrupted)."""
    if find_etcd_binary() is None:
        raise RuntimeError("etcd not found: run `make etcd`")
    gen = build_generator()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    with _signals_stop(), contextlib.ExitStack() as stack:
        etcd = fresh_etcd(cfg.workdir, stack)
        deps = start_deployments(cfg, etcd, stack)
        result = asyncio.run(drive(cfg, etcd, deps, gen))
    result.csv_path = write_results(result)
    return result


async def _ramp(cfg: SoakConfig, member: Member, gen: str, rates: list[float], seconds: float) -> list[str]:
    reg = member.registrar
    stable = Stable(gen, reg.addr, f"{member.name}.soak", cfg, cfg.workdir / member.name / "poissongen")
    await stable.register(partial(_bindings_held, reg))
    rows = [
        "| offered/s | sent | 200 | lost | achieved/s | p50 / p99 / max ms | CPU µs/REG | result |",
        "|" + "---|" * 8,
    ]
    for rate in rates:
        stable.rate = rate
        cpu0 = cpu_seconds(reg.pid)
        await stable.refresh_until(time.monotonic() + seconds, time.monotonic())
        run = stable.runs[-1]
        cpu = (cpu_seconds(reg.pid) - cpu0) / max(1, run["ok"]) * 1e6
        lat = run["latency_ms"]
        ok = run["lost"] == 0 and run["ok"] == run["sent"] and (run["achieved_rate"] or 0) >= 0.95 * rate
        rows.append(
            f"| {rate:,.0f} | {run['sent']:,} | {run['ok']:,} | {run['lost']:,} | {run['achieved_rate']} | "
            f"{lat.get('p50', 0):.2f} / {lat.get('p99', 0):.2f} / {lat.get('max', 0):.1f} | {cpu:.0f} | "
            f"{'pass' if ok else 'FAIL'} |"
        )
        print(rows[-1], flush=True)
        if not ok:
            break
        await asyncio.sleep(40)  # the last run's transactions linger 32 s: each step starts from idle
    return rows


def ramp(cfg: SoakConfig, mode: str, rates: list[float], seconds: float) -> list[str]:
    """The maximum rate of one process of ``mode`` (etcd store, Kamailio as main, ``cfg.users`` phones
    registered): one poissongen run per rate, up to the first that loses an answer or misses the rate."""
    gen = build_generator()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    cfg.modes, cfg.processes = (mode,), 1
    with _signals_stop(), contextlib.ExitStack() as stack:
        etcd = fresh_etcd(cfg.workdir, stack)
        (dep,) = start_deployments(cfg, etcd, stack)
        return asyncio.run(_ramp(cfg, dep.members[0], gen, rates, seconds))


# ------------------------------------------------------------------------------------------ output


def write_results(r: SoakResult) -> Path:
    out = r.cfg.out
    if out is None:
        out = REPO / "bench" / "results" / time.strftime("soak-%Y%m%d-%H%M%S.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for row in r.rows for k in row))
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(r.rows)
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(r.cfg).items()},
        "registrars": r.registrar_commands,
        "trends": [asdict(t) for t in r.trends],
        "churn": {k: {**asdict(v), "errors": dict(v.errors)} for k, v in r.churn.items()},
        "stable_warmup": r.stable_warmup,
        "stable_runs": r.stable,
        "baseline": r.baseline,
        "final": r.final,
        "sample_errors": r.sample_errors,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return out


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f}" if values else "–"


def report(r: SoakResult, command: str) -> str:
    cfg = r.cfg
    lines = [
        f"`{command}` — {os.cpu_count()} cores (shared), {platform.platform()}, at {source_state()}; "
        f"{cfg.duration:.0f} s of load, slopes fitted after {cfg.warmup:.0f} s, samples every "
        f"{cfg.interval:.0f} s; load average at the end {loadavg()}",
        "",
        "| series | mean after warm-up | min – max | first → last | slope per hour | % of mean per hour |",
        "|---|---|---|---|---|---|",
    ]
    for t in r.trends:
        if t.series.endswith(("udp_drops",)) or t.series == "load1":
            continue
        pct = "–" if t.pct_per_hour is None else f"{t.pct_per_hour:+.2f} %"
        lines.append(
            f"| {t.series} | {t.mean:,.1f} | {t.lo:,.1f} – {t.hi:,.1f} | {t.first:,.1f} → {t.last:,.1f} | "
            f"{t.slope_per_hour:+,.2f} | {pct} |"
        )
    lines += [
        "",
        "| phones | REGISTERs | 200 | other answers | lost | success | p50 / p99 / max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, all_runs in r.stable.items():
        runs = [x for x in all_runs if "error" not in x]
        failed_runs = len(all_runs) - len(runs)
        sent = sum(x["sent"] for x in runs)
        ok = sum(x["ok"] for x in runs)
        lost = sum(x["lost"] for x in runs)
        other: Counter[str] = Counter()
        for x in runs:
            other.update(x["other"])
        p50 = statistics.median(x["latency_ms"].get("p50", 0) for x in runs) if runs else 0
        p99s = [x["latency_ms"].get("p99", 0) for x in runs]
        mx = max((x["latency_ms"].get("max", 0) for x in runs), default=0)
        lines.append(
            f"| {name} stable, {len(runs)} poissongen runs"
            f"{f' ({failed_runs} failed)' if failed_runs else ''} | {sent:,} | {ok:,} | "
            f"{dict(other) or '–'} | {lost} | "
            f"{ok / max(1, sent) * 100:.4f} % | {p50:.2f} / {statistics.median(p99s) if p99s else 0:.2f} "
            f"(worst run {max(p99s, default=0):.2f}) / {mx:.1f} |"
        )
    for name, s in r.churn.items():
        for kind, lat in s.latency.items():
            failed = sum(v for k, v in s.errors.items() if k.startswith(kind))
            sent = len(lat) + sum(v for k, v in s.errors.items() if k == f"{kind} timeout")
            ok = len(lat) - sum(v for k, v in s.errors.items() if k.startswith(kind) and "timeout" not in k)
            lines.append(
                f"| {name} churn: {kind} | {sent:,} | {ok:,} | "
                f"{ {k: v for k, v in s.errors.items() if k.startswith(kind)} or '–' } | "
                f"{s.errors.get(f'{kind} timeout', 0)} | {(sent - failed) / max(1, sent) * 100:.4f} % | "
                f"{_ms(lat, 50)} / {_ms(lat, 99)} / {_ms(lat, 100)} |"
            )
        lines.append(
            f"| {name} churn phones | joined {s.joined:,}, left {s.left:,}, vanished {s.vanished:,}, "
            f"failed {s.failed} | | | | | |"
        )
    window = [x for x in r.rows if x["phase"] == "load" and x["t"] >= cfg.warmup]
    for col in sorted(k for k in (window[0] if window else {}) if k.endswith(".etcd_calls")):
        # bursts of writes (lease renewals coming due together) show as samples far above the median
        seen = [x[col] for x in window if x[col] is not None]
        steps = [b - a for a, b in itertools.pairwise(seen)]
        if steps:
            mid, top = statistics.median(steps), max(steps)
            lines += [
                "",
                f"{col} per {cfg.interval:.0f}-s sample after warm-up: median {mid:,.0f}, "
                f"p90 {percentile(steps, 90):,.0f}, max {top:,.0f} (max / median {top / max(1.0, mid):.1f})",
            ]
    if r.sample_errors:
        lines += ["", f"Reads that failed or took over 10 s while sampling: {r.sample_errors}"]
    lines += ["", "| idle, before and after | " + " | ".join(("baseline", "final")) + " |", "|---|---|---|"]
    for k in r.final:
        if k in ("t", "phase", "load1") or k.endswith(("udp_drops", "transactions")):
            continue
        lines.append(f"| {k} | {r.baseline.get(k, '–')} | {r.final[k]} |")
    for name in r.churn:
        mode = name.rsplit("-", 1)[0]
        claims = r.final.get(f"{mode}.keys_claims")
        lines.append(
            f"| {name}: churn bindings created (one claim key each, for 300 s) | | "
            f"{r.churn_created(name):,} (claim keys now {claims}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    ap.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=d.warmup, help="seconds left out of the slopes")
    ap.add_argument("--interval", type=float, default=d.interval, help="seconds between samples")
    ap.add_argument(
        "--rates",
        default=",".join(f"{k}={v:g}" for k, v in d.rates.items()),
        help="stable refreshes/s per process, per mode (default: half of MEASURED_MAX)",
    )
    ap.add_argument("--modes", default=",".join(d.modes), help="contact,aor: one deployment each")
    ap.add_argument("--processes", type=int, default=d.processes, help="registrar processes per mode")
    ap.add_argument("--users", type=int, default=d.users, help="stable phones per process")
    ap.add_argument("--expires", type=int, default=d.expires, help="stable phones' expires")
    ap.add_argument("--warmup-rate", type=float, default=d.warmup_rate, help="first REGISTERs/s, paced")
    ap.add_argument("--chunk", type=float, default=d.chunk, help="seconds per poissongen run")
    ap.add_argument("--join-rate", type=float, default=d.join_rate, help="churn phones joining/s per process")
    ap.add_argument("--churn-expires", type=int, default=d.churn_expires)
    ap.add_argument("--lifetime", type=float, default=d.lifetime, help="churn phones' mean lifetime, s")
    ap.add_argument("--leave-share", type=float, default=d.leave_share, help="share that De-REGISTER")
    ap.add_argument("--etcd-hold", type=int, default=d.etcd_hold, help="the registrars' --etcd-hold, s")
    ap.add_argument("--workdir", type=Path, default=d.workdir, help="process logs and data")
    ap.add_argument("--out", type=Path, help="CSV of the samples (default bench/results/soak-<time>.csv)")
    ap.add_argument("--ramp", choices=["contact", "aor"], help="instead of the soak: find the mode's maximum")
    ap.add_argument("--ramp-rates", default="1000,2000,3000,4000,5000,6000,8000,10000")
    ap.add_argument("--ramp-seconds", type=float, default=15.0)
    args = ap.parse_args(argv)
    cfg = SoakConfig(
        duration=args.duration, warmup=args.warmup, interval=args.interval,
        rates={k: float(v) for k, v in (x.split('=') for x in args.rates.split(','))},
        modes=tuple(m for m in args.modes.split(",") if m), processes=args.processes, users=args.users,
        expires=args.expires, warmup_rate=args.warmup_rate,
        chunk=args.chunk, join_rate=args.join_rate, churn_expires=args.churn_expires,
        lifetime=args.lifetime, leave_share=args.leave_share, etcd_hold=args.etcd_hold, workdir=args.workdir,
        out=args.out,
    )  # fmt: skip
    command = " ".join(["python -m bench.soak_bench", *(argv if argv is not None else sys.argv[1:])])
    print(f"{command}: {json.dumps({k: str(v) for k, v in asdict(cfg).items()})}", flush=True)
    if args.ramp:
        rates = [float(x) for x in args.ramp_rates.split(",")]
        rows = ramp(cfg, args.ramp, rates, args.ramp_seconds)
        print(f"\n`{command}` — {os.cpu_count()} cores (shared), at {source_state()}\n")
        print("\n".join(rows))
        return 0
    result = run_soak(cfg)
    print(report(result, command))
    if result.csv_path is not None:
        print(f"\nsamples: {result.csv_path} (summary: {result.csv_path.with_suffix('.json')})")
    print("registrars: " + "; ".join(result.registrar_commands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
