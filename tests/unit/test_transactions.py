"""RFC 3261 §17 transactions through the sans-IO stack, on a virtual clock."""

from __future__ import annotations

import pytest

from registrar.sip.message import Request, Response, make_response
from registrar.sip.stack import ClientResult, IncomingRequest, StrayAck
from registrar.sip.transport import Peer
from tests.unit.stackkit import MAIN, PHONE, make_rig, request_bytes, response_to


def _options(uri: str, call_id: str) -> Request:
    """An OPTIONS the stack originates (no Via yet: send_request adds ours)."""
    req = Request("OPTIONS", uri)
    for name, value in [
        ("From", "<sip:mid@10.0.0.2>;tag=x"),
        ("To", "<sip:10.0.0.3>"),
        ("Call-ID", call_id),
        ("CSeq", "1 OPTIONS"),
    ]:
        req.headers.add(name, value)
    return req


def _incoming(rig) -> IncomingRequest:  # type: ignore[no-untyped-def]
    events = rig.take_events()
    assert len(events) == 1 and isinstance(events[0], IncomingRequest)
    return events[0]


def test_non_invite_server_absorbs_retransmissions_and_times_out_with_timer_j() -> None:
    rig = make_rig()
    data = request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/UDP 192.0.2.10:5062")
    rig.feed(data, PHONE)
    ev = _incoming(rig)
    rig.stack.respond(ev.txn, make_response(ev.request, 200))
    rig.drain()
    [(resp, peer)] = rig.take()
    assert isinstance(resp, Response) and resp.status == 200 and peer.port == 5062
    rig.feed(data, PHONE)  # retransmission: last response again, no new event
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [200]
    assert rig.take_events() == []
    rig.advance(31.9)
    assert rig.stack.active_transactions == 1
    rig.advance(0.2)  # Timer J = 64*T1
    assert rig.stack.active_transactions == 0
    rig.feed(data, PHONE)  # after J a copy is a new request
    assert isinstance(rig.take_events()[0], IncomingRequest)


