"""A phone on IPv6 through a real `midregistrar` process to Kamailio as main registrar, all on ::1.

Before the registrar wrote IPv6 references in brackets, Kamailio dropped every relayed REGISTER ("bad ipv6
reference" on `Via: SIP/2.0/UDP ::1:PORT`) and the phone never got an answer; an OPTIONS to the registrar's
own IPv6 address was answered 404. The phone here also routes through the registrar (`Route:` naming it),
which must not reach Kamailio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kamailio import KamailioMain
from tests.support.registrar import Registrar
from tests.support.sip import ipv6_loopback, options, sip_request, status_code, udp_exchange, udp_socket
from tests.support.sipp import ensure_sip_tools

pytestmark = pytest.mark.integration


@pytest.fixture
def v6(tmp_path: Path) -> Iterator[tuple[KamailioMain, Registrar]]:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    assert ensure_sip_tools()
    kam = KamailioMain(tmp_path / "kam", auth=False, listen_ip="::1").start()
    reg = Registrar(
        ("::1", kam.port),
        mode="contact",
        transports=("udp",),
        host="::1",
        extra=["--outgoing-expires", "3600"],
        workdir=tmp_path / "mid",
    )
    try:
        reg.start()
        yield kam, reg
    finally:
        reg.stop()
        kam.stop()


def test_an_ipv6_phone_registers_through_the_registrar_to_kamailio(
    v6: tuple[KamailioMain, Registrar],
) -> None:
    kam, reg = v6
    with udp_socket("::1") as phone:
        host, port = phone.getsockname()[:2]
        request = sip_request(
            "REGISTER",
            "sip:example.com",
            (host, port),
            from_uri="sip:alice@example.com",
            to_uri="sip:alice@example.com",
            headers=[
                ("Contact", f"<sip:alice@[{host}]:{port}>;expires=600"),
                ("Route", f"<sip:[::1]:{reg.port};lr>"),
            ],
        )
        reply = udp_exchange(reg.addr, request, timeout=5, sock=phone)
    assert status_code(reply) == 200, reply
    [contact] = kam.lookup("alice@example.com")
    assert f"@[::1]:{reg.port};ctid=" in contact.address  # the registrar's address, bracketed
    assert options(reg.addr) == 200  # the registrar's own IPv6 address is its own
