"""RFC 5626 (SIP outbound) at the registrar: a phone that registers with ``+sip.instance`` and ``reg-id`` has
one binding per flow, keyed by (instance, reg-id) instead of by Contact URI (§6). When its flow moves (a new
connection after the old one failed, a new NAT binding) its next REGISTER replaces that binding, so calls go to
the new flow only; a device with two flows gets a call over one of them, the newest that is still up (§5.3);
the 200 says ``Require: outbound``. Without RFC 5626 (no reg-id, or an edge proxy before us that does not do
outbound), Contact URIs are matched as before."""

from __future__ import annotations

from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from tests.unit.corekit import Core, main_ok, register
from tests.unit.stackkit import MAIN, request_bytes

INSTANCE = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
FIRST = Peer("tcp", "192.0.2.10", 40001, conn=7)
SECOND = Peer("tcp", "192.0.2.10", 40002, conn=8)
AGG = "sip:alice%40example.com@10.0.0.2:5060"


def _register(
    m: Core,
    peer: Peer,
    contact: str,
    *,
    cseq: int,
    call_id: str = "ob-1",
    extra: str = "Supported: path, outbound",
    vias: int = 1,
) -> tuple[Request | None, Response]:
    """One REGISTER over ``peer``: what was relayed (None when absorbed) and the phone's final answer."""
    data = register(contact, cseq=cseq, call_id=call_id, branch=f"z9hG4bK-{cseq}-{peer.port}", extra=extra)
    data = data.replace(b"SIP/2.0/UDP 192.0.2.10:5062", f"SIP/2.0/TCP 192.0.2.10:{peer.port}".encode())
    if vias == 2:
        data = data.replace(b"Via:", b"Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK-edge\r\nVia:", 1)
    m.feed(data, peer)
    sent = m.take()
    relayed = [x for x, p in sent if isinstance(x, Request) and p == MAIN]
    if relayed:
        m.feed(main_ok(relayed[0]), MAIN)
        sent = m.take()
    answers = [x for x, _ in sent if isinstance(x, Response)]
    assert answers and answers[-1].status == 200, sent
    return (relayed[0] if relayed else None), answers[-1]


def _flow_contact(port: int, reg_id: int = 1) -> str:
    return f"<sip:alice@192.0.2.10:{port};transport=tcp;ob>;{INSTANCE};reg-id={reg_id};expires=600"


def _invites(m: Core, ruri: str) -> list[Peer]:
    m.feed(request_bytes("INVITE", ruri, branch=f"z9hG4bK-inv{m.now}"), MAIN)
    m.rig.now += 0.001
    return [p for x, p in m.take() if isinstance(x, Request) and x.method == "INVITE"]


def test_a_phone_whose_flow_moved_replaces_its_binding_and_calls_follow_the_new_flow() -> None:
    m = Core(mode="contact")
    relayed, ok = _register(m, FIRST, _flow_contact(40001), cseq=1)
    assert relayed is not None and "outbound" in ok.headers.values("require")
    held = str(relayed.contacts[0].uri)
    m.core.flow_closed(7)  # the phone's connection fails; it reconnects and registers the same flow again
    again, ok = _register(m, SECOND, _flow_contact(40002), cseq=2)
    assert again is not None and str(again.contacts[0].uri) == held  # main's copy is renewed, not doubled
    assert [str(c.uri) for c in ok.contacts] == ["sip:alice@192.0.2.10:40002;transport=tcp;ob"]
    [listed] = ok.contacts  # the phone recognises its flow's binding by these
    assert (listed.instance, listed.reg_id) == ("<urn:uuid:00000000-0000-1000-8000-000A95A0E128>", "1")
    assert ok.headers.values("require") == ["outbound"]
    assert _invites(m, held) == [SECOND]


