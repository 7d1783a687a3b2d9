"""Path (RFC 3327): from the phone side (behaviour §8.4, T08, T09) and Path insertion toward main (§8.2 [REC])."""

from __future__ import annotations

import re

from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from tests.unit.corekit import PHONE, Core, ctid_of, main_ok, register
from tests.unit.stackkit import MAIN, response_to

EDGE_PATH = "Path: <sip:edge.example.net;lr>"


def test_t08_path_is_stripped_toward_main_stored_echoed_and_used_for_lookup() -> None:
    m = Core(mode="mirror", path_mode="lazy")
    m.feed(register(extra=f"{EDGE_PATH}\r\nSupported: path"), PHONE)
    relayed = m.to_main()
    assert relayed.headers.get("path") is None
    m.feed(main_ok(relayed), MAIN)
    reply = m.to_phone()
    assert reply.headers.get("path") == "<sip:edge.example.net;lr>"
    record = m.store.load("alice@example.com")
    assert record is not None and next(iter(record.bindings.values())).path == ["<sip:edge.example.net;lr>"]
    invite = (
        f"INVITE sip:alice@10.0.0.2:5060;ctid={ctid_of(relayed)} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-i\r\nMax-Forwards: 70\r\nFrom: <sip:b@example.com>;tag=1\r\n"
        "To: <sip:alice@example.com>\r\nCall-ID: i1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    m.feed(invite, MAIN)
    [(fwd, peer)] = [(x, p) for x, p in m.take() if isinstance(x, Request)]
    assert (peer.host, peer.port) == ("edge.example.net", 5060)
    assert fwd.headers.get("route") == "<sip:edge.example.net;lr>"
    assert str(fwd.uri) == "sip:alice@192.0.2.10:5062;transport=udp"


def test_lazy_path_is_not_echoed_without_supported_path() -> None:
    m = Core(mode="mirror", path_mode="lazy")
    m.feed(register(extra=EDGE_PATH), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    assert m.to_phone().headers.get("path") is None


def test_t09_path_strict_without_support_gets_420() -> None:
    m = Core(mode="contact", path_mode="strict")
    m.feed(register(extra=EDGE_PATH), PHONE)
    sent = m.take()
    assert [x for x, p in sent if p == MAIN] == []
    [reply] = [x for x, _ in sent if isinstance(x, Response)]
    assert reply.status == 420 and reply.headers.get("unsupported") == "path"
    assert reply.headers.get("path") == "<sip:edge.example.net;lr>"


def test_first_path_hop_must_be_a_loose_router() -> None:
    m = Core(mode="mirror", path_mode="lazy")
    m.feed(register(extra="Path: <sip:edge.example.net>\r\nSupported: path"), PHONE)
    [reply] = [x for x, _ in m.take() if isinstance(x, Response)]
    assert reply.status == 400


def test_path_received_is_shown_as_received() -> None:
    m = Core(mode="mirror", path_mode="lazy", path_received=True)
    m.feed(
        register(
            extra="Path: <sip:edge.example.net;lr;received=sip%3A203.0.113.7%3A3456>\r\nSupported: path"
        ),
        PHONE,
    )
    m.feed(main_ok(m.to_main()), MAIN)
    contact = m.to_phone().contacts[0]
    assert contact.param("received") == '"sip:203.0.113.7:3456"'


def test_path_insertion_keeps_the_contact_and_routes_calls_back_over_the_flow() -> None:
    m = Core(mode="contact", insertion="path", outgoing_expires=3600)
    nat = Peer("udp", "203.0.113.5", 40000)
    m.feed(register("<sip:alice@192.0.2.10:5062>", expires=60, via_host="10.1.1.1:5062"), nat)
    relayed = m.to_main()
    assert [str(c.uri) for c in relayed.contacts] == ["sip:alice@192.0.2.10:5062"]
    assert relayed.contacts[0].expires == "3600"
    assert relayed.headers.get("path") == "<sip:alice%40example.com@10.0.0.2:5060;lr>"
    assert "path" in (relayed.headers.get("supported") or "")
    contact = "Contact: <sip:alice@192.0.2.10:5062>;expires=3600"
    m.feed(
        response_to(relayed, 200, extra=f"{contact}\r\nPath: <sip:alice%40example.com@10.0.0.2:5060;lr>"),
        MAIN,
    )
    reply = m.to_phone(nat)
    assert reply.status == 200 and reply.contacts[0].expires == "60"
    assert reply.headers.get("path") is None
    m.advance(10)
    invite = (
        b"INVITE sip:alice@192.0.2.10:5062 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-pi\r\nMax-Forwards: 70\r\n"
        b"Route: <sip:alice%40example.com@10.0.0.2:5060;lr>\r\nFrom: <sip:b@example.com>;tag=1\r\n"
        b"To: <sip:alice@example.com>\r\nCall-ID: pi1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    m.feed(invite, MAIN)
    [(fwd, peer)] = [(x, p) for x, p in m.take() if isinstance(x, Request)]
    assert peer == nat and fwd.headers.get("route") is None
    assert str(fwd.uri) == "sip:alice@192.0.2.10:5062"
    assert m.core.stats.lookups == {"found": 1}  # the binding found by its Contact, as /metrics shows
    # and absorption still works with Path insertion
    m.feed(
        register(
            "<sip:alice@192.0.2.10:5062>", expires=60, cseq=11, branch="z9hG4bK-p2", via_host="10.1.1.1:5062"
        ),
        nat,
    )
    sent = m.take()
    assert [x for x, p in sent if p == MAIN] == []
    [reply] = [x for x, _ in sent if isinstance(x, Response)]
    assert reply.status == 200 and re.match(r"sip:alice@192\.0\.2\.10:5062", str(reply.contacts[0].uri))
