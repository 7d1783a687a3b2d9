"""RFC 5118 IPv6 torture test messages as test vectors (files in tests/unit/rfc5118/, provenance in its README).

Valid messages parse (parse_message + check_fields) to the values below and serialize back byte-for-byte;
invalid ones are refused with a specific ParseError: the stage that catches it ("parse" = parse_message,
"check" = check_fields), the status to answer with, whether a reply can be routed, and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from registrar.sip.errors import ParseError
from registrar.sip.headers import parse_via_sent_by
from registrar.sip.message import Request, Response, check_fields, parse_message
from registrar.sip.uri import SipURI, parse_uri
from tests.unit.torture import assert_refused, assert_refused_on_a_stream, parsed

HERE = Path(__file__).parent / "rfc5118"


def load(name: str) -> bytes:
    return (HERE / f"{name}.dat").read_bytes()


# The three SDP messages (4.6, 4.8, 4.9) carry a Content-Length that is not their body's length, as printed
# in the RFC: name -> (printed Content-Length, body length). The RFC means them as valid, so their values are
# checked with the length corrected; what this registrar does with the printed bytes is checked apart.
SDP_LENGTHS: dict[str, tuple[int, int]] = {
    "ipv6-in-sdp": (268, 251),
    "mult-ip-in-sdp": (181, 189),
    "ipv4-mapped-ipv6": (236, 245),
}


def message(name: str) -> bytes:
    """The file's bytes, with an SDP message's Content-Length set to its body's length."""
    data = load(name)
    if name not in SDP_LENGTHS:
        return data
    body = data.split(b"\r\n\r\n", 1)[1]
    return re.sub(rb"\r\nContent-Length: [0-9]+\r\n", b"\r\nContent-Length: %d\r\n" % len(body), data)


CALL_ID = "SSG9559905523997077@hlau_4100"
VIA_1 = ("UDP", "[2001:db8::9:1]", None, "z9hG4bKas3-111")

