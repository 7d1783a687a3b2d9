"""A dual-stack process (one UDP socket on IPv4, one on IPv6): a message leaves from the socket of its
destination's family, and its Via names that socket. Before, the first UDP socket was used whatever the
destination: a REGISTER relayed to an IPv6 main registrar went out of the IPv4 socket (which cannot reach
it) with an IPv4 Via."""

from __future__ import annotations

from registrar.sip.message import Request, Response
from registrar.sip.stack import LocalAddress
from registrar.sip.transport import Peer
from tests.unit.corekit import Core, main_ok, register
from tests.unit.stackkit import make_rig, request_bytes

V4 = LocalAddress("udp", "10.0.0.2", 5060)
V6 = LocalAddress("udp", "[2001:db8::2]", 5060)
MAIN6 = Peer("udp", "2001:db8::3", 5070)
PHONE4 = Peer("udp", "192.0.2.10", 5062, local=0)
PHONE6 = Peer("udp", "2001:db8::10", 5062, local=1)


def dual(main: str = "sip:[2001:db8::3]:5070", mode: str = "aor") -> Core:
    return Core(
        rig=make_rig(locals_=[V4, V6]),
        main_registrar=main,
        listen=["udp:10.0.0.2:5060", "udp:[2001:db8::2]:5060"],
        mode=mode,
        outgoing_expires=3600,
    )


def sent_to(m: Core, peer_host: str) -> list[tuple[Request | Response, Peer]]:
    return [(x, p) for x, p in m.take() if p.host == peer_host]


def test_a_register_from_an_ipv4_phone_reaches_an_ipv6_main_from_the_ipv6_socket() -> None:
    m = dual()
    m.feed(register("<sip:alice@192.0.2.10:5062>;expires=600"), PHONE4)
    [(relayed, peer)] = sent_to(m, MAIN6.host)
    assert isinstance(relayed, Request) and peer.local == 1
    assert relayed.top_via.host == "[2001:db8::2]"
    assert str(relayed.contacts[0].uri).endswith("@[2001:db8::2]:5060")  # the aggregated contact: reachable


def test_a_call_from_an_ipv4_main_reaches_an_ipv6_phone_from_the_ipv6_socket() -> None:
    m = dual(main="sip:10.0.0.3:5070")
    main4 = Peer("udp", "10.0.0.3", 5070)
    data = register("<sip:alice@[2001:db8::10]:5062>;expires=600", via_host="[2001:db8::10]:5062")
    m.feed(data, PHONE6)
    [(relayed, _)] = sent_to(m, main4.host)
    assert isinstance(relayed, Request) and relayed.top_via.host == "10.0.0.2"
    m.feed(main_ok(relayed), main4)
    m.take()
    m.feed(request_bytes("INVITE", "sip:alice%40example.com@10.0.0.2:5060", branch="z9hG4bK-i6"), main4)
    [(invite, peer)] = [(x, p) for x, p in m.take() if isinstance(x, Request) and x.method == "INVITE"]
    assert peer == PHONE6 and invite.top_via.host == "[2001:db8::2]"
