"""Transport errors fail client transactions at once with 503 (RFC 3261 §17.1.4, §8.1.3.1), sans-IO.

The shell reports a connection it could not open, or one it lost, with ``Stack.transport_error``; every
client transaction still waiting for an answer from that address ends now instead of at Timer B/F.
"""

from __future__ import annotations

from registrar.sip.message import Request, Response
from registrar.sip.stack import ClientResult, IncomingRequest, ProxyFinal
from registrar.sip.transport import Peer
from registrar.sip.uri import parse_uri
from tests.unit.corekit import PHONE, Core
from tests.unit.stackkit import MAIN, Rig, make_rig, request_bytes, response_to

MAIN_TCP = Peer("tcp", "10.0.0.3", 5070)


def _relay_register(rig: Rig, main: Peer = MAIN_TCP) -> Request:
    """A phone's REGISTER relayed to ``main`` with the final held for the application, as the core does."""
    rig.feed(request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/UDP 192.0.2.10:5062"), PHONE)
    [event] = rig.take_events()
    assert isinstance(event, IncomingRequest)
    rig.stack.proxy(event.txn, [(None, main)], hold_final=True)
    rig.drain()
    [(relayed, peer)] = rig.take()
    assert isinstance(relayed, Request) and peer == main
    return relayed


def _options() -> Request:
    req = Request("OPTIONS", "sip:10.0.0.3:5070;transport=tcp")
    for name, value in [("From", "<sip:mid@10.0.0.2>;tag=x"), ("To", "<sip:10.0.0.3>"), ("Call-ID", "o1")]:
        req.headers.add(name, value)
    req.headers.add("CSeq", "1 OPTIONS")
    return req


def test_a_refused_connection_fails_the_relayed_register_with_503_at_once() -> None:
    rig = make_rig()
    _relay_register(rig)
    rig.stack.transport_error(MAIN_TCP, rig.now)
    rig.drain()
    [held] = rig.take_events()
    assert isinstance(held, ProxyFinal) and held.response.status == 503
    assert len(held.response.vias) == 1 and held.response.top_via.host == "192.0.2.10"  # our Via is gone
    rig.stack.finish(held.ctx, held.response)
    rig.drain()
    [(reply, peer)] = rig.take()
    assert isinstance(reply, Response) and reply.status == 503 and peer.port == 5062
    rig.advance(40)  # Timer F was disarmed: no 408 follows
    assert rig.take() == [] and rig.take_events() == []
    assert rig.stack.active_transactions == 0


def test_only_transactions_toward_the_failed_address_fail() -> None:
    rig = make_rig()
    _relay_register(rig)
    for other in (
        Peer("tcp", "10.0.0.3", 5071),
        Peer("tcp", "10.0.0.4", 5070),
        Peer("udp", "10.0.0.3", 5070),
    ):
        rig.stack.transport_error(other, rig.now)
    rig.drain()
    assert rig.take_events() == [] and rig.take() == []
    assert rig.stack.pending_transactions == 2  # the phone's server transaction and the relay


def test_udp_transactions_are_never_failed_by_a_transport_report() -> None:
    rig = make_rig()
    _relay_register(rig, MAIN)
    rig.stack.transport_error(Peer("tcp", MAIN.host, MAIN.port), rig.now)
    rig.drain()
    assert rig.take_events() == []


def test_a_connection_lost_after_the_answer_changes_nothing() -> None:
    rig = make_rig()
    relayed = _relay_register(rig)
    rig.feed(response_to(relayed, 200), Peer("tcp", "10.0.0.3", 5070, conn=4))
    [held] = rig.take_events()
    assert isinstance(held, ProxyFinal) and held.response.status == 200
    rig.stack.transport_error(MAIN_TCP, rig.now)
    rig.drain()
    assert rig.take_events() == [] and rig.take() == []


def test_a_lost_connection_fails_a_request_sent_on_it() -> None:
    """A request to a phone over the connection it registered on (the peer pinned to it) fails when that
    connection goes: the shell reports the address the connection is known by."""
    rig = make_rig()
    flow = Peer("tcp", "192.0.2.10", 40001, conn=9)
    rig.feed(request_bytes("INVITE"), MAIN)
    [event] = rig.take_events()
    assert isinstance(event, IncomingRequest)
    rig.stack.proxy(event.txn, [(parse_uri("sip:alice@192.0.2.10:40001;transport=tcp"), flow)])
    rig.drain()
    rig.take()
    rig.stack.transport_error(Peer("tcp", "192.0.2.10", 40001), rig.now)
    rig.drain()
    [(reply, peer)] = rig.take()
    assert isinstance(reply, Response) and reply.status == 503 and peer == MAIN


def test_an_originated_request_gets_a_503_result_not_a_timeout() -> None:
    rig = make_rig()
    handle = rig.stack.send_request(_options(), MAIN_TCP)
    rig.drain()
    rig.take()
    rig.stack.transport_error(MAIN_TCP, rig.now)
    rig.drain()
    [result] = rig.take_events()
    assert isinstance(result, ClientResult) and result.handle == handle
    assert result.response.status == 503 and not result.timed_out


def test_mirror_mode_answers_503_to_the_phone_when_the_tcp_main_registrar_is_unreachable() -> None:
    m = Core(
        main_registrar="sip:10.0.0.3:5070;transport=tcp", listen=["udp:10.0.0.2:5060", "tcp:10.0.0.2:5060"]
    )
    register = request_bytes(
        "REGISTER",
        "sip:example.com",
        via="SIP/2.0/UDP 192.0.2.10:5062",
        extra="Expires: 3600",
    )
    m.feed(register, PHONE)
    [(relayed, peer)] = m.take()
    assert isinstance(relayed, Request) and peer == MAIN_TCP
    m.rig.stack.transport_error(MAIN_TCP, m.now)
    m.rig.drain()
    for event in m.rig.take_events():  # what the shell does after every input
        m.core.handle(event, m.now)
    m.rig.drain()
    assert m.to_phone().status == 503
    assert m.store.counts() == (0, 0)