def test_non_invite_server_over_tcp_ends_at_once() -> None:
    rig = make_rig()
    peer = Peer("tcp", "192.0.2.10", 40000, conn=7)
    rig.feed(request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/TCP 192.0.2.10:5062"), peer)
    ev = _incoming(rig)
    rig.stack.respond(ev.txn, make_response(ev.request, 200))
    rig.drain()
    [(_, out_peer)] = rig.take()
    assert out_peer.conn == 7  # the response goes back on the same connection
    rig.advance(0)
    assert rig.stack.active_transactions == 0


def test_invite_server_sends_100_and_retransmits_final_with_timer_g_until_ack() -> None:
    rig = make_rig()
    rig.feed(request_bytes("INVITE"), MAIN)
    [(trying, _)] = rig.take()
    assert isinstance(trying, Response) and trying.status == 100
    ev = _incoming(rig)
    rig.stack.respond(ev.txn, make_response(ev.request, 486))
    rig.drain()
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [486]
    rig.advance(0.5)
    rig.advance(1.0)
    rig.advance(2.0)
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [486, 486, 486]
    tag = ev.txn.to_tag
    rig.feed(request_bytes("ACK", to_tag=tag), MAIN)  # same branch: the ACK of the non-2xx
    assert rig.take_events() == []  # absorbed, hop by hop
    rig.advance(10)
    assert rig.take() == []
    assert rig.stack.active_transactions == 0


def test_invite_server_timer_h_gives_up_without_ack() -> None:
    rig = make_rig()
    rig.feed(request_bytes("INVITE"), MAIN)
    ev = _incoming(rig)
    rig.stack.respond(ev.txn, make_response(ev.request, 404))
    rig.advance(40)
    statuses = [r.status for r, _ in rig.take() if isinstance(r, Response)]
    # 100, the 404 and its G retransmissions (0.5, 1, 2, 4, 4, ... capped at T2) until H at 32 s
    assert statuses[0] == 100 and statuses[1] == 404
    assert 8 <= len(statuses) - 2 <= 11
    assert rig.stack.active_transactions == 0


def test_non_invite_client_retransmits_with_timer_e_and_times_out_with_f() -> None:
    rig = make_rig()
    req = _options("sip:10.0.0.3:5070", "o1")
    handle = rig.stack.send_request(req, MAIN)
    rig.drain()
    rig.advance(32.1)
    sends = rig.take()
    # t=0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5
    assert len(sends) == 11
    [result] = rig.take_events()
    assert isinstance(result, ClientResult) and result.handle == handle
    assert result.timed_out and result.response.status == 408


def test_non_invite_client_over_tcp_does_not_retransmit() -> None:
    rig = make_rig()
    req = _options("sip:10.0.0.3:5070;transport=tcp", "o2")
    rig.stack.send_request(req, Peer("tcp", "10.0.0.3", 5070))
    rig.drain()
    rig.advance(20)
    assert len(rig.take()) == 1
    [(sent, _)] = [(req, None)]
    assert "TCP" in str(sent.top_via)


def test_client_response_ends_transaction_and_reports_once() -> None:
    rig = make_rig()
    req = _options("sip:10.0.0.3:5070", "o3")
    rig.stack.send_request(req, MAIN)
    rig.drain()
    [(sent, _)] = rig.take()
    assert isinstance(sent, Request)
    rig.feed(response_to(sent, 200), MAIN)
    rig.feed(response_to(sent, 200), MAIN)  # retransmission absorbed (Timer K state)
    results = [e for e in rig.take_events() if isinstance(e, ClientResult)]
    assert len(results) == 1 and results[0].response.status == 200
    rig.advance(5.1)
    assert rig.stack.active_transactions == 0


def test_rfc2543_branchless_retransmission_is_matched() -> None:
    rig = make_rig()
    data = request_bytes(
        "REGISTER", "sip:example.com", branch="oldstyle-1", via="SIP/2.0/UDP 192.0.2.10:5062"
    )
    rig.feed(data, PHONE)
    ev = _incoming(rig)
    rig.stack.respond(ev.txn, make_response(ev.request, 200))
    rig.drain()
    rig.take()
    rig.feed(data, PHONE)
    assert rig.take_events() == []
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [200]


def test_ack_for_2xx_is_a_stray_ack_for_the_application() -> None:
    rig = make_rig()
    rig.feed(request_bytes("ACK", branch="z9hG4bK-ack2xx", to_tag="t9"), MAIN)
    [ev] = rig.take_events()
    assert isinstance(ev, StrayAck)


@pytest.mark.parametrize("garbage", [b"hello world", b"\x00\xff" * 40, b"INVITE sip:x SIP/2.0\r\n\r\n"])
def test_garbage_is_dropped_silently(garbage: bytes) -> None:
    rig = make_rig()
    rig.feed(garbage, PHONE)
    assert rig.take() == [] and rig.take_events() == []
    assert rig.stack.stats.parse_errors == 1


def test_request_without_call_id_gets_400() -> None:
    rig = make_rig()
    data = request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/UDP 192.0.2.10:5062").replace(
        b"Call-ID: call-1\r\n", b""
    )
    rig.stack.receive(data, PHONE, 0.0)
    [(raw, peer)] = rig.stack.pop_outgoing()
    assert raw.startswith(b"SIP/2.0 400 Bad Request (missing call-id")
    assert b"Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-1" in raw
    assert peer.port == 5062


def test_request_with_broken_via_params_still_gets_its_400_routed() -> None:
    """RFC 4475 §3.1.2.1 badinv01: the Via parameters are garbage but its sent-by is enough to reply."""
    from pathlib import Path

    data = (Path(__file__).parent / "rfc4475" / "badinv01.dat").read_bytes()
    rig = make_rig()
    rig.stack.receive(data, Peer("udp", "192.0.2.200", 5060), 0.0)
    out = rig.stack.pop_outgoing()
    assert len(out) == 1
    raw, _ = out[0]
    assert raw.startswith(b"SIP/2.0 400 ")
    assert rig.stack.stats.parse_errors == 1


def test_an_answered_non_invite_keeps_only_what_retransmissions_need() -> None:
    """The parsed request is released once a final response went out (fewer objects for the GC to walk);
    retransmissions are still answered from the response bytes, and a late second answer is not sent."""
    rig = make_rig()
    data = request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/UDP 192.0.2.10:5062")
    rig.feed(data, PHONE)
    ev = _incoming(rig)
    rig.stack.respond(ev.txn, make_response(ev.request, 200))
    rig.drain()
    rig.take()
    with pytest.raises(RuntimeError):
        ev.txn.request  # noqa: B018
    rig.stack.respond(ev.txn, make_response(ev.request, 500))  # late: ignored
    rig.drain()
    assert rig.take() == []
    rig.feed(data, PHONE)
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [200]


