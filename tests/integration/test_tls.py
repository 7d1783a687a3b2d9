"""SIP over TLS with a real midregistrar process and Kamailio as the main registrar over TLS (its tls module):
phones on a ``tls:`` socket register and refresh over one connection, the REGISTER is relayed to a ``sips:``
main registrar whose certificate is verified, a renewed certificate is picked up without a restart while the
established connection keeps working, and failed handshakes (a plain-TCP client, a main registrar whose
certificate the registrar does not trust) give a log line and a metric, never a crash. Certificates are made by
the test (tests/support/pki.py)."""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.kamailio import KamailioMain
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.registrar import Registrar, metric
from tests.support.sip import read_sip_stream_message, sip_request, status_code
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
SAN = f"IP:{LOOPBACK},DNS:localhost"


@dataclass
class Certs:
    pki: Pki
    registrar: tuple[Path, Path]
    main: tuple[Path, Path]


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    pki = Pki(tmp_path / "pki")
    return Certs(
        pki,
        pki.sign("registrar", "/CN=midregistrar", san=SAN, server=True),
        pki.sign("main", "/CN=main-registrar", san=SAN, server=True),
    )


def kamailio_tls(workdir: Path, certs: Certs, *, trusted_ca: Path) -> KamailioMain:
    """Kamailio as the main registrar, also on TLS with the test's certificate; it verifies the certificates
    of the registrar's connections against ``trusted_ca`` (none asked for: the registrar is the client)."""
    crt, key = certs.main
    tls_cfg = workdir / "tls.cfg"
    workdir.mkdir(parents=True, exist_ok=True)
    tls_cfg.write_text(
        f"""[server:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
certificate = {crt}
private_key = {key}
ca_list = {trusted_ca}

[client:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
ca_list = {trusted_ca}
"""
    )
    return KamailioMain(
        workdir,
        auth=False,
        extra_defines={"TLS_PORT": free_port(), "TLS_CONFIG": f'"{tls_cfg}"'},
    ).start()


def tls_port(kam: KamailioMain) -> int:
    return int(str(kam.kam.defines["TLS_PORT"]))


class TlsPhone:
    """A phone on one TLS connection to the registrar, verifying its certificate."""

    def __init__(self, registrar: Registrar, ca: Path, user: str = "alice") -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        raw = socket.create_connection(registrar.addr, timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname=LOOPBACK)
        self.local = self.sock.getsockname()[:2]
        self.user = user
        self.buf = bytearray()
        self.cseq = 0
        self.call_id = f"{user}-tls@{LOOPBACK}"

    def register(self, expires: int = 600) -> bytes | None:
        self.cseq += 1
        uri = f"sip:{self.user}@example.com"
        msg = sip_request(
            "REGISTER",
            "sip:example.com",
            self.local,
            transport="TLS",
            from_uri=uri,
            from_tag="t1",
            to_uri=uri,
            call_id=self.call_id,
            cseq=self.cseq,
            headers=[
                ("Contact", f"<sip:{self.user}@{LOOPBACK}:{self.local[1]};transport=tls>;expires={expires}")
            ],
        )
        self.sock.sendall(msg)
        while True:
            answer = read_sip_stream_message(self.sock, self.buf, 8.0)
            code = status_code(answer)
            if code is None or code >= 200:
                return answer

    def peer_certificate(self) -> dict[str, object]:
        cert = self.sock.getpeercert()
        assert cert is not None
        return dict(cert)

    def close(self) -> None:
        self.sock.close()


def tls_registrar(tmp_path: Path, certs: Certs, kam: KamailioMain, *extra: str) -> Registrar:
    """A registrar in mode contact on a tls: socket only, relaying to Kamailio's TLS port (sips:)."""
    crt, key = certs.registrar
    return Registrar(
        None,
        mode="contact",
        transports=("tls",),
        extra=[
            "--main-registrar", f"sips:{LOOPBACK}:{tls_port(kam)}",
            "--tls-cert", str(crt), "--tls-key", str(key), "--tls-ca", str(certs.pki.ca),
            *extra,
        ],
        workdir=tmp_path / "mid",
    ).start()  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path, certs: Certs) -> Iterator[tuple[Registrar, KamailioMain]]:
    kam = kamailio_tls(tmp_path / "kam", certs, trusted_ca=certs.pki.ca)
    reg = tls_registrar(
        tmp_path, certs, kam,
        "--tls-reload-interval", "0.5", "--extra-contact-params", ";transport=tls", "--outgoing-expires", "3600",
    )  # fmt: skip
    yield reg, kam
    reg.stop()
    kam.stop()


