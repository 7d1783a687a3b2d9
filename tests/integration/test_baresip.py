"""A real phone, Debian's baresip 1.0, registering over TLS through a real midregistrar (mode contact) to Kamailio
as the main registrar, and answering a call that Kamailio forks to it (issue 12 item 7): the first REGISTER is
relayed, baresip's refreshes on the same connection are absorbed, and an INVITE sent to Kamailio reaches baresip
over the TLS connection it registered on; baresip answers by itself and its 200 OK and audio reach the caller.
The caller's ACK and BYE follow the Record-Routes through Kamailio and the registrar to that connection: Kamailio
speaks UDP only, so the registrar record-routes twice (RFC 5658), one entry on its UDP socket for Kamailio's side
and one on its TLS socket for baresip's.

baresip is given the test CA (``sip_cafile``), the one that signed the registrar's certificate, but baresip 1.0
does not check a TLS server's certificate with it (it never asks libre to verify; with another CA it registers
all the same), so the test checks that chain itself with Python's ssl."""

from __future__ import annotations

import re
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.baresip import Baresip, ensure_baresip
from tests.support.kamailio import KamailioMain
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.registrar import Registrar, metric
from tests.support.sip import SipMessage, sip_request, status_code
from tests.support.sipp import ensure_sip_tools
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
AOR = "alice@example.com"
REGINT = 10  # baresip's registration interval, s (the registrar's --min-expires default): a refresh in ~5 s


@dataclass
class Rig:
    kam: KamailioMain
    reg: Registrar
    phone: Baresip
    pki: Pki
    tls_port: int


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    # Installed when missing; a failure, not a skip, when that did not work.
    assert ensure_sip_tools(), "kamailio/sipp missing and not installable: run `make sip-tools`"
    assert ensure_baresip(), "baresip missing and not installable: run `make sip-tools` (Debian baresip-core)"
    pki = Pki(tmp_path / "pki")
    crt, key = pki.sign("registrar", "/CN=midregistrar", san=f"IP:{LOOPBACK},DNS:localhost", server=True)
    tls_port = free_port()
    kam = KamailioMain(tmp_path / "kam", auth=False).start()
    reg: Registrar | None = None
    phone: Baresip | None = None
    try:
        reg = Registrar(
            (LOOPBACK, kam.port),
            mode="contact",
            transports=("udp",),
            extra=[
                "--listen", f"tls:{LOOPBACK}:{tls_port}", "--tls-cert", str(crt), "--tls-key", str(key),
                "--outgoing-expires", "3600",
            ],
            workdir=tmp_path / "mid",
        ).start()  # fmt: skip
        account = (
            f'<sip:{AOR};transport=tls>;outbound="sip:{LOOPBACK}:{tls_port};transport=tls"'
            f";regint={REGINT};answermode=auto"
        )
        phone = Baresip(account, workdir=tmp_path / "baresip", cafile=pki.ca).start()
        yield Rig(kam, reg, phone, pki, tls_port)
    finally:
        if phone is not None:
            phone.stop()
        if reg is not None:
            reg.stop()
        kam.stop()


