"""Loopback ports for the processes the tests and benchmarks start (registrars, SIPp, Kamailio, etcd)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``, never handed out twice by this process, and below the
    kernel's ephemeral range: a port from that range can be taken by any outgoing connection (a readiness
    poll, a gRPC channel) between this check and the bind of the process it is meant for."""
    top = _ephemeral_floor()
    bottom = 10000 if top > 11000 else 1024
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(bottom, top)
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((host, port))
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                    tcp.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} between {bottom} and {top}")
