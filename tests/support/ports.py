"""Loopback ports for the processes the tests and benchmarks start, and what the kernel says about them.

``free_port()`` hands out a port free for both UDP and TCP, below the kernel's ephemeral range (a port from
that range can be taken by any outgoing connection, a readiness poll or a gRPC channel, between the check and
the bind of the process it is meant for), and never one that another live test process holds: every port
handed out is claimed, in a file shared by all test processes on the machine (under an exclusive lock), for
as long as the process that took it lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

from tests.support.process import Proc
from tests.support.wait import wait_for

CLAIMS = Path(tempfile.gettempdir()) / "kube-midregistrar-ports"


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _started(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat): a PID and this name one process,
    even once the PID is reused. None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _bindable(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind((host, port))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for UDP and TCP on ``host``, below the ephemeral range, claimed for this process's life."""
    top = _ephemeral_floor()
    bottom = 10000 if top > 11000 else 1024
    me = f"{os.getpid()} {_started(os.getpid())}"
    rng = random.SystemRandom()
    with open(CLAIMS, "a+") as claims:
        with contextlib.suppress(PermissionError):
            os.chmod(CLAIMS, 0o666)  # shared by every user's test runs
        fcntl.flock(claims, fcntl.LOCK_EX)  # released when the file is closed
        claims.seek(0)
        live: dict[int, str] = {}
        for line in claims.read().splitlines():
            claimed, pid, started = line.split()
            if _started(int(pid)) == started:
                live[int(claimed)] = f"{pid} {started}"
        for _ in range(1000):
            port = rng.randrange(bottom, top)
            if port not in live and _bindable(host, port):
                live[port] = me
                claims.seek(0)
                claims.truncate()
                claims.write("".join(f"{p} {owner}\n" for p, owner in live.items()))
                return port
    raise RuntimeError(f"no free port on {host} between {bottom} and {top}")


def _proc_net(kind: str) -> list[list[str]]:
    try:
        return [line.split() for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]]
    except OSError:
        return []


def port_bound(port: int, kind: str = "udp") -> bool:
    """A socket (IPv4 or IPv6) bound to ``port`` (UDP) or listening on it (TCP), per /proc/net/{udp,tcp}{,6}."""
    for parts in _proc_net(kind) + _proc_net(kind + "6"):
        bound = len(parts) >= 4 and int(parts[1].rsplit(":", 1)[1], 16) == port
        if bound and (kind != "tcp" or parts[3] == "0A"):  # 0A: LISTEN
            return True
    return False


def wait_port(port: int, kind: str = "udp", timeout: float = 10.0, proc: Proc | None = None) -> None:
    """Until something binds ``port``; ``proc``, the process that should, ends the wait if it exits."""
    wait_for(lambda: port_bound(port, kind), timeout, f"{kind}/{port} bound", interval=0.02, proc=proc)


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the IPv4 UDP socket(s) bound to ``port`` (receive buffer full)."""
    return sum(
        int(parts[-1])
        for parts in _proc_net("udp")
        if len(parts) >= 13 and int(parts[1].rsplit(":", 1)[1], 16) == port
    )
