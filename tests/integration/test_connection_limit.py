"""--max-connections against a connection flood: a real midregistrar with a limit of three accepts three TCP
connections (each served), closes the fourth connection at once and counts it, over TCP and over TLS (refused
before the handshake), and takes new connections again once one of the three has gone."""

from __future__ import annotations

import socket
import ssl
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
        assert metric(m, "midregistrar_connections_refused") == 2
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