# name -> expected values. ruri = (text, host, port); to/from_ = (URI, tag);
# vias = [(transport, host, port, branch), ...] from the top; received = top-down received params;
# contacts = [(URI text, host), ...].
VALID: dict[str, dict[str, Any]] = {
    # 4.1: IPv6 references in the Request-URI, Via sent-by and Contact
    "ipv6-good": dict(
        method="REGISTER",
        ruri=("sip:[2001:db8::10]", "[2001:db8::10]", None),
        call_id=CALL_ID,
        cseq=(98176, "REGISTER"),
        to=("sip:user@example.com", None),
        from_=("sip:user@example.com", "81x2"),
        vias=[VIA_1],
        received=[None],
        contacts=[("sip:caller@[2001:db8::1]", "[2001:db8::1]")],
        max_forwards=70,
    ),
    # 4.3: well-formed; everything inside the brackets is the address (2001:db8::10:5070), no port
    "port-ambiguous": dict(
        method="REGISTER",
        ruri=("sip:[2001:db8::10:5070]", "[2001:db8::10:5070]", None),
        call_id=CALL_ID,
        cseq=(98176, "REGISTER"),
        vias=[VIA_1],
        contacts=[("sip:caller@[2001:db8::1]", "[2001:db8::1]")],
    ),
    # 4.4: the port is outside the closing bracket
    "port-unambiguous": dict(
        method="REGISTER",
        ruri=("sip:[2001:db8::10]:5070", "[2001:db8::10]", 5070),
        call_id=CALL_ID,
        cseq=(98176, "REGISTER"),
        vias=[VIA_1],
        contacts=[("sip:caller@[2001:db8::1]", "[2001:db8::1]")],
    ),
    # 4.5 (first message): received=[...] breaks RFC 3261's strict grammar, but RFC 5118 says robust
    # implementations must parse the top Via and go on; the value is kept as received.
    "via-received-param-with-delim": dict(
        method="BYE",
        ruri=("sip:[2001:db8::10]", "[2001:db8::10]", None),
        call_id=CALL_ID,
        cseq=(321, "BYE"),
        to=("sip:user@example.com", "bd76ya"),
        from_=("sip:user@example.com", "81x2"),
        vias=[VIA_1],
        received=["[2001:db8::9:255]"],
        contacts=[],
    ),
    # 4.5 (second message): received with a bare IPv6address, as RFC 3261's via-received has it
    "via-received-param-no-delim": dict(
        method="OPTIONS",
        ruri=("sip:[2001:db8::10]", "[2001:db8::10]", None),
        call_id="SSG95523997077@hlau_4100",
        cseq=(921, "OPTIONS"),
        to=("sip:user@example.com", None),
        from_=("sip:user@example.com", "81x2"),
        vias=[("UDP", "[2001:db8::9:1]", None, "z9hG4bKas3")],
        received=["2001:db8::9:255"],
        contacts=[("sip:caller@[2001:db8::9:1]", "[2001:db8::9:1]")],
    ),
    # 4.6: IPv6 in the SDP body, which has no brackets; the body is opaque here
    "ipv6-in-sdp": dict(
        method="INVITE",
        ruri=("sip:user@[2001:db8::10]", "[2001:db8::10]", None),
        call_id=CALL_ID,
        cseq=(8612, "INVITE"),
        to=("sip:user@[2001:db8::10]", None),
        from_=("sip:user@example.com", "81x2"),
        vias=[("UDP", "[2001:db8::20]", None, "z9hG4bKas3-111")],
        contacts=[("sip:caller@[2001:db8::20]", "[2001:db8::20]")],
        body=251,
    ),
    # 4.7: IPv6 references and IPv4 addresses mixed in the Via list; a port after "]"
    "mult-ip-in-header": dict(
        method="BYE",
        ruri=("sip:user@host.example.net", "host.example.net", None),
        call_id="997077@lau_4100",
        cseq=(89187, "BYE"),
        to=("sip:user@example.net", "9817--94"),
        from_=("sip:user@example.com", "81x2"),
        vias=[
            ("UDP", "[2001:db8::9:1]", 6050, "z9hG4bKas3-111"),
            ("UDP", "192.0.2.1", None, "z9hG4bKjhja8781hjuaij65144"),
            ("TCP", "[2001:db8::9:255]", None, "z9hG4bK451jj"),
        ],
        received=[None, None, "192.0.2.200"],
        contacts=[],
    ),
    # 4.8: IPv4 and IPv6 connection addresses in the SDP
    "mult-ip-in-sdp": dict(
        method="INVITE",
        ruri=("sip:user@[2001:db8::10]", "[2001:db8::10]", None),
        call_id=CALL_ID,
        cseq=(8912, "INVITE"),
        to=("sip:user@[2001:db8::10]", None),
        from_=("sip:user@example.com", "81x2"),
        vias=[VIA_1],
        contacts=[("sip:caller@[2001:db8::9:1]", "[2001:db8::9:1]")],
        body=189,
    ),
    # 4.9: IPv4-mapped IPv6 addresses in both Vias (a port after "]" in the top one) and the Contact
    "ipv4-mapped-ipv6": dict(
        method="INVITE",
        ruri=("sip:user@example.com", "example.com", None),
        call_id=CALL_ID,
        cseq=(612, "INVITE"),
        to=("sip:user@example.com", None),
        from_=("sip:user@east.example.com", "81x2"),
        vias=[
            ("UDP", "[::ffff:192.0.2.10]", 19823, "z9hG4bKbh19"),
            ("UDP", "[::ffff:192.0.2.2]", None, "z9hG4bKas3-111"),
        ],
        received=[None, None],
        contacts=[("sip:ted@[::ffff:192.0.2.2]", "[::ffff:192.0.2.2]")],
        body=245,
    ),
    # 4.10 (second message): the correct form, an IPv4 tail after "::"
    "ipv6-correct-abnf-2-colons": dict(
        method="OPTIONS",
        ruri=("sip:user@[2001:db8::192.0.2.1]", "[2001:db8::192.0.2.1]", None),
        call_id="G9559905523997077@hlau_4100",
        cseq=(689, "OPTIONS"),
        to=("sip:user@[2001:db8::192.0.2.1]", None),
        from_=("sip:user@example.com", "810x2"),
        vias=[("UDP", "lab1.east.example.com", None, "z9hG4bKas3-111")],
        contacts=[],
    ),
}

# name -> (stage, status, can_reply, reason substring)
INVALID: dict[str, tuple[str, int, bool, str]] = {
    # 4.2: "should respond with a 400 Bad Request"; the Request-URI is parsed when first used (check_fields)
    "ipv6-bad": (
        "check",
        400,
        True,
        "bad Request-URI: IPv6 address not enclosed in [] in 'sip:2001:db8::10'",
    ),
    # 4.10 (first message): ":::" is no IPv6address (RFC 5954 fixed the RFC 3261 ABNF that let it through);
    # RFC 5118 allows either tolerating it or not, and this registrar answers 400. To is checked first.
    "ipv6-bug-abnf-3-colons": ("check", 400, True, "bad IPv6 reference in 'sip:user@[2001:db8:::192.0.2.1]'"),
}


def test_every_file_has_an_expectation() -> None:
    names = {p.stem for p in HERE.glob("*.dat")}
    assert names == VALID.keys() | INVALID.keys()
    assert not VALID.keys() & INVALID.keys()


def test_messages_are_crlf_and_only_the_sdp_ones_have_bodies() -> None:
    for p in HERE.glob("*.dat"):
        data = p.read_bytes()
        assert b"\n" not in data.replace(b"\r\n", b""), p.stem
        head, body = data.split(b"\r\n\r\n", 1)
        if p.stem in SDP_LENGTHS:
            printed, length = SDP_LENGTHS[p.stem]
            assert head.endswith(b"\r\nContent-Length: %d" % printed) and len(body) == length, p.stem
            assert body.startswith(b"v=0\r\n") and body.endswith(b"\r\n"), p.stem
        else:
            assert head.endswith(b"\r\nContent-Length: 0") and body == b"", p.stem


