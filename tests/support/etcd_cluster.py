"""A real three-member etcd cluster for the fault tests (tests/faults): the members of
`tests.support.etcd.EtcdServer`, peered on loopback, each stopped, killed or paused by its own PID.

Each member also serves clients on the extra addresses given (``client_hosts``), at its own port: a fault test
gives every registrar process one address of its own and cuts that process from all three members with one
firewall rule on its address (tests/faults/rig.py).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.support.etcd import EtcdServer
from tests.support.wait import wait_for


class EtcdCluster:
    """Members ``etcd-1``…``etcd-n`` on 127.0.0.1 (client and peer ports of their own) and on ``client_hosts``."""

    def __init__(self, workdir: Path, size: int = 3, client_hosts: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.members = [
            EtcdServer(workdir / f"etcd-{i}", name=f"etcd-{i}", client_hosts=list(client_hosts))
            for i in range(1, size + 1)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = "midreg-faults-" + secrets.token_hex(4)
        for m in self.members:
            m.initial_cluster = initial
            m.extra_args += ["--initial-cluster-token", token, "--initial-cluster-state", "new"]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:
            m.launch()
        for m in self.members:
            wait_for(m.healthy, timeout, f"{m.name} healthy", interval=0.1, proc=m.proc)
        return self

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop(timeout=5)

    def endpoints(self, host: str = "127.0.0.1") -> list[str]:
        """Every member's client address on ``host`` (one of 127.0.0.1 and ``client_hosts``)."""
        return [f"{host}:{m.client_port}" for m in self.members]

    def __getitem__(self, name: str) -> EtcdServer:
        return next(m for m in self.members if m.name == name)

    @staticmethod
    def status(member: EtcdServer, timeout: float = 1.0) -> dict[str, str] | None:
        """The member's id and the leader it knows (gRPC gateway /v3/maintenance/status), None when it does
        not answer."""
        req = urllib.request.Request(f"{member.url}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError):
            return None
        return {"id": str(body.get("header", {}).get("member_id", "")), "leader": str(body.get("leader", ""))}

    def leader(self, timeout: float = 15.0) -> EtcdServer:
        """The member every running member names as leader (waits for an election)."""

        def agreed() -> EtcdServer | None:
            seen = {m.name: self.status(m) for m in self.members if m.running()}
            leaders = {s["leader"] for s in seen.values() if s is not None}
            if len(leaders) != 1 or None in seen.values():
                return None
            (lead,) = leaders
            return next((m for m in self.members if seen.get(m.name, {}).get("id") == lead), None)  # type: ignore[union-attr]

        found = wait_for(agreed, timeout, "one etcd leader named by every running member", interval=0.1)
        assert found is not None
        return found

    def followers(self) -> list[EtcdServer]:
        lead = self.leader()
        return [m for m in self.members if m is not lead]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running member healthy (a quorum with a leader)."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.running():
                wait_for(m.healthy, max(0.1, deadline - time.monotonic()), f"{m.name} healthy", interval=0.1)
