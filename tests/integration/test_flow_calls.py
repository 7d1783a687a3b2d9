"""A call to a phone registered over TCP completes: Kamailio as main, a real `midregistrar`, raw sockets.

The phone registers over a TCP connection it opened and, like baresip, puts a Contact nobody can connect
to (here port 1). Before dialogs over such flows were record-routed, the caller's ACK for the 200 went from
Kamailio straight to that Contact, the connection was refused, and the phone never saw it. Now the
registrar record-routes the INVITE with the flow's token and the ACK comes back over the phone's own
connection (behaviour §8.5, RFC 5626 §5.3)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from registrar.sip.message import Request, Response, parse_message
from tests.support.kamailio import KamailioMain
from tests.support.registrar import Registrar
from tests.support.sip import (
    LOOPBACK,
    in_dialog_request,
    ok_to,
    read_sip_stream_message,
    sip_request,
    tcp_exchange_on,
    udp_socket,
)
from tests.support.sipp import ensure_sip_tools

pytestmark = pytest.mark.integration

UNREACHABLE = f"<sip:alice@{LOOPBACK}:1;transport=tcp>"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[KamailioMain, Registrar]]:
    assert ensure_sip_tools()
    kam = KamailioMain(tmp_path / "kam", auth=False).start()
    reg = Registrar(kam.addr, mode="contact", extra=["--outgoing-expires", "3600"], workdir=tmp_path / "mid")
    try:
        reg.start()
        yield kam, reg
    finally:
        reg.stop()
        kam.stop()


def test_a_tcp_phone_gets_the_ack_for_its_200_over_its_own_connection(
    rig: tuple[KamailioMain, Registrar],
) -> None:
    kam, reg = rig
    with socket.create_connection(reg.addr, timeout=5) as phone, udp_socket(LOOPBACK) as caller:
        local = phone.getsockname()
        register = sip_request(
            "REGISTER",
            "sip:example.com",
            local,
            transport="TCP",
            from_uri="sip:alice@example.com",
            to_uri="sip:alice@example.com",
            headers=[("Contact", f"{UNREACHABLE};expires=600")],
        )
        assert parse_message(tcp_exchange_on(phone, register, timeout=5) or b"").status == 200  # type: ignore[union-attr]

        me = caller.getsockname()
        invite = sip_request(
            "INVITE",
            "sip:alice@example.com",
            me,
            from_uri="sip:bob@example.com",
            to_uri="sip:alice@example.com",
            headers=[("Contact", f"<sip:bob@{me[0]}:{me[1]}>")],
        )
        caller.sendto(invite, kam.addr)
        buf = bytearray()
        data = read_sip_stream_message(phone, buf, 5)
        assert data is not None, "the INVITE never reached the phone"
        got = parse_message(data)
        assert isinstance(got, Request) and got.method == "INVITE"
        assert any("fl-" in rr for rr in got.headers.values("record-route"))
        phone.sendall(ok_to(got, "phone1", UNREACHABLE))

        caller.settimeout(5)
        ok: Response | None = None
        while ok is None:
            reply = parse_message(caller.recv(65535))
            if isinstance(reply, Response) and reply.status == 200:
                ok = reply
        caller.sendto(in_dialog_request("ACK", ok, me), kam.addr)
        data = read_sip_stream_message(phone, buf, 5)
        assert data is not None, "the ACK never reached the phone"
        ack = parse_message(data)
        assert isinstance(ack, Request) and ack.method == "ACK"
