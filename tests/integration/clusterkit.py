"""A cluster of `midregistrar run` processes sharing one real etcd, for tests/integration/test_cluster_etcd.py
(issue 4, item 7). Built on `sipkit` (processes, SIPp), `kamailio/thrkit` (Kamailio as main registrar) and
`tests/etcdkit` (the etcd server).

- `Node`: one registrar process with `--store etcd` (its own listen, HTTP and internal ports), launched
  without waiting so that three start in parallel; stopped by PID, or killed with SIGKILL;
- `Cluster`: Kamailio (main registrar, no digest: every REGISTER, De-REGISTERs included, is saved whatever
  process sends it) + nodes A, B, C on one etcd prefix + phone fleets; `diag()` gathers every log;
- `Fleet`: SIPp phones (scenarios/cluster_phones.xml, one user per call) on one fixed local port, that can be
  re-targeted to another node without changing Call-ID, CSeq order or Contact;
- `place_calls()`: a main-side SIPp UAC (scenarios/cluster_invite_uac.xml) calling contacts through a node;
- `received_invites()`: the INVITEs a fleet received, with their Via headers (who sent them);
- `UdpPhone`: a raw-socket phone (exact timing, for the race of T59).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

HERE = Path(__file__).resolve().parent
for extra_path in (HERE, HERE / "kamailio"):
    if str(extra_path) not in sys.path:
        sys.path.insert(0, str(extra_path))

import sipkit  # noqa: E402
import thrkit  # noqa: E402

LOOP = sipkit.LOOPBACK
DOMAIN = "example.test"


# ------------------------------------------------------------------------------------------------ nodes


class Node(sipkit.Registrar):
    """`midregistrar run --store etcd …` (sipkit.Registrar puts `--store memory` first; the later
    `--store etcd` wins). `launch()` starts the process, `wait_ready()` waits for /readyz 200."""

    def __init__(
        self,
        name: str,
        main: tuple[str, int],
        etcd_endpoint: str,
        prefix: str,
        *,
        mode: str,
        workdir: Path,
        extra: Sequence[str] = (),
        internal_port: int | None = None,
        transports: Sequence[str] = ("udp",),
    ) -> None:
        self.name = name
        self.internal_port = internal_port
        port = sipkit.free_port()
        internal = f"udp:{LOOP}:{internal_port or port}"
        args = [
            "--store", "etcd",
            "--etcd-endpoints", etcd_endpoint,
            "--etcd-prefix", prefix,
            "--internal-address", internal,
            "--log-level", "debug",
            *extra,
        ]  # fmt: skip
        super().__init__(main, mode=mode, port=port, transports=transports, extra=args, workdir=workdir)
        self.killed = False

    def launch(self) -> Node:
        self.proc = sipkit.Proc(self.argv, self.workdir, "midregistrar", env=self.env)
        return self

    def wait_ready(self, timeout: float = 20.0) -> Node:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.command}\n{self.proc.tail(60)}"
                )
            if self.readyz() == 200 and sipkit.port_bound(self.port, "udp"):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready within {timeout} s:\n{self.command}\n{self.proc.tail(60)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 120) -> str:
        """The last `n` lines of its output, without gRPC's own debug chatter."""
        if self.proc is None:
            return ""
        text = self.proc.stdout() + "\n" + self.proc.stderr()
        lines = [ln for ln in text.splitlines() if ln.strip() and " grpc" not in ln[:60]]
        return "\n".join(lines[-n:])

    def log_lines(self, needle: str) -> list[str]:
        if self.proc is None:
            return []
        text = self.proc.stdout() + "\n" + self.proc.stderr()
        return [ln for ln in text.splitlines() if needle in ln]

    def kill9(self) -> None:
        """SIGKILL by PID: no drain, no clean-up (a crashed pod)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True

    def view(self, aor: str) -> dict | None:
        """GET /v1/aors/{aor} (None when unknown or when the node does not answer 200)."""
        try:
            return thrkit.aor_view(self, aor)
        except (OSError, ValueError):
            return None

    def contacts(self, aor: str) -> list[str]:
        v = self.view(aor)
        return [b["contact"] for b in v["bindings"]] if v else []

    def metrics(self) -> dict[str, float]:
        try:
            return thrkit.metrics(self)
        except OSError:
            return {}


# ------------------------------------------------------------------------------------------------ phones


class Target(Protocol):
    """Where a fleet sends its REGISTERs: a registrar process, or a Kubernetes Service or node address."""

    name: str

    @property
    def addr(self) -> tuple[str, int]: ...


class Fleet:
    """SIPp phones, one per user, on ONE fixed local UDP port, each looping REGISTER every `every_ms`.

    `start(node)` (and `retarget(node)`) run scenarios/cluster_phones.xml towards a node; every run keeps the
    users' Call-IDs (`-cid_str %u-<name>@test`), Contacts (same port) and CSeq order (time based), so a
    re-targeted phone is the same phone refreshing through another process. Answers INVITEs
    (scenarios/cluster_answer_ooc.xml)."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        users: Sequence[str],
        *,
        expires: int,
        every_ms: int,
        domain: str = DOMAIN,
        transport: str = "u1",
        local_ip: str = LOOP,
    ) -> None:
        self.transport = transport
        self.local_ip = local_ip
        self.tmp = tmp
        self.name = name
        self.users = list(users)
        self.expires = expires
        self.every_ms = every_ms
        self.domain = domain
        self.port = sipkit.free_port()
        self.cseq_base = int(time.time()) - 1
        self.inf = tmp / f"{name}.users.csv"
        self.inf.parent.mkdir(parents=True, exist_ok=True)
        self.inf.write_text("SEQUENTIAL\n" + "".join(f"{u};\n" for u in self.users))
        self.runs: list[tuple[str, sipkit.Sipp]] = []  # (node name, SIPp run)

    @property
    def sipp(self) -> sipkit.Sipp | None:
        return self.runs[-1][1] if self.runs else None

    def contact(self, user: str) -> str:
        return f"sip:{user}@{self.local_ip}:{self.port}"

    def aor(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def start(self, node: Target) -> Fleet:
        n = len(self.users)
        run = len(self.runs) + 1
        sipp = sipkit.Sipp(
            "cluster_phones",
            node.addr,
            port=self.port,
            local_ip=self.local_ip,
            transport=self.transport,
            keys={"domain": self.domain, "expires": self.expires, "cseq_base": self.cseq_base},
            calls=n,
            rate=max(10, n * 2),
            limit=n,
            inf=self.inf,
            workdir=self.tmp / f"fleet-{self.name}-{run}-{node.name}",
            name=f"{self.name}{run}",
            extra=[
                "-d", str(self.every_ms),
                "-cid_str", f"%u-{self.name}@test",
                "-oocsf", str(sipkit.SCENARIOS / "cluster_answer_ooc.xml"),
            ],
        )  # fmt: skip
        # The previous run may still hold the port for a moment after it exits.
        deadline = time.monotonic() + 5
        kind = "tcp" if self.transport.startswith("t") else "udp"
        while sipkit.port_bound(self.port, kind) and time.monotonic() < deadline:
            time.sleep(0.05)
        sipp.start()
        sipp.wait_bound()
        self.runs.append((node.name, sipp))
        return self

    def stop(self) -> None:
        if self.sipp is not None and self.sipp.running():
            self.sipp.stop()

    def retarget(self, node: Target) -> Fleet:
        self.stop()
        return self.start(node)

    def running(self) -> bool:
        return self.sipp is not None and self.sipp.running()

    def log_lines(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for _, sipp in self.runs:
            out += thrkit.log_lines(sipp, prefix)
        return out

    def count(self, prefix: str, user: str | None = None) -> int:
        lines = self.log_lines(prefix)
        if user is None:
            return len(lines)
        return sum(1 for ln in lines if f" user={user} " in ln)

    def ok_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.users, 0)
        for ln in self.log_lines("REG ok "):
            m = re.search(r" user=(\S+) ", ln)
            if m and m.group(1) in counts:
                counts[m.group(1)] += 1
        return counts

    def wait_ok(self, at_least: dict[str, int] | int, timeout: float) -> bool:
        """Every user has at least `at_least` 200s in all runs so far; given a dict (earlier `ok_counts()`),
        every user has at least one 200 more than it says."""

        def done() -> bool:
            counts = self.ok_counts()
            return all(
                counts[u] >= (at_least if isinstance(at_least, int) else at_least.get(u, 0) + 1)
                for u in self.users
            )

        return bool(thrkit.wait_for(done, timeout, interval=0.1))

    def messages(self) -> str:
        return "\n".join(sipkit.SippResult(None, sipp.workdir, sipp.argv).messages for _, sipp in self.runs)

    def describe(self) -> str:
        parts = []
        for node, sipp in self.runs:
            res = sipkit.SippResult(
                sipp.proc.returncode if sipp.proc else None,
                sipp.workdir,
                sipp.argv,
                stderr=sipp.proc.stderr() if sipp.proc else "",
            )
            tail = "\n".join(res.logs[-15:])
            parts.append(
                f"--- fleet {self.name} run via {node} (port {self.port}) rc={res.returncode}\n"
                f"{res.stderr[-1500:]}\n{res.errors[-1500:]}\n{tail}"
            )
        return "\n".join(parts)


@dataclass
class SipMessage:
    direction: str  # "received" or "sent"
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\r\n", 1)[0].split("\n", 1)[0].strip()

    @property
    def method(self) -> str | None:
        m = re.match(r"([A-Z]+) \S+ SIP/2\.0", self.first_line)
        return m.group(1) if m else None

    @property
    def ruri(self) -> str | None:
        m = re.match(r"[A-Z]+ (\S+) SIP/2\.0", self.first_line)
        return m.group(1) if m else None

    def headers(self, name: str) -> list[str]:
        """Values of a header (long name; one value per header line, comma-separated lists split)."""
        head = re.split(r"\r?\n\r?\n", self.text, maxsplit=1)[0]
        out: list[str] = []
        for line in head.splitlines()[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() in (name.lower(), {"via": "v"}.get(name.lower(), "\0")):
                out += [p.strip() for p in v.split(",") if p.strip()]
        return out

    @property
    def vias(self) -> list[str]:
        return self.headers("Via")


def parse_trace(text: str) -> list[SipMessage]:
    """SIPp's -trace_msg file: blocks "---- date\\nUDP message received [n] bytes :\\n\\n<message>"."""
    out: list[SipMessage] = []
    for block in re.split(r"(?m)^-{20,}.*$", text):
        m = re.search(r"message (received|sent)[^\n]*\n", block)
        if not m:
            continue
        body = block[m.end() :].strip("\r\n")
        if body:
            out.append(SipMessage(m.group(1), body))
    return out


def received_invites(fleet: Fleet) -> list[SipMessage]:
    return [m for m in parse_trace(fleet.messages()) if m.direction == "received" and m.method == "INVITE"]


def via_port(via: str) -> int | None:
    m = re.match(r"SIP/2\.0/\w+\s+[^:;\s]+:(\d+)", via)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------ calls


@dataclass
class CallTarget:
    label: str  # who should answer (the phone's user)
    uri: str  # the contact the main registrar holds (Request-URI)


def split_uri(uri: str) -> tuple[str, str, str]:
    """sip:user@host:port;param → (user, host:port, 'param' or 'transport=udp')."""
    m = re.match(r"sips?:([^@]+)@([^;>]+)(?:;(.*))?$", uri)
    if m is None:
        raise ValueError(f"not a contact URI: {uri}")
    params = (m.group(3) or "").split(";")[0] or "transport=udp"
    return m.group(1), m.group(2), params


@dataclass
class CallOutcome:
    result: sipkit.SippResult
    finals: dict[str, str] = field(default_factory=dict)  # label → final code ("200", "480", "" = none)

    def failed(self) -> dict[str, str]:
        return {k: v for k, v in self.finals.items() if v != "200"}


def place_calls(
    tmp: Path,
    node: Target,
    targets: Sequence[CallTarget],
    name: str,
    rate: float = 20,
    wait: float = 60,
    recv_timeout_ms: int = 12000,
    local_ip: str = LOOP,
) -> CallOutcome:
    """One main-side call per target, all through `node` (SIPp's remote address)."""
    inf = tmp / f"{name}.calls.csv"
    inf.parent.mkdir(parents=True, exist_ok=True)
    rows = ["SEQUENTIAL"]
    for t in targets:
        user, hostport, param = split_uri(t.uri)
        rows.append(f"{t.label};{user};{hostport};{param};")
    inf.write_text("\n".join(rows) + "\n")
    n = len(targets)
    result = sipkit.run_sipp(
        "cluster_invite_uac",
        node.addr,
        calls=n,
        rate=rate,
        limit=n,
        inf=inf,
        wait=wait,
        timeout_s=wait - 5,
        workdir=tmp / f"calls-{name}",
        name=name,
        local_ip=local_ip,
        extra=["-recv_timeout", str(recv_timeout_ms)],
    )
    finals = {t.label: "" for t in targets}
    for ln in result.logs:
        m = re.match(r"INVITE final=(\d+) label=(\S+)", ln)
        if m:
            finals[m.group(2)] = m.group(1)
    return CallOutcome(result, finals)


# --------------------------------------------------------------------------------------------- cluster


def dereg_line(line: str) -> bool:
    """A Kamailio "REGISTER n=…" log line of a de-registration (Contact ;expires=0 or Expires: 0)."""
    ct = line.split(" ct=", 1)[1] if " ct=" in line else ""
    return bool(re.search(r";\s*expires=0(?!\d)", ct) or re.search(r" exp=0(?!\d)", line))


class Cluster:
    """Kamailio main + nodes sharing one etcd prefix + fleets; everything is stopped by PID in `stop()`."""

    def __init__(self, tmp: Path, etcd: object, prefix: str) -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.prefix = prefix
        self.kam: thrkit.KamailioMain | None = None
        self.nodes: dict[str, Node] = {}
        self.fleets: list[Fleet] = []
        self.notes: list[str] = []

    def start(
        self,
        mode: str,
        names: Iterable[str] = ("A", "B", "C"),
        extra: Sequence[str] = (),
        transports: Sequence[str] = ("udp",),
    ) -> Cluster:
        self.kam = thrkit.KamailioMain(self.tmp / "kamailio", auth=False).start()
        endpoint = self.etcd.endpoint  # type: ignore[attr-defined]
        for name in names:
            self.nodes[name] = Node(
                name, self.kam.addr, endpoint, self.prefix, mode=mode, workdir=self.tmp / f"node-{name}",
                extra=extra, transports=transports,
            )  # fmt: skip
        for node in self.nodes.values():
            node.launch()
        for node in self.nodes.values():
            node.wait_ready(30)
        return self

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def fleet(
        self,
        name: str,
        users: Sequence[str],
        node: Node,
        *,
        expires: int,
        every_ms: int,
        transport: str = "u1",
    ) -> Fleet:
        f = Fleet(self.tmp, name, users, expires=expires, every_ms=every_ms, transport=transport)
        self.fleets.append(f)
        return f.start(node)

    def stop(self) -> None:
        for f in self.fleets:
            with contextlib.suppress(Exception):
                f.stop()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop(timeout=5)
        if self.kam is not None:
            with contextlib.suppress(Exception):
                self.kam.stop()

    def alive(self) -> dict[str, bool]:
        return {n: node.alive() for n, node in self.nodes.items()}

    def kam_contacts(self, aor_user: str) -> list[thrkit.UlContact]:
        assert self.kam is not None
        return self.kam.contacts_of(aor_user)

    def kam_register_lines(self) -> list[str]:
        assert self.kam is not None
        return self.kam.register_lines()

    def kam_deregs(self, needle: str = "") -> list[str]:
        return [ln for ln in self.kam_register_lines() if dereg_line(ln) and needle in ln]

    def diag(self, *more: object, node_lines: int = 120) -> str:
        parts = [str(m) for m in more] + self.notes
        parts.append(f"etcd prefix {self.prefix}; alive {self.alive()}")
        for node in self.nodes.values():
            if node.proc is not None:
                parts.append(
                    f"--- node {node.name} pid {node.proc.pid} rc={node.proc.poll()} sip {node.port} "
                    f"http {node.http_port}: {node.command}\n{node.log_tail(node_lines)}"
                )
        for f in self.fleets:
            parts.append(f.describe())
        if self.kam is not None:
            lines = self.kam.log().splitlines()
            parts.append("--- kamailio (last 40 lines)\n" + "\n".join(lines[-40:]))
        return "\n".join(parts)


def poll_until(pred: Callable[[], object], timeout: float, interval: float = 0.1) -> object:
    return thrkit.wait_for(pred, timeout, interval)


# ----------------------------------------------------------------------------------------- raw phone


class UdpPhone:
    """A phone on a raw UDP socket: REGISTERs with one Call-ID and a growing CSeq, sent to any node; exact
    control of when each REGISTER leaves (T59). `send_register()` and `recv_final()` are split so two phones
    can fire at the same instant and collect their answers afterwards."""

    def __init__(self, user: str, domain: str = DOMAIN) -> None:
        self.user = user
        self.domain = domain
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOP, 0))
        self.port = self.sock.getsockname()[1]
        self.call_id = uuid.uuid4().hex + "@udpphone"
        self.cseq = 0
        self.tag = uuid.uuid4().hex[:8]
        self.lock = threading.Lock()

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{LOOP}:{self.port}"

    def register_bytes(self, expires: int) -> bytes:
        self.cseq += 1
        branch = "z9hG4bK-" + uuid.uuid4().hex[:16]
        lines = [
            f"REGISTER sip:{self.domain} SIP/2.0",
            f"Via: SIP/2.0/UDP {LOOP}:{self.port};rport;branch={branch}",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{self.domain}>;tag={self.tag}",
            f"To: <sip:{self.user}@{self.domain}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
            f"Contact: <{self.contact}>;expires={expires}",
            "User-Agent: clusterkit-udp-phone",
            "Content-Length: 0",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def send_register(self, dest: tuple[str, int], expires: int) -> bytes:
        data = self.register_bytes(expires)
        self.sock.sendto(data, dest)
        return data

    def recv_final(self, data: bytes, dest: tuple[str, int], timeout: float = 8.0) -> bytes | None:
        """The final response to `data` (retransmitted every 500 ms like a UA over UDP)."""
        deadline = time.monotonic() + timeout
        next_retx = time.monotonic() + 0.5
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            self.sock.settimeout(max(0.01, min(deadline, next_retx) - now))
            try:
                reply, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                if time.monotonic() >= next_retx:
                    self.sock.sendto(data, dest)
                    next_retx = time.monotonic() + 0.5
                continue
            code = sipkit.status_code(reply)
            if code is not None and code >= 200 and f"CSeq: {self.cseq} REGISTER".encode() in reply:
                return reply

    def register(self, dest: tuple[str, int], expires: int, timeout: float = 8.0) -> bytes | None:
        data = self.send_register(dest, expires)
        return self.recv_final(data, dest, timeout)

    def close(self) -> None:
        self.sock.close()