def _parsed(name: str) -> Request | Response:
    return parsed(message(name))


def _is_ipv6_reference(host: str) -> bool:
    return host.startswith("[") and host.endswith("]") and ipaddress.ip_address(host[1:-1]).version == 6


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_message_values(name: str) -> None:
    want = VALID[name]
    msg = _parsed(name)
    assert isinstance(msg, Request)
    assert msg.method == want["method"]
    text, host, port = want["ruri"]
    assert isinstance(msg.uri, SipURI)
    assert (str(msg.uri), msg.uri.host, msg.uri.port) == (text, host, port)
    assert msg.call_id == want["call_id"]
    assert (msg.cseq.seq, msg.cseq.method) == want["cseq"]
    for key, address in (("to", msg.to), ("from_", msg.from_)):
        if key in want:
            assert (str(address.uri), address.tag) == want[key], key
    assert [(v.transport, v.host, v.port, v.branch) for v in msg.vias] == want["vias"]
    if "received" in want:
        assert [v.received for v in msg.vias] == want["received"]
    if "contacts" in want:
        got = [(str(c.uri), c.uri.host) for c in msg.contacts if isinstance(c.uri, SipURI)]
        assert got == want["contacts"]
    if "max_forwards" in want:
        assert msg.max_forwards == want["max_forwards"]
    # Bodies are opaque to a registrar: the SDP comes through untouched.
    assert len(msg.body) == want.get("body", 0)
    assert msg.body == message(name).split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("name", sorted(VALID))
def test_bracketed_hosts_are_ipv6_references(name: str) -> None:
    msg = _parsed(name)
    assert isinstance(msg, Request) and isinstance(msg.uri, SipURI)
    hosts = [msg.uri.host, *(v.host for v in msg.vias), *(c.uri.host for c in msg.contacts)]
    for host in hosts:
        assert isinstance(host, str)
        assert host.startswith("[") == (":" in host)
        if host.startswith("["):
            assert _is_ipv6_reference(host), host


def test_ambiguous_port_is_part_of_the_address() -> None:
    uri = _parsed("port-ambiguous").uri
    assert isinstance(uri, SipURI)
    assert ipaddress.IPv6Address(uri.host[1:-1]) == ipaddress.IPv6Address("2001:db8::10:5070")
    assert uri.port is None
    assert not parse_uri("sip:[2001:db8::10]:5070").equals(uri)


@pytest.mark.parametrize("name", sorted(VALID))
def test_via_sent_by_parses_on_its_own(name: str) -> None:
    # The path that routes a 400 back needs only the sent-by; it must read IPv6 references too.
    msg = _parsed(name)
    for raw, via in zip(msg.headers.fields("via"), msg.vias, strict=True):
        lone = parse_via_sent_by(raw)
        assert (lone.transport, lone.host, lone.port, lone.branch, lone.received) == (
            via.transport,
            via.host,
            via.port,
            via.branch,
            via.received,
        )


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_messages_serialize_back_byte_exact(name: str) -> None:
    assert _parsed(name).to_bytes() == message(name)


def test_sdp_message_with_a_content_length_too_large_is_refused() -> None:
    # 4.6 as printed: Content-Length 268 for 251 bytes, the same verdict as RFC 4475's clerr.
    with pytest.raises(ParseError) as info:
        parse_message(load("ipv6-in-sdp"))
    assert "Content-Length larger than the message body" in info.value.reason
    assert (info.value.status, info.value.can_reply) == (400, True)


@pytest.mark.parametrize("name", ["mult-ip-in-sdp", "ipv4-mapped-ipv6"])
def test_sdp_message_with_a_content_length_too_small_is_cut_there(name: str) -> None:
    # 4.8 and 4.9 as printed: on a datagram, bytes past Content-Length are not the body (RFC 3261 §18.3).
    printed, _length = SDP_LENGTHS[name]
    data = load(name)
    end = data.index(b"\r\n\r\n") + 4 + printed
    msg = _parsed_as_printed(name)
    assert msg.body == data[end - printed : end]
    assert msg.to_bytes() == data[:end]


def _parsed_as_printed(name: str) -> Request | Response:
    return parsed(load(name))


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_messages_are_refused(name: str) -> None:
    assert INVALID[name][2], "every refusal here can be answered, routed by its IPv6 Via"
    assert_refused(load(name), *INVALID[name])


def test_invalid_requests_fail_the_same_way_on_a_stream() -> None:
    assert_refused_on_a_stream(INVALID, load)


def test_three_colon_request_uri_alone_is_refused_too() -> None:
    # With To repaired, the Request-URI's ":::" is what check_fields names.
    data = load("ipv6-bug-abnf-3-colons").replace(
        b"To: sip:user@[2001:db8:::192.0.2.1]", b"To: sip:user@example.com"
    )
    with pytest.raises(ParseError) as info:
        check_fields(parse_message(data))
    assert info.value.status == 400
    assert "bad Request-URI: bad IPv6 reference" in info.value.reason
