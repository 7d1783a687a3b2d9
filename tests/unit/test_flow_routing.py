"""Dialogs with phones reached only over their own flow stay routed through the registrar (behaviour §8.5).

A phone that registered over a connection it opened (TCP), or from behind NAT, cannot be reached at its
Contact: the main side's in-dialog requests (the ACK for a 200, a BYE) must come back through the process
that holds the flow. So such dialogs are record-routed by default with a flow token naming the flow
(RFC 5626 §5.3), and an in-dialog request carrying that Route goes out over the flow, or, when it comes
from the phone itself, on toward the other end."""

from __future__ import annotations

from registrar.sip.message import Request
from registrar.sip.transport import Peer
from tests.unit.corekit import NATTED, PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN, make_rig, request_bytes

TCP_PHONE = Peer("tcp", "192.0.2.10", 40001, conn=7)


def _registered(m: Core, peer: Peer, contact: str, transport: str = "UDP") -> str:
    """Register one phone in mode mirror; the contact URI the main registrar holds for it."""
    data = register(f"<{contact}>", expires=600, via_host="192.0.2.10:5062")
    m.feed(data.replace(b"SIP/2.0/UDP", f"SIP/2.0/{transport}".encode()), peer)
    relayed = m.to_main()
    m.feed(main_ok(relayed), MAIN)
    m.take()
    return str(relayed.contacts[0].uri)


def _invite(m: Core, ruri: str) -> Request:
    m.feed(request_bytes("INVITE", ruri, branch="z9hG4bK-inv"), MAIN)
    [invite] = [msg for msg, _ in m.take() if isinstance(msg, Request) and msg.method == "INVITE"]
    return invite


def _sent(m: Core) -> list[tuple[Request, Peer]]:
    return [(msg, p) for msg, p in m.take() if isinstance(msg, Request)]


def _call_over_a_tcp_flow() -> tuple[Core, list[str]]:
    """A TCP phone registered in mode mirror and a call from main (over UDP) sent to it: the core and the
    call's Record-Routes, top first."""
    m = Core(mode="mirror")
    held = _registered(m, TCP_PHONE, "sip:alice@192.0.2.10:5062;transport=tcp", "TCP")
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv"), MAIN)
    rrs = next(r for r, _ in _sent(m) if r.method == "INVITE").headers.values("record-route")
    return m, rrs


def test_a_call_to_a_tcp_phone_is_record_routed_with_its_flow() -> None:
    """The call came in over UDP and goes out over the phone's TCP connection: two entries (RFC 5658), the
    top one for the phone (TCP), the other for the caller (UDP, the way it reached us), both with the
    flow's token."""
    m = Core(mode="mirror")
    held = _registered(m, TCP_PHONE, "sip:alice@192.0.2.10:5062;transport=tcp", "TCP")
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv"), MAIN)
    [(invite, peer)] = [(r, p) for r, p in _sent(m) if r.method == "INVITE"]
    assert peer == TCP_PHONE  # over the connection the phone opened
    phone_side, main_side = invite.headers.values("record-route")
    assert phone_side.startswith("<sip:fl-") and phone_side.endswith("@10.0.0.2:5060;transport=tcp;lr>")
    assert main_side == phone_side.replace(";transport=tcp", "")


def test_main_sides_bye_goes_back_over_the_flow_and_the_phones_bye_goes_on_to_main() -> None:
    m, rrs = _call_over_a_tcp_flow()
    # main → phone: Request-URI is the phone's Contact, which nobody can reach but over the flow; its route
    # set is the Record-Routes reversed
    bye = request_bytes(
        "BYE",
        "sip:alice@192.0.2.10:5062;transport=tcp",
        branch="z9hG4bK-bye1",
        extra=f"Route: {rrs[1]}, {rrs[0]}",
    )
    m.feed(bye, MAIN)
    [(out, peer)] = _sent(m)
    assert out.method == "BYE" and peer == TCP_PHONE and out.headers.values("route") == []
    # phone → main: the same Route, from the flow itself, goes on by the Request-URI (main's side)
    back = request_bytes(
        "BYE",
        "sip:bob@10.0.0.3:5070",
        branch="z9hG4bK-bye2",
        via="SIP/2.0/TCP 192.0.2.10:5062",
        extra=f"Route: {rrs[0]}, {rrs[1]}",
    )
    m.feed(back, TCP_PHONE)
    [(out, peer)] = _sent(m)
    assert out.method == "BYE" and (peer.host, peer.port) == ("10.0.0.3", 5070)


