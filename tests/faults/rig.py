"""The fault rig: a three-member etcd cluster, Kamailio as main registrar, registrar processes A, B, C with the
etcd store, and SIPp phones refreshing through each, all inside a network namespace of the run's own, where
the faults are made (tests/faults/faults.py) and the history is read back for the checker
(tests/faults/history.py).

Addresses inside the namespace (all on its loopback):
- 127.0.1.N: where registrar N reaches the etcd members (each member serves clients there too), so one rule
  on that address cuts process N from all of etcd;
- 127.0.2.N: registrar N's SIP sockets (phones, main, and hand-offs from the other processes);
- 127.0.3.1: the phones; 127.0.4.1: Kamailio; 127.0.4.2: the calls placed from main's side.
HTTP (health, /metrics) stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.history import MainRegister, Phone, Report, check, parse_main_lines, parse_phone_lines
from tests.support.cluster import Node
from tests.support.etcd_cluster import EtcdCluster
from tests.support.kamailio import KamailioMain
from tests.support.netns import Netns
from tests.support.phones import CallTarget, Fleet, place_calls
from tests.support.registrar import metric

NAMES = ("A", "B", "C")
PHONES_IP = "127.0.3.1"
MAIN_IP = "127.0.4.1"
CALLER_IP = "127.0.4.2"


def sip_host(index: int) -> str:
    return f"127.0.2.{index + 1}"


def etcd_host(index: int) -> str:
    return f"127.0.1.{index + 1}"


@dataclass
class RigConfig:
    """The load of a run: per process, ``phones`` refreshing every ``every_ms`` with ``expires``, and
    ``leavers`` that stop refreshing when the fault starts (their bindings expire during or after it)."""

    mode: str = "contact"
    phones: int = 20
    every_ms: int = 3000
    expires: int = 30
    leavers: int = 4
    leaver_expires: int = 6
    outgoing_expires: int = 0  # what the registrars ask of main; 0: four times ``expires``
    node_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # e.g. a fake clock for B


class Rig:
    """Everything of one fault run; ``start()`` inside ``netns.entered()``, ``stop()`` ends every process."""

    def __init__(self, tmp: Path, netns: Netns, config: RigConfig) -> None:
        self.tmp = tmp
        self.netns = netns
        self.config = config
        self.prefix = f"/midregistrar/faults/{secrets.token_hex(4)}/"
        self.etcd = EtcdCluster(tmp / "etcd", 3, client_hosts=[etcd_host(i) for i in range(len(NAMES))])
        self.kam: KamailioMain | None = None
        self.nodes: dict[str, Node] = {}
        self.fleets: dict[str, Fleet] = {}  # "pA": A's phones, "lA": A's leavers
        self.key_file = tmp / "handoff.keys"
        self.key_file.write_text(secrets.token_hex(24) + "\n")
        self.marks: list[tuple[float, str]] = []  # (unix time, what happened)

    def mark(self, what: str) -> None:
        self.marks.append((time.time(), what))

    # -------------------------------------------------------------------------------------------- set-up

    def node_args(self) -> list[str]:
        return [
            "--min-expires", "1",
            "--outgoing-expires", str(self.config.outgoing_expires or 4 * self.config.expires),
            "--etcd-hold", "5",
            "--member-ttl", "2",
            "--etcd-timeout", "1",
            "--handoff-key-file", str(self.key_file),
        ]  # fmt: skip

    def start(self) -> Rig:
        c = self.config
        self.etcd.start()
        self.kam = KamailioMain(self.tmp / "kamailio", auth=False, listen_ip=MAIN_IP).start()
        for i, name in enumerate(NAMES):
            endpoints = ",".join(self.etcd.endpoints(etcd_host(i)))
            self.nodes[name] = Node(
                name, self.kam.addr, endpoints, self.prefix, mode=c.mode, workdir=self.tmp / f"node-{name}",
                extra=self.node_args(), host=sip_host(i), env=c.node_env.get(name),
            )  # fmt: skip
        for node in self.nodes.values():
            node.launch()
        for node in self.nodes.values():
            node.wait_ready(30)
        for name, node in self.nodes.items():
            users = [f"p{name.lower()}{i:03d}" for i in range(c.phones)]
            leavers = [f"l{name.lower()}{i:03d}" for i in range(c.leavers)]
            self.fleets[f"p{name}"] = self._fleet(f"p{name}", users, c.expires, c.every_ms).start(node)
            if leavers:
                self.fleets[f"l{name}"] = self._fleet(f"l{name}", leavers, c.leaver_expires, 2000).start(node)
        for f in self.fleets.values():
            if not f.wait_ok(2, 30):
                raise AssertionError(f"fleet {f.name} did not register\n" + self.diag())
        self.mark("load steady")
        return self

    def _fleet(self, name: str, users: Sequence[str], expires: int, every_ms: int) -> Fleet:
        return Fleet(self.tmp / "phones", name, users, expires=expires, every_ms=every_ms, local_ip=PHONES_IP)

    def stop(self) -> None:
        for f in self.fleets.values():
            with contextlib.suppress(Exception):
                f.stop()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop(timeout=5)
        if self.kam is not None:
            with contextlib.suppress(Exception):
                self.kam.stop()
        self.etcd.stop()

    # ---------------------------------------------------------------------------------------- the faults

    def drop(self, *match: str) -> None:
        """Drop the packets that ``match`` (iptables match arguments) from now until ``heal()``. On arrival
        (INPUT): a packet dropped on its way out (OUTPUT) fails the sender's send() with EPERM, which no
        network does (SIPp then gives up on the phone)."""
        self.netns.iptables("-A", "INPUT", *match, "-j", "DROP")

    def reject(self, *match: str) -> None:
        """Answer the TCP segments that ``match`` with a reset (a host that is up but does not serve)."""
        self.netns.iptables("-A", "INPUT", *match, "-j", "REJECT", "--reject-with", "tcp-reset")

    def heal(self) -> None:
        self.netns.flush()

    def leavers_leave(self) -> None:
        """The leavers stop refreshing (no De-REGISTER): their bindings run out on their own."""
        for name, f in self.fleets.items():
            if name.startswith("l"):
                f.stop()
        self.mark("leavers stopped")

    # ---------------------------------------------------------------------------------------- the checks

    def phones(self) -> list[Phone]:
        out = []
        for name, f in self.fleets.items():
            out += [Phone(u, f.expires, leaver=name.startswith("l")) for u in f.users]
        return out

    def phone_history(self) -> list:  # type: ignore[type-arg]
        out = []
        for f in self.fleets.values():
            out += parse_phone_lines(f.log_lines("REG "), f.cseq_base)
        return out

    def main_history(self) -> list[MainRegister]:
        assert self.kam is not None
        return parse_main_lines(self.kam.register_lines())

    def held_at_main(self) -> dict[str, int]:
        assert self.kam is not None
        held: dict[str, int] = {}
        for ct in self.kam.contacts():
            if ct.expires != 0:
                held[ct.aor] = held.get(ct.aor, 0) + 1
        return held

    def call_live_phones(self, name: str) -> dict[str, str]:
        """A call from main's side to every phone whose last 200 has not run out; user → final code ("" when
        none came, "no contact at main" when main holds none).

        The Request-URI is the contact main holds for the phone; the call goes to the live registrars in
        turn. That is what main does through the Service in front of the pods (docs/operations.md
        "Networking modes"); the rig has no Service, and main's contact names the process that forwarded
        the phone's REGISTER, which may be the one a fault killed."""
        now = time.time()
        expires = {p.user: p.expires for p in self.phones()}
        last: dict[str, float] = {}
        for a in self.phone_history():
            if a.outcome == "ok" and a.answered is not None:
                last[a.user] = max(last.get(a.user, 0.0), a.answered)
        live = sorted(u for u, t in last.items() if t + expires[u] > now + 5)
        assert self.kam is not None
        held: dict[str, str] = {}
        for ct in self.kam.contacts():
            if ct.expires != 0:
                held.setdefault(ct.aor, ct.address)
        finals = {u: "no contact at main" for u in live if u not in held}
        nodes = [n for n in self.nodes.values() if n.alive()]
        for i, node in enumerate(nodes):
            targets = [CallTarget(u, held[u]) for u in live[i :: len(nodes)] if u in held]
            if targets:
                out = place_calls(
                    self.tmp / "calls", node, targets, f"{name}-via-{node.name}", rate=50, wait=60,
                    local_ip=CALLER_IP,
                )  # fmt: skip
                finals.update(out.finals)
        return finals

    def probe_calls(self, fleet: str, via: str, timeout_ms: int = 3000) -> str:
        """Calls to a fleet's phones through one registrar while a fault lasts (not checked: reported, e.g.
        what a hand-off across a cut gives the caller): "code×count, …"."""
        assert self.kam is not None
        held = {ct.aor: ct.address for ct in self.kam.contacts() if ct.expires != 0}
        targets = [CallTarget(u, held[u]) for u in self.fleets[fleet].users if u in held]
        out = place_calls(
            self.tmp / "calls", self.nodes[via], targets, f"probe-{fleet}-via-{via}", rate=50,
            wait=timeout_ms / 1000 + 6, recv_timeout_ms=timeout_ms, local_ip=CALLER_IP,
        )  # fmt: skip
        codes: dict[str, int] = {}
        for code in out.finals.values():
            codes[code or "none"] = codes.get(code or "none", 0) + 1
        return ", ".join(f"{c}×{n}" for c, n in sorted(codes.items()))

    def report(self, fault: str, calls: Mapping[str, str]) -> Report:
        end = time.time()
        rep = check(
            fault,
            self.config.mode,
            self.phones(),
            self.phone_history(),
            self.main_history(),
            end=end,
            calls=calls,
            held_at_main=self.held_at_main(),
        )
        rep.clock_skew = {
            name: metric(node.metrics(), "midregistrar_clock_skew_seconds")
            for name, node in self.nodes.items()
            if node.alive()
        }
        t0 = self.marks[0][0] if self.marks else end
        rep.notes += [f"t+{t - t0:.1f}s {what}" for t, what in self.marks]
        return rep

    def diag(self) -> str:
        parts = [f"etcd prefix {self.prefix}; rules:\n{self.netns.rules()}"]
        for node in self.nodes.values():
            if node.proc is not None:
                parts.append(f"--- node {node.name} rc={node.proc.poll()}\n{node.log_tail(60)}")
        for f in self.fleets.values():
            parts.append(f.describe())
        if self.kam is not None:
            parts.append("--- kamailio\n" + "\n".join(self.kam.log().splitlines()[-30:]))
        return "\n".join(parts)


FaultAction = Callable[[Rig, float], None]
