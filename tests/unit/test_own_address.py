"""How the registrar writes and recognises its own address: IPv6 references in brackets wherever it writes
an address (Via, Contact, Path, Record-Route), requests to any of its addresses answered as its own, and
its own Route entry removed from what it forwards (RFC 3261 §16.4, RFC 5118)."""

from __future__ import annotations

import pytest

from registrar.config import Settings
from registrar.net.server import local_addresses
from registrar.sip.message import Request, Response, parse_message
from registrar.sip.transport import Peer
from tests.unit.corekit import PHONE, Core, main_ok, register
from tests.unit.stackkit import make_rig, request_bytes

V6_PHONE = Peer("udp", "2001:db8::10", 5062)
V6_MAIN = Peer("udp", "2001:db8::3", 5070)
V6 = {"listen": ["udp:[2001:db8::2]:5060"], "main_registrar": "sip:[2001:db8::3]:5070"}


def _v6_core(**settings: object) -> Core:
    both = {**V6, **settings}
    rig = make_rig(locals_=local_addresses(Settings(**both)), record_route=bool(settings.get("record_route")))
    return Core(rig=rig, **both)


def _sent_to(m: Core, peer: Peer) -> list[Request | Response]:
    return [msg for msg, p in m.take() if p == peer]


def _v6_register(**kw: object) -> bytes:
    return register(
        "<sip:alice@[2001:db8::10]:5062>;expires=1800",
        via_host="[2001:db8::10]:5062",
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("insertion", ["contact", "path"])
def test_relayed_register_writes_ipv6_references_in_brackets(insertion: str) -> None:
    m = _v6_core(insertion=insertion, mode="contact", outgoing_expires=3600)
    m.feed(_v6_register(), V6_PHONE)
    [relayed] = _sent_to(m, V6_MAIN)
    assert isinstance(relayed, Request)
    text = relayed.to_bytes().decode()
    assert "Via: SIP/2.0/UDP [2001:db8::2]:5060;" in text
    written = [str(c.uri) for c in relayed.contacts] + relayed.headers.values("path")
    assert all("[2001:db8::2]:5060" in w for w in written if "2001:db8::2" in w)
    assert any("[2001:db8::2]:5060" in w for w in written)  # our address is in Contact or Path
    assert "2001:db8::2:5060" not in text.replace("[2001:db8::2]:5060", "")
    parse_message(relayed.to_bytes())  # what main receives parses (Kamailio refused the unbracketed form)


def test_reply_to_an_ipv6_phone_behind_nat_brackets_its_received_address() -> None:
    m = _v6_core(mode="contact", outgoing_expires=3600)
    natted = Peer("udp", "2001:db8::99", 40000)
    m.feed(_v6_register(), natted)
    [relayed] = _sent_to(m, V6_MAIN)
    assert isinstance(relayed, Request)
    m.feed(main_ok(relayed), V6_MAIN)
    [ok] = _sent_to(m, natted)
    assert isinstance(ok, Response) and ok.status == 200
    assert 'received="sip:[2001:db8::99]:40000"' in (ok.headers.get("contact") or "")


def test_options_to_our_own_ipv6_address_is_answered_here() -> None:
    m = _v6_core()
    options = request_bytes("OPTIONS", "sip:[2001:db8::2]:5060", via="SIP/2.0/UDP [2001:db8::10]:5062")
    m.feed(options, V6_PHONE)
    [answer] = _sent_to(m, V6_PHONE)
    assert isinstance(answer, Response) and answer.status == 200


def test_record_route_to_an_ipv6_registrar_is_bracketed() -> None:
    m = _v6_core(record_route=True)
    m.feed(_v6_register(), V6_PHONE)
    [relayed] = _sent_to(m, V6_MAIN)
    assert isinstance(relayed, Request)
    m.feed(main_ok(relayed), V6_MAIN)
    m.take()
    ctid = str(relayed.contacts[0].uri.param("ctid"))  # type: ignore[union-attr]
    invite = request_bytes(
        "INVITE", f"sip:alice@[2001:db8::2]:5060;ctid={ctid}", via="SIP/2.0/UDP [2001:db8::3]:5070"
    )
    m.feed(invite, V6_MAIN)
    [forked] = [msg for msg in _sent_to(m, V6_PHONE) if isinstance(msg, Request)]
    assert forked.headers.values("record-route")[0] == "<sip:[2001:db8::2]:5060;lr>"


@pytest.mark.parametrize("mode", ["mirror", "contact", "aor"])
@pytest.mark.parametrize("expires", [1800, 0])
def test_our_own_route_is_removed_from_a_relayed_register(mode: str, expires: int) -> None:
    """A phone using the registrar as its outbound proxy: our entries go (both of our addresses, with or
    without the default port), the next hop's stays; registrations and de-registrations alike."""
    m = Core(mode=mode, outgoing_expires=3600)
    route = "Route: <sip:10.0.0.2:5060;lr>, <sip:10.0.0.2;lr>, <sip:edge.example.net;lr>"
    m.feed(register(expires=expires, extra=route), PHONE)
    assert m.to_main().headers.values("route") == ["<sip:edge.example.net;lr>"]


def test_a_route_naming_someone_else_is_kept() -> None:
    m = Core(mode="mirror")
    m.feed(register(extra="Route: <sip:edge.example.net;lr>"), PHONE)
    assert m.to_main().headers.values("route") == ["<sip:edge.example.net;lr>"]
