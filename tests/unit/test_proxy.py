"""RFC 3261 §16 proxy core through the sans-IO stack: forwarding, forking, best response, CANCEL."""

from __future__ import annotations

from registrar.sip.message import Request, Response
from registrar.sip.stack import IncomingRequest, ProxyFinal
from registrar.sip.transport import Peer
from registrar.sip.uri import parse_uri
from tests.unit.stackkit import MAIN, Rig, make_rig, request_bytes, response_to

A = Peer("udp", "192.0.2.10", 5062)
B = Peer("udp", "198.51.100.7", 5060)
C = Peer("udp", "203.0.113.9", 5064)


def _invite(rig: Rig, targets: list[Peer], **kw: object) -> IncomingRequest:
    rig.feed(request_bytes("INVITE", **kw), MAIN)  # type: ignore[arg-type]
    [ev] = rig.take_events()
    assert isinstance(ev, IncomingRequest)
    rig.stack.proxy(ev.txn, [(parse_uri(f"sip:alice@{p.host}:{p.port}"), p) for p in targets])
    rig.drain()
    return ev


def _requests(sent: list[tuple[Request | Response, Peer]], method: str) -> list[tuple[Request, Peer]]:
    return [(m, p) for m, p in sent if isinstance(m, Request) and m.method == method]


def _responses(sent: list[tuple[Request | Response, Peer]]) -> list[int]:
    return [m.status for m, _ in sent if isinstance(m, Response)]


def test_forwarded_copy_has_our_via_decremented_max_forwards_and_new_ruri() -> None:
    rig = make_rig(record_route=True)
    _invite(rig, [A])
    sent = rig.take()
    assert _responses(sent) == [100]
    [(fwd, peer)] = _requests(sent, "INVITE")
    assert peer == A
    assert str(fwd.uri) == "sip:alice@192.0.2.10:5062"
    assert fwd.headers.get("max-forwards") == "69"
    top, second = fwd.vias
    assert (top.host, top.port, top.rport) == ("10.0.0.2", 5060, "")
    assert top.branch and top.branch.startswith("z9hG4bK-")
    assert second.host == "10.0.0.3" and second.branch == "z9hG4bK-1"
    assert fwd.headers.get("record-route") == "<sip:10.0.0.2:5060;lr>"


def test_max_forwards_zero_gets_483() -> None:
    rig = make_rig()
    rig.feed(request_bytes("INVITE", max_forwards=0), MAIN)
    assert _responses(rig.take()) == [483]
    assert rig.take_events() == []


def test_a_request_that_comes_back_unchanged_is_a_loop_482() -> None:
    rig = make_rig()
    _invite(rig, [A])
    [(fwd, _)] = _requests(rig.take(), "INVITE")
    # Same request arrives again (e.g. the next hop sent it back to us) with our Via in it.
    looped = fwd.copy()
    looped.uri = parse_uri("sip:alice@10.0.0.2:5060;ctid=42")
    looped.headers.prepend("Via", "SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bK-back")
    rig.feed(looped.to_bytes(), Peer("udp", "192.0.2.99", 5060))
    assert 482 in _responses(rig.take())


def test_response_routing_uses_received_and_rport() -> None:
    rig = make_rig()
    nat = Peer("udp", "203.0.113.5", 40000)
    rig.feed(request_bytes("INVITE", via="SIP/2.0/UDP 10.1.1.1:5060;rport"), nat)
    [ev] = rig.take_events()
    assert isinstance(ev, IncomingRequest)
    assert ev.request.top_via.received == "203.0.113.5" and ev.request.top_via.rport == "40000"
    [(trying, peer)] = rig.take()
    assert isinstance(trying, Response) and (peer.host, peer.port) == ("203.0.113.5", 40000)


def test_parallel_fork_first_2xx_relayed_and_pending_branches_cancelled() -> None:
    rig = make_rig()
    _invite(rig, [A, B, C])
    sent = _requests(rig.take(), "INVITE")
    assert [p for _, p in sent] == [A, B, C]
    (ia, _), (ib, _), (ic, _) = sent
    rig.feed(response_to(ib, 180, to_tag="tb"), B)
    rig.feed(response_to(ic, 180, to_tag="tc"), C)
    assert _responses(rig.take()) == [180, 180]  # provisional responses go upstream
    rig.feed(response_to(ia, 200, to_tag="ta"), A)
    sent = rig.take()
    assert _responses(sent) == [200]
    cancels = _requests(sent, "CANCEL")
    assert sorted(p.host for _, p in cancels) == sorted([B.host, C.host])
    for cancel, _ in cancels:
        assert cancel.top_via.branch in (ib.top_via.branch, ic.top_via.branch)
        assert cancel.cseq.method == "CANCEL" and cancel.cseq.seq == 1
    # the upstream 200 lost our Via
    [ok] = [m for m, _ in sent if isinstance(m, Response)]
    assert len(ok.vias) == 1 and ok.top_via.host == "10.0.0.3"


def test_cancel_waits_for_a_provisional_response_on_that_branch() -> None:
    rig = make_rig()
    _invite(rig, [A, B])
    (ia, _), (ib, _) = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ia, 200), A)
    assert _requests(rig.take(), "CANCEL") == []  # B has not answered yet
    rig.feed(response_to(ib, 180), B)
    sent = rig.take()
    assert len(_requests(sent, "CANCEL")) == 1 and _responses(sent) == []  # 180 not relayed after the 200


