"""Phones for the cluster and node tests: SIPp fleets that keep refreshing and can be re-targeted, calls placed
from the main registrar's side, and a raw-socket phone for exact timing.

- `Fleet`: SIPp phones (scenarios/cluster_phones.xml, one user per call) on one fixed local port, that can be
  re-targeted to another registrar without changing Call-ID, CSeq order or Contact;
- `place_calls()`: a main-side SIPp UAC (scenarios/cluster_invite_uac.xml) calling contacts through a target;
- `received_invites()`: the INVITEs a fleet received, with their Via headers (who sent them);
- `UdpPhone`: a raw-socket phone (exact timing, for the race of T59).
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.support.ports import free_port, port_bound
from tests.support.sip import LOOPBACK, SipMessage, sip_request, status_code
from tests.support.sipp import SCENARIOS, Sipp, SippResult, parse_trace, run_sipp
from tests.support.wait import poll

DOMAIN = "example.test"


class Reachable(Protocol):
    """Where SIP requests go: a registrar process, Kamailio, a Kubernetes Service or a node's address."""

    @property
    def addr(self) -> tuple[str, int]: ...


class Target(Reachable, Protocol):
    """Where a fleet sends its REGISTERs, named in the fleet's work directories."""

    name: str


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
        local_ip: str = LOOPBACK,
    ) -> None:
        self.transport = transport
        self.local_ip = local_ip
        self.tmp = tmp
        self.name = name
        self.users = list(users)
        self.expires = expires
        self.every_ms = every_ms
        self.domain = domain
        self.port = free_port()
        self.cseq_base = int(time.time()) - 1
        self.inf = tmp / f"{name}.users.csv"
        self.inf.parent.mkdir(parents=True, exist_ok=True)
        self.inf.write_text("SEQUENTIAL\n" + "".join(f"{u};\n" for u in self.users))
        self.runs: list[tuple[str, Sipp]] = []  # (node name, SIPp run)

    @property
    def sipp(self) -> Sipp | None:
        return self.runs[-1][1] if self.runs else None

    def contact(self, user: str) -> str:
        return f"sip:{user}@{self.local_ip}:{self.port}"

    def aor(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def start(self, node: Target) -> Fleet:
        n = len(self.users)
        run = len(self.runs) + 1
        sipp = Sipp(
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
                "-oocsf", str(SCENARIOS / "cluster_answer_ooc.xml"),
            ],
        )  # fmt: skip
        # The previous run may still hold the port for a moment after it exits.
        kind = "tcp" if self.transport.startswith("t") else "udp"
        poll(lambda: not port_bound(self.port, kind), 5, 0.05)
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
            out += sipp.log_lines(prefix)
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

        return bool(poll(done, timeout, interval=0.1))

    def messages(self) -> str:
        return "\n".join(sipp.traces().messages for _, sipp in self.runs)

    def describe(self) -> str:
        parts = []
        for node, sipp in self.runs:
            res = sipp.traces()
            tail = "\n".join(res.logs[-15:])
            parts.append(
                f"--- fleet {self.name} run via {node} (port {self.port}) rc={res.returncode}\n"
                f"{res.stderr[-1500:]}\n{res.errors[-1500:]}\n{tail}"
            )
        return "\n".join(parts)


def received_invites(fleet: Fleet) -> list[SipMessage]:
    return [m for m in parse_trace(fleet.messages()) if m.direction == "received" and m.method == "INVITE"]


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
    result: SippResult
    finals: dict[str, str] = field(default_factory=dict)  # label → final code ("200", "480", "" = none)

    def failed(self) -> dict[str, str]:
        return {k: v for k, v in self.finals.items() if v != "200"}


def place_calls(
    tmp: Path,
    node: Reachable,
    targets: Sequence[CallTarget],
    name: str,
    rate: float = 20,
    wait: float = 60,
    recv_timeout_ms: int = 12000,
    local_ip: str = LOOPBACK,
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
    result = run_sipp(
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


class UdpPhone:
    """A phone on a raw UDP socket: REGISTERs with one Call-ID and a growing CSeq, sent to any node; exact
    control of when each REGISTER leaves (T59). `send_register()` and `recv_final()` are split so two phones
    can fire at the same instant and collect their answers afterwards."""

    def __init__(self, user: str, domain: str = DOMAIN) -> None:
        self.user = user
        self.domain = domain
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.call_id = uuid.uuid4().hex + "@udpphone"
        self.cseq = 0
        self.tag = uuid.uuid4().hex[:8]
        self.lock = threading.Lock()

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@{LOOPBACK}:{self.port}"

    def register_bytes(self, expires: int) -> bytes:
        self.cseq += 1
        aor = f"sip:{self.user}@{self.domain}"
        return sip_request(
            "REGISTER",
            f"sip:{self.domain}",
            (LOOPBACK, self.port),
            call_id=self.call_id,
            cseq=self.cseq,
            from_uri=aor,
            from_tag=self.tag,
            to_uri=aor,
            headers=[("Contact", f"<{self.contact}>;expires={expires}"), ("User-Agent", "test-udp-phone")],
        )

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
            code = status_code(reply)
            if code is not None and code >= 200 and f"CSeq: {self.cseq} REGISTER".encode() in reply:
                return reply

    def register(self, dest: tuple[str, int], expires: int, timeout: float = 8.0) -> bytes | None:
        data = self.send_register(dest, expires)
        return self.recv_final(data, dest, timeout)

    def close(self) -> None:
        self.sock.close()