def test_the_ack_for_a_200_follows_the_flow_too() -> None:
    m, rrs = _call_over_a_tcp_flow()
    ack = request_bytes(
        "ACK",
        "sip:alice@192.0.2.10:5062;transport=tcp",
        branch="z9hG4bK-ack",
        extra=f"Route: {rrs[1]}, {rrs[0]}",
    )
    m.feed(ack, MAIN)
    [(out, peer)] = _sent(m)
    assert out.method == "ACK" and peer == TCP_PHONE


def test_a_natted_udp_phone_is_record_routed_without_a_transport() -> None:
    m = Core(mode="mirror")
    held = _registered(m, NATTED, "sip:alice@192.0.2.10:5062")  # Contact: a private address
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv"), MAIN)
    [(invite, peer)] = [(r, p) for r, p in _sent(m) if r.method == "INVITE"]
    assert peer == NATTED
    [rr] = invite.headers.values("record-route")
    assert rr.startswith("<sip:fl-") and rr.endswith("@10.0.0.2:5060;lr>")


def test_a_phone_reachable_at_its_contact_is_not_record_routed_by_default() -> None:
    m = Core(mode="mirror")
    held = _registered(m, PHONE, "sip:alice@192.0.2.10:5062")
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv"), MAIN)
    [(invite, _)] = [(r, p) for r, p in _sent(m) if r.method == "INVITE"]
    assert invite.headers.values("record-route") == []


def test_record_route_setting_still_covers_every_dialog() -> None:
    m = Core(rig=make_rig(record_route=True), mode="mirror", record_route=True)
    held = _registered(m, PHONE, "sip:alice@192.0.2.10:5062")
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv"), MAIN)
    [(invite, _)] = [(r, p) for r, p in _sent(m) if r.method == "INVITE"]
    assert invite.headers.values("record-route") == ["<sip:10.0.0.2:5060;lr>"]


def test_a_garbled_flow_token_is_an_ordinary_route_to_us() -> None:
    m = Core(mode="mirror")
    bye = request_bytes(
        "BYE", "sip:carol@10.0.0.9:5080", branch="z9hG4bK-x", extra="Route: <sip:fl-!!!@10.0.0.2:5060;lr>"
    )
    m.feed(bye, MAIN)
    [(out, peer)] = _sent(m)
    assert (peer.host, peer.port) == ("10.0.0.9", 5080) and out.headers.values("route") == []


def test_a_call_is_not_sent_into_a_closed_connection() -> None:
    """RFC 5626 §5.2: once the phone's connection closed, its flow has failed. A call gets 480 at once
    instead of a connection attempt to the phone's source port; the phone's next REGISTER restores it."""
    m = Core(mode="mirror")
    held = _registered(m, TCP_PHONE, "sip:alice@192.0.2.10:5062;transport=tcp", "TCP")
    m.core.flow_closed(7)
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv"), MAIN)
    sent = m.take()
    assert [p for msg, p in sent if isinstance(msg, Request)] == []
    assert [msg.status for msg, p in sent if p == MAIN and not isinstance(msg, Request)][-1] == 480
    again = Peer("tcp", "192.0.2.10", 40002, conn=8)  # the phone reconnects and registers again
    data = register("<sip:alice@192.0.2.10:5062;transport=tcp>", expires=600, cseq=11, branch="z9hG4bK-a2")
    m.feed(data.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"), again)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.feed(request_bytes("INVITE", held, branch="z9hG4bK-inv2"), MAIN)
    assert [p for msg, p in m.take() if isinstance(msg, Request) and msg.method == "INVITE"] == [again]