def test_best_response_when_all_branches_fail() -> None:
    rig = make_rig()
    _invite(rig, [A, B])
    (ia, _), (ib, _) = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ia, 503), A)
    assert _responses(rig.take()) == []  # waits for B
    rig.feed(response_to(ib, 486), B)
    assert _responses(rig.take()) == [486]  # 4xx beats 5xx


def test_6xx_ends_the_fork_and_cancels_the_rest() -> None:
    rig = make_rig()
    _invite(rig, [A, B])
    (ia, _), (ib, _) = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ib, 180), B)
    rig.feed(response_to(ia, 603), A)
    sent = rig.take()
    assert len(_requests(sent, "CANCEL")) == 1
    rig.feed(response_to(ib, 487), B)
    assert 603 in _responses(rig.take())


def test_401_challenges_are_aggregated() -> None:
    rig = make_rig()
    _invite(rig, [A, B])
    (ia, _), (ib, _) = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ia, 401, extra='WWW-Authenticate: Digest realm="a", nonce="1"'), A)
    rig.feed(response_to(ib, 401, extra='WWW-Authenticate: Digest realm="b", nonce="2"'), B)
    [final] = [m for m, _ in rig.take() if isinstance(m, Response)]
    assert final.status == 401
    assert len(final.headers.fields("www-authenticate")) == 2


def test_no_answer_gives_408() -> None:
    rig = make_rig()
    _invite(rig, [A])
    rig.take()
    rig.advance(31.9)
    assert _responses(rig.take()) == []
    rig.advance(0.2)  # Timer B = 64*T1 on the branch
    assert _responses(rig.take()) == [408]


def test_hop_by_hop_cancel_from_upstream() -> None:
    rig = make_rig()
    _invite(rig, [A])
    [(ia, _)] = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ia, 180), A)
    rig.take()
    rig.feed(request_bytes("CANCEL"), MAIN)
    sent = rig.take()
    assert _responses(sent) == [200]  # the CANCEL itself is answered here
    [(cancel, peer)] = _requests(sent, "CANCEL")
    assert peer == A and cancel.top_via.branch == ia.top_via.branch
    rig.feed(response_to(cancel, 200), A)
    rig.feed(response_to(ia, 487), A)
    sent = rig.take()
    assert _responses(sent) == [487]
    assert len(_requests(sent, "ACK")) == 1  # our client transaction ACKs the 487 downstream


def test_cancel_for_unknown_transaction_gets_481() -> None:
    rig = make_rig()
    rig.feed(request_bytes("CANCEL", branch="z9hG4bK-nothing"), MAIN)
    assert _responses(rig.take()) == [481]


def test_non_2xx_final_is_acked_downstream_and_retransmission_not_relayed_twice() -> None:
    rig = make_rig()
    _invite(rig, [A])
    [(ia, _)] = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ia, 486), A)
    sent = rig.take()
    assert _responses(sent) == [486] and len(_requests(sent, "ACK")) == 1
    rig.feed(response_to(ia, 486), A)
    sent = rig.take()
    assert _responses(sent) == [] and len(_requests(sent, "ACK")) == 1


def test_held_final_goes_to_the_application() -> None:
    rig = make_rig()
    rig.feed(request_bytes("REGISTER", "sip:example.com"), Peer("udp", "192.0.2.10", 5062))
    [ev] = rig.take_events()
    assert isinstance(ev, IncomingRequest)
    ctx = rig.stack.proxy(ev.txn, [(None, MAIN)], hold_final=True)
    rig.drain()
    [(fwd, _)] = _requests(rig.take(), "REGISTER")
    rig.feed(response_to(fwd, 200), MAIN)
    [held] = rig.take_events()
    assert isinstance(held, ProxyFinal) and held.ctx is ctx and held.response.status == 200
    assert rig.take() == []  # nothing upstream until the application finishes
    rig.stack.finish(ctx, held.response)
    rig.drain()
    assert _responses(rig.take()) == [200]


def test_2xx_retransmission_after_the_transaction_is_forwarded_statelessly() -> None:
    rig = make_rig()
    _invite(rig, [A])
    [(ia, _)] = _requests(rig.take(), "INVITE")
    rig.feed(response_to(ia, 200), A)
    assert _responses(rig.take()) == [200]
    rig.feed(response_to(ia, 200), A)
    [(resp, peer)] = rig.take()
    assert isinstance(resp, Response) and resp.status == 200 and peer.port == 5070


def test_a_response_with_only_our_via_is_not_forwarded() -> None:
    rig = make_rig()
    _invite(rig, [A])
    [(ia, _)] = _requests(rig.take(), "INVITE")
    lines = response_to(ia, 180).decode().split("\r\n")
    raw = "\r\n".join(line for line in lines if not (line.startswith("Via:") and "10.0.0.3" in line))
    rig.feed(raw.encode(), A)
    assert _responses(rig.take()) == []


def test_a_branch_whose_connection_fails_counts_as_503_in_the_best_response() -> None:
    """§16.9: a transport error on a branch is a 503 from it; a 486 from another branch still wins (§16.7)."""
    rig = make_rig()
    over_tcp = Peer("tcp", "198.51.100.7", 5060)
    _invite(rig, [over_tcp, C])
    [(ic, _)] = [(m, p) for m, p in _requests(rig.take(), "INVITE") if p == C]
    rig.stack.transport_error(over_tcp, rig.now)
    rig.drain()
    assert _responses(rig.take()) == []  # the other branch is still pending
    rig.feed(response_to(ic, 486), C)
    assert _responses(rig.take()) == [486]