def test_without_reg_id_a_moved_contact_is_a_second_binding() -> None:
    """The control: the same moves without RFC 5626 leave the old contact registered beside the new one."""
    m = Core(mode="contact")
    _register(m, FIRST, f"<sip:alice@192.0.2.10:40001;transport=tcp>;{INSTANCE};expires=600", cseq=1)
    _, ok = _register(m, SECOND, f"<sip:alice@192.0.2.10:40002;transport=tcp>;{INSTANCE};expires=600", cseq=2)
    assert len(ok.contacts) == 2 and ok.headers.values("require") == []


def test_a_device_with_two_flows_is_called_over_the_newest_live_one() -> None:
    m = Core(mode="aor", outgoing_expires=7200, max_expires=7200)
    _register(m, FIRST, _flow_contact(40001, reg_id=1), cseq=1, call_id="ob-1")
    m.rig.now += 1
    _, ok = _register(m, SECOND, _flow_contact(40002, reg_id=2), cseq=1, call_id="ob-2")
    assert len(ok.contacts) == 2  # one binding per flow
    assert _invites(m, AGG) == [SECOND]  # one branch per device, not one per flow
    m.core.flow_closed(8)
    assert _invites(m, AGG) == [FIRST]  # its newest flow failed: the other one carries the call


def test_other_devices_of_the_aor_are_still_forked_to() -> None:
    m = Core(mode="aor", outgoing_expires=7200, max_expires=7200)
    _register(m, FIRST, _flow_contact(40001, reg_id=1), cseq=1, call_id="ob-1")
    desk = Peer("tcp", "198.51.100.7", 41000, conn=9)
    other = '+sip.instance="<urn:uuid:11111111-0000-1000-8000-000A95A0E128>"'
    contact = f"<sip:alice@198.51.100.7:41000;transport=tcp;ob>;{other};reg-id=1;expires=600"
    data = register(contact, cseq=1, call_id="desk", branch="z9hG4bK-desk", extra="Supported: outbound")
    m.feed(data.replace(b"SIP/2.0/UDP 192.0.2.10:5062", b"SIP/2.0/TCP 198.51.100.7:41000"), desk)
    for x, p in m.take():
        if isinstance(x, Request) and p == MAIN:
            m.feed(main_ok(x), MAIN)
    m.take()
    assert sorted(_invites(m, AGG), key=lambda p: p.port) == [FIRST, desk]


def test_behind_an_edge_proxy_without_outbound_reg_id_is_ignored() -> None:
    m = Core(mode="contact")
    _register(m, FIRST, _flow_contact(40001), cseq=1, vias=2)
    _, ok = _register(m, SECOND, _flow_contact(40002), cseq=2, vias=2)
    assert len(ok.contacts) == 2 and ok.headers.values("require") == []


def test_behind_an_edge_proxy_that_does_outbound_its_path_ob_turns_it_on() -> None:
    m = Core(mode="contact", path_mode="lazy")
    edge = "Supported: path, outbound\r\nPath: <sip:edge.example.com;lr;ob>"
    _register(m, FIRST, _flow_contact(40001), cseq=1, vias=2, extra=edge)
    _, ok = _register(m, SECOND, _flow_contact(40002), cseq=2, vias=2, extra=edge)
    assert len(ok.contacts) == 1 and ok.headers.values("require") == ["outbound"]


def test_an_absorbed_refresh_of_a_flow_also_says_require_outbound() -> None:
    m = Core(mode="contact", outgoing_expires=3600)
    relayed, _ = _register(m, FIRST, _flow_contact(40001), cseq=1)
    assert relayed is not None
    absorbed, ok = _register(m, FIRST, _flow_contact(40001), cseq=2)
    assert absorbed is None and ok.headers.values("require") == ["outbound"]
    absorbed, ok = _register(m, FIRST, _flow_contact(40001), cseq=3)  # the refresh template's answer too
    assert absorbed is None and ok.headers.values("require") == ["outbound"]


def test_a_phone_without_supported_outbound_gets_no_require() -> None:
    m = Core(mode="contact")
    _, ok = _register(m, FIRST, _flow_contact(40001), cseq=1, extra="")
    assert ok.headers.values("require") == []