def test_a_completed_non_invite_client_transaction_releases_its_request() -> None:
    rig = make_rig()
    req = _options("sip:10.0.0.3:5070", "o9")
    rig.stack.send_request(req, MAIN)
    rig.drain()
    [(sent, _)] = rig.take()
    assert isinstance(sent, Request)
    [txn] = list(rig.stack._clients.values())
    rig.feed(response_to(sent, 200), MAIN)
    assert [type(e).__name__ for e in rig.take_events()] == ["ClientResult"]
    with pytest.raises(RuntimeError):
        txn.request  # noqa: B018
    rig.feed(response_to(sent, 200), MAIN)  # a retransmitted final is still absorbed
    assert rig.take_events() == []


def _proxied_invite(rig) -> tuple[IncomingRequest, Request]:  # type: ignore[no-untyped-def]
    """An INVITE from MAIN proxied to PHONE: the caller's event and the copy sent on."""
    rig.feed(request_bytes("INVITE"), MAIN)
    event = _incoming(rig)
    rig.stack.proxy(event.txn, [(None, PHONE)])
    rig.drain()
    [invite] = [m for m, _ in rig.take() if isinstance(m, Request) and m.method == "INVITE"]
    return event, invite


def test_invite_client_timer_a_doubles_until_timer_b() -> None:
    rig = make_rig()
    _proxied_invite(rig)
    sent: list[tuple[float, str | int]] = []
    for _ in range(65):  # 0.5 s steps (exact in binary) up to 32.5 s
        rig.advance(0.5)
        sent += [(rig.now, m.method if isinstance(m, Request) else m.status) for m, _ in rig.take()]
    retransmissions = [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # Timer A: T1, doubling
    # Timer B (64*T1) answers the caller 408, which the server side then retransmits with Timer G
    assert sent == [(t, "INVITE") for t in retransmissions] + [(32.0, 408), (32.5, 408)]


def test_invite_client_keeps_absorbing_a_non_2xx_final_for_timer_d() -> None:
    rig = make_rig()
    event, invite = _proxied_invite(rig)
    rig.feed(response_to(invite, 486), PHONE)
    rig.feed(request_bytes("ACK", to_tag=event.txn.to_tag), MAIN)  # the caller ACKs our 486
    rig.take()
    rig.advance(31.9)
    rig.feed(response_to(invite, 486), PHONE)
    assert [m.method for m, _ in rig.take() if isinstance(m, Request)] == ["ACK"]  # still in Completed
    rig.advance(0.2)  # Timer D = 32 s
    assert rig.stack.active_transactions == 0


def test_invite_server_accepted_absorbs_the_invite_until_timer_l() -> None:
    rig = make_rig()
    data = request_bytes("INVITE")
    rig.feed(data, MAIN)
    event = _incoming(rig)
    rig.stack.respond(event.txn, make_response(event.request, 200))
    rig.drain()
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [100, 200]
    rig.feed(data, MAIN)  # RFC 6026: a retransmitted INVITE is absorbed, the 2xx is the TU's to resend
    assert rig.take() == [] and rig.take_events() == []
    rig.advance(31.9)
    assert rig.stack.active_transactions == 1
    rig.advance(0.2)  # Timer L = 64*T1
    assert rig.stack.active_transactions == 0


def test_non_invite_client_retransmits_every_t2_once_proceeding() -> None:
    rig = make_rig()
    rig.stack.send_request(_options("sip:10.0.0.3:5070", "o4"), MAIN)
    rig.drain()
    [(sent, _)] = rig.take()
    assert isinstance(sent, Request)
    rig.feed(response_to(sent, 100), MAIN)
    times = []
    for _ in range(26):
        rig.advance(0.5)
        times += [rig.now for m, _ in rig.take() if isinstance(m, Request)]
    assert times == [0.5, 4.5, 8.5, 12.5]  # E: T1 while Trying, then T2 in Proceeding
