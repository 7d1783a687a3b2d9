"""Drain on SIGTERM at the process level (architecture "Networking and flow ownership", issue 6 item 4).

Three `midregistrar run` processes (memory store, mirror mode, one SIPp UAS as the main registrar) sit
behind a tiny UDP forwarder written here, standing in for a Service: it polls each process's /readyz and
sends every new REGISTER transaction to the next ready process (retransmissions follow their transaction).
SIPp phones refresh continuously through it. One process gets SIGTERM: it turns unready at once, still
answers (with the short drain expires) during its grace, exits 0 within grace + timeout, the phones' later
REGISTERs land on the two others, and no REGISTER fails at the phone side.
"""

from __future__ import annotations

import re
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.registrar import Registrar
from tests.support.sip import LOOPBACK, sip_request, status_code, udp_exchange
from tests.support.sipp import Sipp

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sip_tools")]

DRAIN_GRACE = 4.0
DRAIN_EXPIRES = 5
DRAIN_TIMEOUT = 3.0
CALL_ID_RE = re.compile(rb"^(?:Call-ID|i)\s*:\s*(\S+)", re.I | re.M)
EXPIRES_RE = re.compile(rb"^(?:Expires)\s*:\s*(\d+)|;expires=(\d+)", re.I | re.M)


@dataclass
class Forwarder:
    """UDP round-robin over the ready backends, with failover: a stand-in for a Service's endpoints."""

    backends: list[Registrar]
    ready: list[bool] = field(default_factory=list)
    # (time, backend index, Call-ID) of every request forwarded, and (time, index, code, expires) of replies.
    sent: list[tuple[float, int, bytes]] = field(default_factory=list)
    replies: list[tuple[float, int, int | None, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ready = [True] * len(self.backends)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind((LOOPBACK, 0))
        self.up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.up.bind((LOOPBACK, 0))
        self._stop = threading.Event()
        self._next = 0
        self._route: dict[bytes, tuple[int, tuple[str, int]]] = {}
        self._by_addr = {b.addr: i for i, b in enumerate(self.backends)}

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.front.getsockname()
        return (host, port)

    def start(self) -> Forwarder:
        threading.Thread(target=self._poll, daemon=True).start()
        threading.Thread(target=self._relay, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for i, b in enumerate(self.backends):
                self.ready[i] = b.proc is not None and b.proc.poll() is None and b.readyz() == 200
            time.sleep(0.05)

    def _pick(self) -> int:
        for _ in range(len(self.backends)):
            i = self._next % len(self.backends)
            self._next += 1
            if self.ready[i]:
                return i
        raise RuntimeError("no ready backend")

    def _relay(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.front, self.up], [], [], 0.1)
            for sock in readable:
                data, src = sock.recvfrom(65535)
                m = CALL_ID_RE.search(data)
                call_id = m.group(1) if m else b""
                now = time.monotonic()
                if sock is self.front:
                    route = self._route.get(call_id)
                    # A retransmission follows its transaction while that backend lives, else fails over.
                    if route is None or self.backends[route[0]].proc.poll() is not None:  # type: ignore[union-attr]
                        route = (self._pick(), src)
                        self._route[call_id] = route
                    self.sent.append((now, route[0], call_id))
                    self.up.sendto(data, self.backends[route[0]].addr)
                else:
                    idx = self._by_addr.get(src, -1)
                    e = EXPIRES_RE.search(data)
                    expires = int(e.group(1) or e.group(2)) if e else None
                    self.replies.append((now, idx, status_code(data), expires))
                    if call_id in self._route:
                        self.front.sendto(data, self._route[call_id][1])


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[tuple[Sipp, list[Registrar]]]:
    main = Sipp("main_uas", None, timeout_s=110, workdir=tmp_path / "main", trace_msg=False)
    main.start().wait_bound()
    regs: list[Registrar] = []
    try:
        for i in range(3):
            reg = Registrar(
                (LOOPBACK, main.port),
                mode="mirror",
                transports=("udp",),
                extra=[
                    "--drain-grace",
                    str(DRAIN_GRACE),
                    "--drain-expires",
                    str(DRAIN_EXPIRES),
                    "--drain-timeout",
                    str(DRAIN_TIMEOUT),
                ],
                workdir=tmp_path / f"midreg-{i}",
            )
            regs.append(reg.start(ready_timeout=20))
        yield main, regs
    finally:
        for reg in regs:
            reg.stop()
        main.stop()


def test_sigterm_drains_one_of_three_without_a_failed_register(
    cluster3: tuple[Sipp, list[Registrar]], tmp_path: Path
) -> None:
    _main, regs = cluster3
    fwd = Forwarder(regs).start()
    users = tmp_path / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"phone{i};x;example.test\n" for i in range(20)))
    rate, seconds = 25, 14
    phones = Sipp(
        "load_register",
        fwd.addr,
        keys={"expires": 600},
        inf=users,
        rate=rate,
        calls=rate * seconds,
        timeout_s=60,
        trace_msg=False,
        workdir=tmp_path / "phones",
    ).start()
    try:
        time.sleep(4)
        victim = regs[0]
        assert victim.proc is not None
        t_term = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        # Unready at once.
        deadline = time.monotonic() + 1.0
        while victim.readyz() == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert victim.readyz() != 200, "/readyz still 200 after SIGTERM"
        # During its grace it still answers, telling the phone to come back soon (drain expires).
        time.sleep(0.5)
        req = sip_request(
            "REGISTER",
            "sip:example.test",
            (LOOPBACK, 0),
            from_uri="sip:late@example.test",
            to_uri="sip:late@example.test",
            headers=[("Contact", f"<sip:late@{LOOPBACK}:5999>;expires=600"), ("Expires", "600")],
        )
        reply = udp_exchange(victim.addr, req, timeout=2.0)
        assert status_code(reply) == 200, reply
        e = EXPIRES_RE.search(reply or b"")
        assert e is not None and int(e.group(1) or e.group(2)) <= DRAIN_EXPIRES, reply
        # Exits 0 within grace + timeout (+ scheduling slack).
        code = victim.proc.wait(DRAIN_GRACE + DRAIN_TIMEOUT + 3)
        exited_after = time.monotonic() - t_term
        assert code == 0, victim.proc.tail()
        assert exited_after >= DRAIN_GRACE - 0.5, f"exited after {exited_after:.1f}s, before its grace"
        result = phones.wait(timeout=seconds + 30)
    finally:
        if phones.result is None:
            phones.stop()
        fwd.stop()
    assert result.failed == 0, result.describe()
    assert result.successful == rate * seconds, result.describe()
    later = [i for t, i, _ in fwd.sent if t > t_term + 0.5]
    assert later and 0 not in later, "REGISTERs still sent to the drained process"
    assert {1, 2} <= set(later), "the later REGISTERs land on the two others"
    before = {i for t, i, _ in fwd.sent if t < t_term}
    assert before == {0, 1, 2}
    assert all(code == 200 for _, _, code, _ in fwd.replies if code and code >= 200)