def test_phone_registers_over_tls_and_the_relay_reaches_main_over_tls(
    setup: tuple[Registrar, KamailioMain], certs: Certs
) -> None:
    reg, kam = setup
    phone = TlsPhone(reg, certs.pki.ca)
    try:
        assert status_code(phone.register()) == 200, reg.log()[-3000:]
        # Kamailio got it over TLS from the registrar, with a Contact that brings calls back over TLS.
        contacts = kam.contacts()
        assert len(contacts) == 1 and "transport=tls" in contacts[0].address, contacts
        assert "proto=tls" in kam.log(), kam.log()[-2000:]
        relayed = metric(reg.metrics(), "midregistrar_registers", outcome="relayed")
        for _ in range(3):  # refreshes on the same connection are absorbed
            assert status_code(phone.register()) == 200
        m = reg.metrics()
        assert metric(m, "midregistrar_registers", outcome="relayed") == relayed
        assert metric(m, "midregistrar_registers", outcome="absorbed") == 3
        view = reg.aor_view("alice@example.com")
        assert view is not None and view["bindings"][0]["received"].startswith("tls:")  # its flow
    finally:
        phone.close()


def test_renewed_certificate_is_used_for_new_connections_and_the_old_one_keeps_working(
    setup: tuple[Registrar, KamailioMain], certs: Certs
) -> None:
    reg, _ = setup
    before = TlsPhone(reg, certs.pki.ca, "bob")
    assert status_code(before.register()) == 200
    old_serial = before.peer_certificate()["serialNumber"]
    crt, key = certs.registrar
    # cert-manager's way: new files swapped in under the same names.
    new_crt, new_key = certs.pki.sign("registrar-renewed", "/CN=midregistrar", san=SAN, server=True)
    os.replace(new_key, key)
    os.replace(new_crt, crt)
    wait_for(lambda: metric(reg.metrics(), "midregistrar_tls_certificate_reloads") == 1, 10, "reload")
    after = TlsPhone(reg, certs.pki.ca, "carol")
    assert after.peer_certificate()["serialNumber"] != old_serial
    assert status_code(after.register()) == 200
    assert status_code(before.register()) == 200  # the connection made before the renewal
    assert "TLS certificate" in reg.log() and "reloaded" in reg.log()
    # A key that does not match the certificate is refused; the renewed certificate stays in use.
    other_key = certs.pki.sign("stray", "/CN=stray")[1]
    os.replace(other_key, key)
    wait_for(
        lambda: metric(reg.metrics(), "midregistrar_tls_certificate_reload_failures") == 1, 10, "refusal"
    )
    third = TlsPhone(reg, certs.pki.ca, "dave")
    assert third.peer_certificate()["serialNumber"] == after.peer_certificate()["serialNumber"]
    assert status_code(third.register()) == 200
    for p in (before, after, third):
        p.close()


def test_failed_handshakes_are_logged_and_counted_and_the_registrar_serves_on(
    tmp_path: Path, setup: tuple[Registrar, KamailioMain], certs: Certs
) -> None:
    reg, _ = setup
    with socket.create_connection(reg.addr, timeout=5) as plain:  # SIP over plain TCP to a TLS socket
        plain.sendall(sip_request("OPTIONS", f"sip:{LOOPBACK}", plain.getsockname()[:2], transport="TCP"))
        plain.settimeout(5)
        assert plain.recv(100) == b""  # closed after the failed handshake
    wait_for(
        lambda: metric(reg.metrics(), "midregistrar_tls_handshake_failures", side="server") == 1,
        10,
        "counted",
    )
    assert "TLS handshake from" in reg.log()
    phone = TlsPhone(reg, certs.pki.ca, "erin")
    assert status_code(phone.register()) == 200
    phone.close()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("another CA", "certificate rejected: unable to get local issuer certificate"),
        ("expired", "certificate rejected: certificate has expired"),
        ("another name", "certificate rejected: IP address mismatch"),
    ],
)
def test_a_main_registrar_the_registrar_does_not_trust_gets_no_register(
    tmp_path: Path, certs: Certs, case: str, reason: str
) -> None:
    """Main's certificate is signed by another CA, or has expired, or names another host: the handshake fails
    with a log line that says which, the phone gets 503, nothing crashes."""
    if case == "another CA":
        certs.main = Pki(tmp_path / "other-ca").sign("main", "/CN=main-registrar", san=SAN, server=True)
    elif case == "expired":
        certs.main = certs.pki.sign_expired("main-expired", "/CN=main-registrar", san=SAN)
    else:
        certs.main = certs.pki.sign("main-other", "/CN=main-registrar", san="IP:192.0.2.77", server=True)
    kam = kamailio_tls(tmp_path / "kam", certs, trusted_ca=certs.pki.ca)
    reg = tls_registrar(tmp_path, certs, kam)
    try:
        phone = TlsPhone(reg, certs.pki.ca)
        t0 = time.monotonic()
        answer = phone.register()
        assert status_code(answer) == 503, answer
        assert time.monotonic() - t0 < 12
        assert metric(reg.metrics(), "midregistrar_tls_handshake_failures", side="client") >= 1
        assert reason in reg.log(), reg.log()[-2000:]
        assert kam.contacts() == []
        phone.close()
    finally:
        reg.stop()
        kam.stop()
