"""The test phones themselves (tests/support/scenarios/cluster_phones.xml run by `Fleet`) facing a slow
registrar: a REGISTER answered after the phone's 4-s timeout is logged lost, then its late answer is logged and
the phone registers again at once; a REGISTER never answered is given up at Timer F (about 32 s) and a new one
sent. Before, SIPp ended a phone on a late answer that came during its pause, and a phone whose REGISTER was
lost sent no new one while SIPp retransmitted the old: every node and fault test that overloads a registrar
relied on neither happening.

The registrar here is the test's own UDP responder, so that when it answers is exact."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from registrar.sip.message import Request, parse_message
from tests.support.phones import Fleet
from tests.support.sip import LOOPBACK, ok_to
from tests.support.sipp import ensure_sip_tools
from tests.support.wait import poll

pytestmark = pytest.mark.integration

LATE_S = 5.5  # after the phone's 4-s timeout, inside its wait for a late answer


@dataclass
class SlowRegistrar:
    """Answers every REGISTER at once, except the first one of `late` (answered LATE_S after it came, twice:
    a transaction answering a retransmission) and the first one of `never`. Counts what it receives."""

    late: str
    never: str
    sock: socket.socket
    received: Counter[tuple[str, int]]
    name: str = "slow"

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def serve(self) -> None:
        first: dict[str, int] = {}
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            request = parse_message(data)
            assert isinstance(request, Request)
            user = re.search(r"sip:([^@]+)@", request.headers.get("to") or "")
            assert user is not None
            cseq = int((request.headers.get("cseq") or "0").split()[0])
            self.received[(user.group(1), cseq)] += 1
            held = first.setdefault(user.group(1), cseq) == cseq and user.group(1) in (self.late, self.never)
            if not held:
                self.sock.sendto(ok_to(request, "slow1"), peer)
            elif user.group(1) == self.late and self.received[(self.late, cseq)] == 1:
                threading.Timer(LATE_S, self._late, (ok_to(request, "slow1"), peer)).start()

    def _late(self, answer: bytes, peer: tuple[str, int]) -> None:
        self.sock.sendto(answer, peer)
        time.sleep(0.3)
        self.sock.sendto(answer, peer)


@pytest.fixture
def slow() -> Iterator[SlowRegistrar]:
    assert ensure_sip_tools()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    reg = SlowRegistrar("late", "never", sock, Counter())
    thread = threading.Thread(target=reg.serve, daemon=True)
    thread.start()
    yield reg
    sock.close()
    thread.join(5)


def lines(fleet: Fleet, user: str) -> list[tuple[str, int, int | None]]:
    """(kind, cseq, at) of a user's outcome lines, in order: kind is "ok", "lost", "LATE 200"..."""
    out = []
    for ln in fleet.log_lines():
        m = re.match(r"(REG \S+|LATE \d+) user=(\S+) cseq=(\d+)(?: at=(\d+))?", ln)
        if m and m.group(2) == user:
            kind = m.group(1).removeprefix("REG ")
            out.append((kind, int(m.group(3)), int(m.group(4)) if m.group(4) else None))
    return out


def test_a_late_answer_is_logged_and_a_lost_register_is_given_up_at_timer_f(
    tmp_path: Path, slow: SlowRegistrar
) -> None:
    fleet = Fleet(tmp_path, "f", ["late", "never", "prompt"], expires=60, every_ms=10_000)
    try:
        fleet.start(slow)
        # The late one: lost at 4 s, its answer logged, a new REGISTER answered at once, then refreshing.
        assert poll(lambda: len([k for k, _, _ in lines(fleet, "late") if k == "ok"]) >= 2, 30), (
            fleet.describe()
        )
        (lost, late, ok1, ok2) = lines(fleet, "late")[:4]
        assert (lost[0], late[0], ok1[0], ok2[0]) == ("lost", "LATE 200", "ok", "ok"), lines(fleet, "late")
        assert lost[1] == late[1] and late[2] is not None and ok1[2] is not None
        assert LATE_S - 0.5 <= (late[2] - late[1]) / 1000 <= LATE_S + 1.0, late
        assert 0 <= (ok1[1] - late[2]) / 1000 <= 1.0, (late, ok1)
        assert 9.5 <= (ok2[1] - ok1[2]) / 1000 <= 11.0, (ok1, ok2)  # the pause after a 200, unchanged
        # The never-answered one: retransmitted until Timer F, then a new REGISTER, answered.
        assert poll(lambda: any(k == "ok" for k, _, _ in lines(fleet, "never")), 45), fleet.describe()
        (lost, ok) = lines(fleet, "never")[:2]
        assert (lost[0], ok[0]) == ("lost", "ok"), lines(fleet, "never")
        assert 30 <= (ok[1] - lost[1]) / 1000 <= 34, (lost, ok)
        assert slow.received[("never", lost[1])] >= 9, "retransmitted as a non-INVITE transaction is"
        assert not [c for (u, c), _ in slow.received.items() if u == "never" and lost[1] < c < ok[1]]
        # The phone that was answered in time saw none of it.
        assert {k for k, _, _ in lines(fleet, "prompt")} == {"ok"}
        assert fleet.running()
    finally:
        fleet.stop()
