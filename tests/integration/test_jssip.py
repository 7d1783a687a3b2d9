"""A WebSocket SIP client that this project did not write (JsSIP from npm, under node) against a real
midregistrar process with Kamailio as the main registrar: JsSIP registers over ``wss:`` (verifying the
registrar's certificate against the test CA), its refreshes are absorbed, and a call placed at Kamailio reaches
it over its WebSocket; it rings (JsSIP's own 180) and rejects with 486, both back at the caller."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.jssip import JsSipPhone
from tests.support.kamailio import KamailioMain
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.registrar import Registrar, metric
from tests.support.sip import sip_request, status_code
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
AOR = "sip:carol@example.com"
EXPIRES = 10  # JsSIP refreshes 5 s before the end of a lifetime this short: one refresh within the test


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Registrar, KamailioMain, JsSipPhone]]:
    pki = Pki(tmp_path / "pki")
    crt, key = pki.sign("registrar", "/CN=midregistrar", san=f"IP:{LOOPBACK},DNS:localhost", server=True)
    kam = KamailioMain(tmp_path / "kam", auth=False).start()
    reg: Registrar | None = None
    phone: JsSipPhone | None = None
    try:
        wss_port = free_port()
        reg = Registrar(
            (LOOPBACK, kam.port),
            mode="contact",
            transports=("udp",),
            extra=[
                "--listen", f"wss:{LOOPBACK}:{wss_port}", "--tls-cert", str(crt), "--tls-key", str(key),
                "--outgoing-expires", "3600",
            ],
            workdir=tmp_path / "mid",
        ).start()  # fmt: skip
        phone = JsSipPhone(f"wss://{LOOPBACK}:{wss_port}", AOR, EXPIRES, tmp_path / "phone", ca=pki.ca)
        yield reg, kam, phone
    finally:
        if phone is not None:
            phone.stop()
        if reg is not None:
            reg.stop()
        kam.stop()


def ack(invite: bytes, response: bytes) -> bytes:
    """The ACK of a non-2xx final response: the INVITE's Via, From, Call-ID and request URI, the response's To
    (RFC 3261 17.1.1.3), sent to the same hop so that Kamailio stops retransmitting it."""
    req = invite.decode().split("\r\n\r\n", 1)[0].split("\r\n")
    resp = response.decode().split("\r\n\r\n", 1)[0].split("\r\n")
    ruri = req[0].split(" ")[1]
    keep = [h for h in req[1:] if h.split(":", 1)[0].lower() in ("via", "from", "call-id", "max-forwards")]
    to = next(h for h in resp if h.lower().startswith("to:"))
    cseq = next(h for h in req if h.lower().startswith("cseq:")).replace("INVITE", "ACK")
    return "\r\n".join([f"ACK {ruri} SIP/2.0", *keep, to, cseq, "Content-Length: 0", "", ""]).encode()


def test_jssip_registers_over_wss_refreshes_and_receives_a_call(
    setup: tuple[Registrar, KamailioMain, JsSipPhone],
) -> None:
    reg, kam, phone = setup
    registered = phone.wait_event("registered", 20)
    assert registered["status"] == 200, phone.tail()
    aor_user = AOR.split(":", 1)[1].split("@")[0]
    contacts = wait_for(
        lambda: [c for c in kam.contacts() if c.aor.split("@")[0] == aor_user], 5, f"{AOR} at Kamailio"
    )
    assert len(contacts) == 1, contacts
    assert metric(reg.metrics(), "midregistrar_registers", outcome="relayed") >= 1

    # JsSIP's refresh (a new CSeq on the same Call-ID) is answered by the registrar, not relayed.
    wait_for(
        lambda: len({e["cseq"] for e in phone.sip_in("SIP/2.0 200", "REGISTER")}) >= 2,
        EXPIRES + 10,
        "a refresh of JsSIP's registration answered 200",
        interval=0.1,
        proc=phone.proc,
    )
    m = reg.metrics()
    assert metric(m, "midregistrar_registers", outcome="absorbed") >= 1, m
    assert not phone.events("registrationFailed"), phone.tail()

    # A call at the main registrar: Kamailio looks carol up and forks to the registrar, which sends the INVITE
    # down JsSIP's WebSocket; JsSIP rings and rejects, and both responses come back to the caller.
    call_id = f"{uuid.uuid4().hex}@{LOOPBACK}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller:
        caller.bind((LOOPBACK, 0))
        local = caller.getsockname()
        invite = sip_request(
            "INVITE",
            AOR,
            local,
            call_id=call_id,
            from_uri=f"sip:dave@{LOOPBACK}",
            headers=[("Contact", f"<sip:dave@{LOOPBACK}:{local[1]}>")],
        )
        caller.sendto(invite, kam.addr)
        caller.settimeout(10)
        codes: list[int] = []
        final = b""
        while not codes or codes[-1] < 200:
            try:
                data, _ = caller.recvfrom(65535)
            except TimeoutError:
                pytest.fail(f"no final response to the INVITE (got {codes}); JsSIP:\n{phone.tail()}")
            codes.append(status_code(data) or 0)
            final = data
        caller.sendto(ack(invite, final), kam.addr)

    session = phone.wait_event("newRTCSession", 5, lambda e: e.get("call_id") == call_id)
    assert session["originator"] == "remote"
    assert session["request_line"].startswith("INVITE sip:"), session
    assert "dave@" in session["from"], session
    assert phone.wait_event("rejected", 5, lambda e: e.get("call_id") == call_id)["status"] == 486
    assert 180 in codes and codes[-1] == 486, (codes, phone.tail())
    assert codes.index(180) < len(codes) - 1
    assert "Traceback" not in reg.log()
