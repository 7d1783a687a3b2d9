"""The connection guards against a flood, on a real midregistrar process.

--max-connections: with a limit of three it accepts three TCP connections (each served), closes the fourth at
once and counts it, over TCP and over TLS (refused before the handshake), and takes new connections again
once one of the three has gone. --max-connections-per-source and --new-connection-timeout: one host opening
connections as fast as it can, sending nothing, holds at most its share, and what it holds is closed after
the timeout, while phones from other addresses keep connecting and being answered."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.registrar import Registrar, metric
from tests.support.sip import sip_request, status_code, tcp_exchange_on
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"


def closed_at_once(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def options_over(sock: socket.socket, port: int) -> int | None:
    """An OPTIONS to the registrar itself over ``sock``: answered 200 at once when the connection is served."""
    msg = sip_request("OPTIONS", f"sip:{LOOPBACK}:{port}", sock.getsockname()[:2], transport="TCP")
    return status_code(tcp_exchange_on(sock, msg, timeout=8))


def test_connections_beyond_the_limit_are_closed_and_counted(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    crt, key = pki.sign("registrar", "/CN=midregistrar", san=f"IP:{LOOPBACK}", server=True)
    reg = Registrar(
        None,
        mode="mirror",
        transports=("tcp",),
        extra=["--main-registrar", "sip:127.0.0.1:9", "--max-connections", "3",
               "--tls-cert", str(crt), "--tls-key", str(key)],
        workdir=tmp_path / "mid",
    )  # fmt: skip
    tls_port = free_port()
    reg.argv += ["--listen", f"tls:{LOOPBACK}:{tls_port}"]
    reg.start()
    try:
        phones = [socket.create_connection(reg.addr, timeout=5) for _ in range(3)]
        for s in phones:  # held open and served
            assert options_over(s, reg.port) == 200
        extra = socket.create_connection(reg.addr, timeout=5)
        assert closed_at_once(extra)
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        raw = socket.create_connection((LOOPBACK, tls_port), timeout=5)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(raw, server_hostname=LOOPBACK)  # refused before any TLS work
        m = reg.metrics()
        assert metric(m, "midregistrar_connections_refused", reason="max_connections") == 2
        assert metric(m, "midregistrar_connections", transport="tcp") == 3
        assert "refusing new ones (--max-connections)" in reg.log()
        phones.pop().close()
        wait_for(
            lambda: metric(reg.metrics(), "midregistrar_connections", transport="tcp") == 2, 10, "closed"
        )
        again = socket.create_connection(reg.addr, timeout=5)
        assert options_over(again, reg.port) == 200
        for s in [*phones, again, extra]:
            s.close()
    finally:
        reg.stop()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (checked without waiting); closes it if so."""
    sock.setblocking(False)  # with a timeout set, recv would first wait for data that never comes
    try:
        gone = sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        gone = True
    if gone:
        sock.close()
    return gone


def connect_from(source: str, addr: tuple[str, int]) -> socket.socket:
    """A TCP connection from another loopback address (all of 127.0.0.0/8 is this host's)."""
    return socket.create_connection(addr, timeout=5, source_address=(source, 0))


def test_one_flooding_host_holds_only_its_share_and_loses_it_when_silent(tmp_path: Path) -> None:
    reg = Registrar(
        None,
        mode="mirror",
        transports=("tcp",),
        extra=["--main-registrar", "sip:127.0.0.1:9", "--max-connections", "60",
               "--max-connections-per-source", "20", "--new-connection-timeout", "3"],
        workdir=tmp_path / "mid",
    ).start()  # fmt: skip
    flood: list[socket.socket] = []
    stop = threading.Event()
    attempts = 0

    def flooder() -> None:
        """Connect, send nothing, keep the socket, as fast as the loop goes until told to stop; sockets the
        registrar closed are dropped as they are noticed (the test's own descriptors stay bounded)."""
        nonlocal attempts
        while not stop.is_set():
            try:
                flood.append(connect_from("127.0.0.9", reg.addr))
                attempts += 1
            except OSError:
                time.sleep(0.01)
            if len(flood) >= 200:
                flood[:] = [s for s in flood if not closed_by_peer(s)]

    thread = threading.Thread(target=flooder, daemon=True)
    thread.start()
    phones: list[socket.socket] = []
    try:
        time.sleep(0.5)  # the flood is on
        for i in range(10):  # honest phones, one connection each, from other addresses
            phone = connect_from(f"127.0.0.{20 + i}", reg.addr)
            assert options_over(phone, reg.port) == 200
            phones.append(phone)
        deadline = time.monotonic() + 4.0  # and they keep being answered over their connections
        answered = 0
        while time.monotonic() < deadline:
            for phone in phones:
                assert options_over(phone, reg.port) == 200
                answered += 1
        stop.set()
        thread.join(10)
        m = reg.metrics()
        assert attempts > 100, attempts  # the flood did run
        refused = metric(m, "midregistrar_connections_refused", reason="per_source")
        silent = metric(m, "midregistrar_connections_timed_out", phase="first_message")
        # It got its 20, plus one for each of those closed for silence meanwhile (the flood took the slot
        # again); every other attempt was refused.
        assert 20 <= attempts - refused <= 20 + silent, (attempts, refused, silent)
        time.sleep(0.5)
        flood[:] = [s for s in flood if not closed_by_peer(s)]
        assert 0 < len(flood) <= 20  # what the flood holds, seen from its side
        assert metric(m, "midregistrar_connections_refused", reason="max_connections") == 0
        assert "(--max-connections-per-source)" in reg.log()
        # The flood's held connections sent nothing: closed after --new-connection-timeout. The phones'
        # connections carried SIP and stay.
        wait_for(
            lambda: metric(reg.metrics(), "midregistrar_connections", transport="tcp") == len(phones),
            15,
            "silent connections closed",
        )
        assert metric(reg.metrics(), "midregistrar_connections_timed_out", phase="first_message") >= 20
        for phone in phones:
            assert options_over(phone, reg.port) == 200
        assert answered > 50 and "Traceback" not in reg.log()
    finally:
        stop.set()
        for s in [*flood, *phones]:
            s.close()
        reg.stop()