class Caller:
    """The calling side, on UDP to Kamailio: one dialog, its requests built from the 200 OK's route set."""

    def __init__(self, kam: KamailioMain) -> None:
        self.kam = kam
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((LOOPBACK, 0))
        self.sip.settimeout(10)
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # where baresip is to send its audio
        self.rtp.bind((LOOPBACK, 0))
        self.rtp.settimeout(5)
        self.local = self.sip.getsockname()[:2]
        self.call_id = f"{uuid.uuid4().hex}@{LOOPBACK}"
        self.from_tag = uuid.uuid4().hex[:8]
        self.to = f"<sip:{AOR}>"
        self.target = f"sip:{AOR}"
        self.route: list[str] = []

    def send(self, method: str, cseq: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        msg = sip_request(
            method,
            self.target,
            self.local,
            headers=[("Route", r) for r in self.route] + headers,
            body=body,
            call_id=self.call_id,
            cseq=cseq,
            from_uri=f"sip:caller@{LOOPBACK}",
            from_tag=self.from_tag,
            to_uri=f"sip:{AOR}",
        )
        if ";tag=" in self.to:  # in the dialog: the To with baresip's tag
            msg = re.sub(rb"\r\nTo: [^\r]*", f"\r\nTo: {self.to}".encode(), msg, count=1)
        self.sip.sendto(msg, self.kam.addr)

    def final(self, method: str) -> SipMessage:
        """The final response to this dialog's ``method`` (provisional ones and retransmissions skipped)."""
        while True:
            data = self.sip.recvfrom(65535)[0]
            answer = SipMessage("received", data.decode(errors="replace"))
            code = status_code(data)
            if code is not None and code >= 200 and answer.headers("CSeq")[0].endswith(method):
                return answer

    def invite(self) -> SipMessage:
        sdp = (
            f"v=0\r\no=caller 1 1 IN IP4 {LOOPBACK}\r\ns=-\r\nc=IN IP4 {LOOPBACK}\r\nt=0 0\r\n"
            f"m=audio {self.rtp.getsockname()[1]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        ).encode()
        contact = ("Contact", f"<sip:caller@{LOOPBACK}:{self.local[1]}>")
        self.send("INVITE", 1, [contact, ("Content-Type", "application/sdp")], sdp)
        ok = self.final("INVITE")
        if status_code(ok.text.encode()) == 200:
            # RFC 3261 12.1.2: the caller's route set is the Record-Route reversed (Kamailio first, then the
            # registrar's flow route), the target baresip's Contact.
            self.route = ok.headers("Record-Route")[::-1]
            self.target = ok.headers("Contact")[0].split("<", 1)[1].split(">", 1)[0]
            self.to = ok.headers("To")[0]
        return ok

    def ack(self) -> None:
        self.send("ACK", 1, [])

    def bye(self) -> SipMessage:
        self.send("BYE", 2, [])
        return self.final("BYE")

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()


def flow_port(rig: Rig) -> int:
    """The source port of baresip's TLS connection, the flow the registrar holds for it."""
    view = rig.reg.aor_view(AOR)
    assert view is not None and len(view["bindings"]) == 1, view
    binding = view["bindings"][0]
    assert binding["user_agent"].startswith("baresip v1.0"), binding
    assert binding["contact"].endswith(";transport=tls"), binding
    flow = str(binding["received"])  # e.g. tls:127.0.0.1:40056
    assert flow.startswith(f"tls:{LOOPBACK}:"), binding
    return int(flow.rsplit(":", 1)[1])


def answered_call(rig: Rig, caller: Caller) -> int:
    """Wait for baresip's binding at Kamailio, call alice there, check baresip answered over its TLS flow;
    the flow's port."""
    wait_for(lambda: rig.kam.contacts_of("alice"), 15, "alice in Kamailio's location", proc=rig.phone.proc)
    port = flow_port(rig)
    ok = caller.invite()
    assert status_code(ok.text.encode()) == 200, f"{ok.text}\n{rig.phone.log()[-4000:]}"
    assert "m=audio " in ok.text and "PCMU/8000" in ok.text, ok.text  # baresip's SDP answer
    log = rig.phone.log()
    assert f"TLS {LOOPBACK}:{rig.tls_port} -> {LOOPBACK}:{port}\nINVITE sip:alice-" in log, log
    assert f"TLS {LOOPBACK}:{port} -> {LOOPBACK}:{rig.tls_port}\nSIP/2.0 200 " in log, log
    return port


def test_baresip_registers_over_tls_and_answers_a_call_forked_by_kamailio(rig: Rig) -> None:
    kam, reg, phone = rig.kam, rig.reg, rig.phone

    # The registrar's certificate chains to the CA baresip is given, for the address baresip dials.
    ctx = ssl.create_default_context(cafile=str(rig.pki.ca))
    with (
        socket.create_connection((LOOPBACK, rig.tls_port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
    ):
        assert tls.version() is not None

    # Registered over TLS: relayed once to Kamailio, then refreshed on the same connection and absorbed.
    wait_for(lambda: kam.contacts_of("alice"), 15, "alice in Kamailio's location", proc=phone.proc)
    wait_for(
        lambda: metric(reg.metrics(), "midregistrar_registers", outcome="absorbed") >= 1,
        REGINT + 5,
        "a refresh absorbed",
        proc=phone.proc,
    )
    m = reg.metrics()
    assert metric(m, "midregistrar_registers", outcome="relayed") == 1, m
    assert len(kam.contacts_of("alice")) == 1, kam.contacts()
    port = flow_port(rig)
    log = phone.log()
    assert f"TLS {LOOPBACK}:{port} -> {LOOPBACK}:{rig.tls_port}\nREGISTER sip:example.com" in log, log
    assert log.count(f"{AOR}: {{0/TLS/v4}} 200 OK") == 1, log  # its event for the first registration

    # A call to alice at Kamailio: looked up, relayed to the registrar, sent to baresip on its TLS connection;
    # baresip answers by itself (answermode=auto) and its audio (the sine tone) comes to the caller's SDP.
    caller = Caller(kam)
    try:
        assert answered_call(rig, caller) == port
        assert caller.rtp.recvfrom(2048)[1][0] == LOOPBACK
    finally:
        caller.close()
    assert phone.alive(), phone.log()[-2000:]
    assert "Traceback" not in reg.log()


def test_the_callers_ack_and_bye_reach_baresip_through_kamailio_and_the_registrar(rig: Rig) -> None:
    caller = Caller(rig.kam)
    try:
        port = answered_call(rig, caller)
        # In the dialog: Kamailio, then the registrar's flow route, then baresip's TLS connection.
        caller.ack()
        log = wait_for(lambda: rig.phone.log() if "Call established" in rig.phone.log() else "", 5, "ACK")
        assert f"TLS {LOOPBACK}:{rig.tls_port} -> {LOOPBACK}:{port}\nACK sip:alice-" in log, log
        assert status_code(caller.bye().text.encode()) == 200
        # baresip 1.0 reports the remote hang-up as "terminated (duration ...)" or, depending on the order its
        # session and call objects see the BYE, "session closed: Connection reset by peer" (its ECONNRESET).
        wait_for(
            lambda: any(s in rig.phone.log() for s in ("terminated (duration", "session closed")),
            10,
            "the call ended",
            proc=rig.phone.proc,
        )
        assert f"TLS {LOOPBACK}:{rig.tls_port} -> {LOOPBACK}:{port}\nBYE sip:alice-" in rig.phone.log()
    finally:
        caller.close()
