"""Several `midregistrar run --store etcd` processes sharing one real etcd prefix, with Kamailio as their main
registrar and SIPp phone fleets (the multi-process integration tests).

- `Node`: one registrar process with `--store etcd` (its own listen, HTTP and internal ports), launched
  without waiting so that three start in parallel; stopped by PID, or killed with SIGKILL;
- `Cluster`: Kamailio (main registrar, no digest: every REGISTER, De-REGISTERs included, is saved whatever
  process sends it) + nodes A, B, C on one etcd prefix + phone fleets; `diag()` gathers every log.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.etcd import EtcdServer
from tests.support.kamailio import KamailioMain, UlContact
from tests.support.phones import Fleet
from tests.support.ports import free_port
from tests.support.registrar import Registrar
from tests.support.sip import LOOPBACK
from tests.support.wait import wait_for


class Node(Registrar):
    """`midregistrar run --store etcd …` named A, B, C…, logging at debug level; `launch()` and `wait_ready()`
    start several at once."""

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
        host: str = LOOPBACK,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``host``: the address its SIP sockets (and so its internal address) bind; ``env``: e.g. a fake
        clock (tests/faults)."""
        self.internal_port = internal_port
        port = free_port()
        internal = f"udp:{host}:{internal_port or port}"
        args = [
            "--store", "etcd",
            "--etcd-endpoints", etcd_endpoint,
            "--etcd-prefix", prefix,
            "--internal-address", internal,
            "--log-level", "debug",
            *extra,
        ]  # fmt: skip
        super().__init__(
            main, mode=mode, port=port, transports=transports, extra=args, workdir=workdir, name=name, host=host,
            env=env,
        )  # fmt: skip
        self.killed = False

    def log_tail(self, n: int = 120) -> str:
        """The last `n` lines of its output, without gRPC's own debug chatter."""
        if self.proc is None:
            return ""
        lines = [ln for ln in self.proc.output().splitlines() if ln.strip() and " grpc" not in ln[:60]]
        return "\n".join(lines[-n:])

    def log_lines(self, needle: str) -> list[str]:
        if self.proc is None:
            return []
        return [ln for ln in self.proc.output().splitlines() if needle in ln]

    def kill9(self) -> None:
        """SIGKILL by PID: no drain, no clean-up (a crashed pod)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True

    def view(self, aor: str) -> dict[str, Any] | None:
        """GET /v1/aors/{aor} (None when unknown or when the node does not answer 200)."""
        try:
            return self.aor_view(aor)
        except (OSError, ValueError):
            return None

    def contacts(self, aor: str) -> list[str]:
        v = self.view(aor)
        return [b["contact"] for b in v["bindings"]] if v else []

    def metrics(self) -> dict[str, float]:
        """GET /metrics ({} when the node does not answer)."""
        try:
            return super().metrics()
        except OSError:
            return {}


def dereg_line(line: str) -> bool:
    """A Kamailio "REGISTER n=…" log line of a de-registration (Contact ;expires=0 or Expires: 0)."""
    ct = line.split(" ct=", 1)[1] if " ct=" in line else ""
    return bool(re.search(r";\s*expires=0(?!\d)", ct) or re.search(r" exp=0(?!\d)", line))


class Cluster:
    """Kamailio main + nodes sharing one etcd prefix + fleets; everything is stopped by PID in `stop()`."""

    def __init__(self, tmp: Path, etcd: EtcdServer, prefix: str) -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.prefix = prefix
        # The nodes authenticate their hand-offs with a shared key (registrar.core.handoff).
        self.key_file = tmp / "handoff.keys"
        self.key_file.write_text(secrets.token_hex(24) + "\n")
        self.kam: KamailioMain | None = None
        self.nodes: dict[str, Node] = {}
        self.fleets: list[Fleet] = []
        self.notes: list[str] = []

    def start(
        self,
        mode: str,
        names: Iterable[str] = ("A", "B", "C"),
        extra: Sequence[str] = (),
        transports: Sequence[str] = ("udp",),
        node_extra: Mapping[str, Sequence[str]] | None = None,
    ) -> Cluster:
        """Kamailio, then the named nodes, each with ``extra`` and its own ``node_extra[name]``."""
        self.kam = KamailioMain(self.tmp / "kamailio", auth=False).start()
        endpoint = self.etcd.endpoint
        for name in names:
            self.nodes[name] = Node(
                name, self.kam.addr, endpoint, self.prefix, mode=mode, workdir=self.tmp / f"node-{name}",
                extra=[*extra, "--handoff-key-file", str(self.key_file), *(node_extra or {}).get(name, ())],
                transports=transports,
            )  # fmt: skip
        for node in self.nodes.values():
            node.launch()
        for node in self.nodes.values():
            node.wait_ready(30)
        # Ready is not yet knowing every peer: processes started together learn of each other through their
        # watches, 20-70 ms later, and a hand-off meanwhile is refused (or a call finds no live owner: 480).
        # Deployed processes start apart; the tests start them at once, so they wait for that.
        count = len(self.nodes)

        def every_node_sees_all() -> bool:
            return all(n.metrics().get("midregistrar_members") == count for n in self.nodes.values())

        wait_for(every_node_sees_all, 10, f"every node sees {count} members", interval=0.01)
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

    def kam_contacts(self, aor_user: str) -> list[UlContact]:
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
