"""Floods and brute force against a real midregistrar process (docs/operations.md "Floods").

One host floods REGISTERs, then OPTIONS, then garbage (tests/support/flood.py, each kind from its own loopback
address so each meets the limit afresh) while SIPp phones on other addresses keep refreshing through the
registrar to a Kamailio main registrar: the phones keep their 200s, the flood is dropped before parsing,
counted, blocked in the kernel once it reaches ten times the rate, logged a few times only, and the
process's memory stays put. The kernel filter itself is checked on plain sockets; the main registrar's
address is never limited; a digest brute force is slowed without locking the user's honest phones out.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
from pathlib import Path

import pytest

from registrar.net import kernel_filter
from tests.support.flood import DigestPhone, Flooder
from tests.support.kamailio import Kamailio
from tests.support.phones import Fleet
from tests.support.ports import udp_drops
from tests.support.registrar import Registrar, metric
from tests.support.sip import LOOPBACK, ipv6_loopback, options, sip_request, status_code
from tests.support.stats import percentile

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KAMAILIO_CFG = REPO / "bench" / "kamailio" / "registrar.cfg"
RATE = 500  # --source-rate-limit (the default)
FLOOD_RATE = 50_000  # datagrams/s from each flooding address: 100× the limit
FLOOD_SECONDS = 3.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def received(sock: socket.socket) -> list[bytes]:
    out = []
    sock.settimeout(0.3)
    try:
        while True:
            out.append(sock.recv(100))
    except TimeoutError:
        return out


def test_the_kernel_filter_drops_only_the_blocked_sources() -> None:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v4.bind((LOOPBACK, 0))
    targets = [v4]
    if ipv6_loopback():  # a dual-stack socket: IPv4 datagrams arrive with an IPv4 header
        dual = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        targets.append(dual)
    for target in targets:
        port = target.getsockname()[1]
        kernel_filter.attach(target, ["127.0.0.2", "::ffff:127.0.0.4", "2001:db8::1", "::1"])
        sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        if target.family == socket.AF_INET6:
            sources.append("::1")
        for source in sources:
            v6 = ":" in source
            with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((source, 0))
                s.sendto(source.encode(), ("::1" if v6 else LOOPBACK, port))
        assert sorted(received(target)) == [b"127.0.0.3", b"127.0.0.5"], target
        kernel_filter.detach(target)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
            s.sendto(b"again", (LOOPBACK, port))
        assert received(target) == [b"again"]
        target.close()


def fleet_figures(fleet: Fleet, start: float, end: float) -> tuple[list[int], int]:
    """(response times in ms of the REGISTERs a fleet sent between ``start`` and ``end`` (wall clock) and
    answered 200, how many of them failed: 5xx or no answer within 4 s)."""
    base = fleet.cseq_base
    lo, hi = (start - base) * 1000, (end - base) * 1000
    times, failed = [], 0
    for line in fleet.log_lines("REG "):
        m = re.search(r"REG (\S+) user=\S+ cseq=(\d+)(?: at=(\d+))?", line)
        if m is None or not lo <= int(m.group(2)) <= hi:
            continue
        if m.group(1) == "ok" and m.group(3):
            times.append(int(m.group(3)) - int(m.group(2)))
        elif m.group(1) != "ok":
            failed += 1
    return times, failed


@pytest.mark.usefixtures("sip_tools")
def test_honest_phones_keep_refreshing_while_one_host_floods(tmp_path: Path) -> None:
    kam = Kamailio(KAMAILIO_CFG, children=2, workdir=tmp_path / "kam").start()
    reg = Registrar(
        (LOOPBACK, kam.port),
        mode="contact",
        transports=("udp",),
        # Nothing trusted by address: the main registrar is exempt as such, the phones are below the rate.
        extra=["--outgoing-expires", "3600", "--trusted-sources", "", "--log-level", "warning"],
        workdir=tmp_path / "mid",
    )
    fleets = [
        Fleet(tmp_path, f"honest{i}", [f"p{i}u{n}" for n in range(150)], expires=300, every_ms=1000,
              local_ip=f"127.0.0.{11 + i}")
        for i in range(2)
    ]  # fmt: skip
    try:
        reg.start()
        for fleet in fleets:
            fleet.start(reg)
        for fleet in fleets:
            assert fleet.wait_ok(2, 40), fleet.describe()  # registered (relayed), then refreshing (absorbed)
        rss_before = rss_kb(reg.pid)
        reports = {}
        t0 = time.time()
        for n, kind in enumerate(("register", "options", "garbage")):
            source = f"127.0.0.{2 + n}"
            before = reg.metrics()
            drops = udp_drops(reg.port)
            reports[kind] = report = Flooder(reg.addr, source, kind, FLOOD_RATE, FLOOD_SECONDS).run()
            after = reg.metrics()
            assert report["rate"] > 0.8 * FLOOD_RATE, report
            dropped = metric(after, "midregistrar_messages_dropped", reason="source_rate") - metric(
                before, "midregistrar_messages_dropped", reason="source_rate"
            )
            # It reached ten times the rate within its first second: 4,500 dropped here (and what the socket
            # held by then), then it was blocked in the kernel, where the rest went.
            assert 0.8 * 9 * RATE <= dropped <= 9 * RATE * 4, (kind, dropped, report)
            filtered = udp_drops(reg.port) - drops
            assert filtered >= report["sent"] - dropped - RATE * 2, (kind, filtered, dropped, report)
            answered = sum(report["answers"].values())
            assert answered <= RATE * 2, (kind, report)  # what got through: the first second's 500 at most
            if kind == "options":  # and those were served: the bucket's burst at least
                assert report["answers"].get("200", 0) >= RATE / 5, report
        t1 = time.time()
        time.sleep(1.5)  # the phones' REGISTERs sent by t1 are answered
        for fleet in fleets:
            fleet.stop()
        m = reg.metrics()
        assert metric(m, "midregistrar_sources_limited") >= 3
        # The phones kept being answered throughout (SIPp retransmits after 500 ms: a datagram lost would
        # show as a slow 200, a phone starved as a failure).
        times: list[int] = []
        failed = 0
        for fleet in fleets:
            t, f = fleet_figures(fleet, t0, t1)
            times += t
            failed += f
        assert len(times) > 150 * 2 * (t1 - t0) * 0.5, len(times)
        assert failed == 0, [fleet.describe() for fleet in fleets]
        assert percentile(times, 99) < 400, sorted(times)[-20:]
        # Memory: the counts start afresh every second; the kernel keeps the flood out.
        rss_after = rss_kb(reg.pid)
        assert rss_after - rss_before < 20_000, (rss_before, rss_after)
        log = reg.log()
        assert log.count("blocking 127.0.0.") == 3, log
        lines = log.count("dropped over --source-rate-limit")
        assert 1 <= lines <= math.ceil((t1 - t0) / 10) + 3, log
        assert "Traceback" not in log
    finally:
        for fleet in fleets:
            fleet.stop()
        reg.stop()
        kam.stop()


def test_without_blocking_each_message_over_the_rate_is_dropped_unanswered(tmp_path: Path) -> None:
    reg = Registrar(
        None,
        mode="mirror",
        transports=("udp",),
        extra=["--main-registrar", "sip:127.0.0.1:9", "--trusted-sources", "127.0.0.1",
               "--source-rate-limit", "200", "--source-block-seconds", "0"],
        workdir=tmp_path / "mid",
    ).start()  # fmt: skip
    try:
        report = Flooder(reg.addr, "127.0.0.2", "options", 5_000, 2.5).run()
        m = reg.metrics()
        answered = report["answers"].get("200", 0)
        windows = math.ceil(report["seconds"]) + 1
        # 200/s, evenly, plus a burst of 40 each second when the buckets start afresh
        assert 200 * (report["seconds"] - 0.5) <= answered <= 240 * windows, report
        seen = metric(m, "midregistrar_requests", method="OPTIONS")
        assert seen == answered  # every message over the rate dropped before the stack saw it
        assert metric(m, "midregistrar_messages_dropped", reason="source_rate") == report["sent"] - seen
        assert options(reg.addr) == 200  # a trusted address is not concerned
        assert "blocking" not in reg.log()
    finally:
        reg.stop()


def test_messages_over_a_stream_connection_count_against_its_source(tmp_path: Path) -> None:
    reg = Registrar(
        None,
        mode="mirror",
        transports=("tcp",),
        extra=["--main-registrar", "sip:127.0.0.1:9", "--trusted-sources", "", "--source-rate-limit", "5"],
        workdir=tmp_path / "mid",
    ).start()  # fmt: skip
    try:
        with socket.create_connection(reg.addr, timeout=5, source_address=("127.0.0.9", 0)) as conn:
            local = conn.getsockname()[:2]
            ruri = f"sip:{LOOPBACK}:{reg.port}"
            conn.sendall(b"".join(sip_request("OPTIONS", ruri, local, transport="TCP") for _ in range(40)))
            time.sleep(0.5)
            conn.settimeout(0.5)
            data = b""
            with contextlib.suppress(TimeoutError):
                while chunk := conn.recv(65536):
                    data += chunk
            # the burst of one, the refill over the half second; the connection stays open for more
            assert 1 <= data.count(b"SIP/2.0 200 OK") <= 4, data.count(b"SIP/2.0 200 OK")
            m = reg.metrics()
            assert metric(m, "midregistrar_messages_dropped", reason="source_rate") >= 36
            assert metric(m, "midregistrar_connections", transport="tcp") == 1
    finally:
        reg.stop()


def test_the_main_registrar_is_never_limited(tmp_path: Path) -> None:
    main = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    main.bind(("127.0.0.8", 0))
    port = main.getsockname()[1]
    reg = Registrar(
        None,
        mode="mirror",
        transports=("udp",),
        extra=["--main-registrar", f"sip:127.0.0.8:{port}", "--trusted-sources", "",
               "--source-rate-limit", "5"],
        workdir=tmp_path / "mid",
    ).start()  # fmt: skip
    try:
        ruri = f"sip:{LOOPBACK}:{reg.port}"
        for source, expected in (("127.0.0.8", 60), ("127.0.0.9", 1)):
            sock = main if source == "127.0.0.8" else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if sock is not main:
                sock.bind((source, port))
            local = sock.getsockname()[:2]
            for _ in range(60):
                sock.sendto(sip_request("OPTIONS", ruri, local), reg.addr)
            answers = [status_code(a) for a in received(sock)]
            # (60 at once: the burst of one, twice if the buckets start afresh among them)
            assert expected <= answers.count(200) <= expected * (1 if expected == 60 else 2), (
                source,
                answers,
            )
            sock.close()
    finally:
        reg.stop()


@pytest.mark.usefixtures("sip_tools")
def test_a_digest_brute_force_is_slowed_counted_and_logged(tmp_path: Path) -> None:
    kam = Kamailio(KAMAILIO_CFG, children=2, workdir=tmp_path / "kam").start()
    secrets = tmp_path / "users"
    secrets.write_text("alice:right\n")
    reg = Registrar(
        (LOOPBACK, kam.port),
        mode="contact",
        transports=("udp",),
        extra=["--outgoing-expires", "3600", "--auth-file", str(secrets), "--auth-realm", "example.test"],
        workdir=tmp_path / "mid",
    )
    try:
        reg.start()
        phones = {
            name: DigestPhone(reg.addr, f"127.0.0.{n}")
            for name, n in (("honest", 21), ("attacker", 22), ("new", 23))
        }
        for phone in phones.values():
            assert (
                status_code(phone.register()) == 200
            )  # a new contact: relayed, the main registrar's to judge
        honest, attacker, new = phones["honest"], phones["attacker"], phones["new"]
        assert honest.authenticate("right") == 200  # absorbed refreshes now need the password
        codes: list[int | None] = []
        retry_after: list[int] = []
        nonce = attacker.nonce()  # one nonce serves every guess (valid for 5 minutes)
        start = time.monotonic()
        while time.monotonic() - start < 5.0:  # guesses as fast as the answers come
            reply = attacker.register(f"guess{len(codes)}", nonce)
            codes.append(status_code(reply))
            m = re.search(rb"Retry-After: (\d+)", reply or b"")
            if m:
                retry_after.append(int(m.group(1)))
                if len(codes) % 20 == 0:  # the user's honest phone, meanwhile: still let in
                    assert honest.authenticate("right") == 200
        m = reg.metrics()
        failures = metric(m, "midregistrar_auth_failures")
        refused = metric(m, "midregistrar_auth_refused", reason="source")
        # 5 guesses checked, a 2 s window; 5 more, a 4 s window: at most 10 checked in the 5 s.
        assert 5 <= failures <= 10, (failures, codes[:40])
        assert codes[:5] == [401] * 5 and codes[5] == 503
        assert refused == len(codes) - failures and len(codes) > 50  # every other guess: 503, unchecked
        assert 2 in retry_after and 4 in retry_after and max(retry_after) <= 4
        # A phone of alice that never authenticated here gets in at its first try, during the back-off.
        assert new.authenticate("right") == 200
        assert metric(m, "midregistrar_auth_refused", reason="user") == 0
        log = reg.log()
        assert 1 <= log.count("digest brute force") <= 2, log
    finally:
        reg.stop()
        kam.stop()
