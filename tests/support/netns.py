"""A network namespace of the test's own, entered by the calling thread, with its firewall for faults.

The fault tests (tests/faults) run etcd, Kamailio, the registrars and the phones inside one such namespace:
its loopback is theirs alone, so the firewall rules that cut a process off, or drop a share of its packets at
random (iptables ``statistic``: the kernel here has no netem), touch nothing of the host's. Entering is per
thread (setns(2)); the processes this thread starts afterwards are born inside. Root only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """Why namespaces cannot be used here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Netns:
    """``ip netns add <name>`` with its loopback up; ``iptables()`` edits its firewall; removed by ``delete()``."""

    def __init__(self, prefix: str = "midreg-faults") -> None:
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *argv: str) -> str:
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], check=True, capture_output=True, text=True, timeout=30
        )
        return out.stdout

    def iptables(self, *rule: str) -> None:
        """One iptables command in the namespace (``-w``: wait for the lock rather than fail)."""
        self.run("iptables", "-w", *rule)

    def flush(self) -> None:
        """Remove every rule: the fault is over."""
        self.iptables("-F", "INPUT")
        self.iptables("-F", "OUTPUT")

    def rules(self) -> str:
        return self.run("iptables", "-w", "-S")

    @contextlib.contextmanager
    def entered(self) -> Iterator[Netns]:
        """The calling thread inside the namespace for the block (sockets it opens, processes it starts)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(home)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)
