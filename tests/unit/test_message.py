"""Parser and serializer: round trips, header model, typed views."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.sip.errors import ParseError
from registrar.sip.headers import split_commas
from registrar.sip.message import Headers, Request, Response, check_fields, make_response, parse_message
from registrar.sip.uri import SipURI
from tests.unit.sipdata import INVITE, REGISTER


def test_register_round_trip_is_byte_exact() -> None:
    msg = parse_message(REGISTER)
    assert msg.to_bytes() == REGISTER


def test_register_fields() -> None:
    msg = parse_message(REGISTER)
    assert isinstance(msg, Request)
    assert msg.method == "REGISTER"
    assert str(msg.uri) == "sip:example.com"
    assert msg.call_id == "c1@192.0.2.10"
    assert (msg.cseq.seq, msg.cseq.method) == (10, "REGISTER")
    assert msg.from_.display == '"Alice"' and msg.from_.tag == "f1"
    assert isinstance(msg.to.uri, SipURI) and msg.to.uri.user == "alice"
    via = msg.top_via
    assert (via.transport, via.host, via.port, via.branch, via.rport) == (
        "UDP",
        "192.0.2.10",
        5062,
        "z9hG4bK-a1",
        "",
    )
    (contact,) = msg.contacts
    assert contact.expires == "1800"
    assert contact.instance == "<urn:uuid:1111>"
    assert contact.uri.transport == "udp"
    assert msg.headers.values("allow") == ["INVITE", "ACK", "CANCEL", "BYE", "OPTIONS"]


def test_compact_forms_are_the_same_headers() -> None:
    raw = (
        b"OPTIONS sip:a@b.example SIP/2.0\r\nv: SIP/2.0/TCP h.example;branch=z9hG4bK1\r\n"
        b"f: <sip:x@y.example>;tag=1\r\nt: sip:a@b.example\r\ni: abc\r\nCSeq: 1 OPTIONS\r\n"
        b"m: <sip:x@1.2.3.4>\r\nk: path, gruu\r\nl: 0\r\ns: hi\r\ne: gzip\r\no: reg\r\nu: dialog\r\n"
        b"r: <sip:c@d.example>\r\nb: <sip:e@f.example>\r\nx: 90\r\ny: abc\r\nc: text/plain\r\n\r\n"
    )
    msg = parse_message(raw)
    assert msg.call_id == "abc"
    assert msg.headers.get("Call-ID") == "abc"
    assert msg.headers.values("Supported") == ["path", "gruu"]
    for full in (
        "Subject",
        "Content-Encoding",
        "Event",
        "Allow-Events",
        "Refer-To",
        "Referred-By",
        "Session-Expires",
        "Identity",
        "Content-Type",
        "Contact",
        "Content-Length",
    ):
        assert msg.headers.get(full) is not None, full
    assert msg.to_bytes() == raw


def test_comma_split_respects_quotes_and_brackets() -> None:
    value = '"Doe, John" <sip:j@x.example;a=1,2>;q=0.5, <sip:k@y.example>, sip:z@w.example'
    assert split_commas(value) == [
        '"Doe, John" <sip:j@x.example;a=1,2>;q=0.5',
        "<sip:k@y.example>",
        "sip:z@w.example",
    ]


def test_multiple_contacts_and_star() -> None:
    raw = REGISTER.replace(
        b"Contact: <sip:alice@192.0.2.10:5062;transport=udp>",
        b'Contact: <sip:a@1.2.3.4>;q=0.5, "B" <sip:b@1.2.3.5>\r\n'
        b"m: <sip:c@1.2.3.6>;expires=0\r\nContact: <sip:d@1.2.3.7>",
    )
    msg = parse_message(raw)
    uris = [str(c.uri) for c in msg.contacts]
    assert uris == ["sip:a@1.2.3.4", "sip:b@1.2.3.5", "sip:c@1.2.3.6", "sip:d@1.2.3.7"]
    assert msg.contacts[0].q == 0.5
    star = parse_message(
        REGISTER.replace(
            b"Contact: <sip:alice@192.0.2.10:5062;transport=udp>;"
            b'+sip.instance="<urn:uuid:1111>";expires=1800',
            b"Contact: *",
        )
    )
    assert star.contacts[0].star


def test_editing_a_header_refreshes_its_typed_view() -> None:
    msg = parse_message(REGISTER)
    assert msg.contacts[0].expires == "1800"
    msg.headers.set("Contact", "<sip:alice@10.0.0.2:5060;ctid=7>;expires=60")
    assert msg.contacts[0].expires == "60"
    assert b"Contact: <sip:alice@10.0.0.2:5060;ctid=7>;expires=60\r\n" in msg.to_bytes()
    # untouched headers stay byte-exact
    assert b'From: "Alice" <sip:alice@example.com>;tag=f1\r\n' in msg.to_bytes()


def test_via_push_pop() -> None:
    msg = parse_message(REGISTER)
    msg.headers.prepend("Via", "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKmid")
    assert [v.host for v in msg.vias] == ["10.0.0.2", "192.0.2.10"]
    assert msg.headers.pop_first_value("Via") == "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKmid"
    assert msg.to_bytes() == REGISTER
    combined = Headers()
    combined.add("Via", "SIP/2.0/UDP a.example;branch=z9hG4bK1, SIP/2.0/UDP b.example;branch=z9hG4bK2")
    assert combined.pop_first_value("Via") == "SIP/2.0/UDP a.example;branch=z9hG4bK1"
    assert combined.get("via") == "SIP/2.0/UDP b.example;branch=z9hG4bK2"


def test_body_and_content_length() -> None:
    msg = parse_message(INVITE)
    assert msg.body == b"v=0\n"
    msg.body = b"v=0\r\no=x\r\n"
    assert b"Content-Length: 10\r\n\r\nv=0\r\no=x\r\n" in msg.to_bytes()


def test_extra_bytes_after_body_on_udp_are_ignored() -> None:
    msg = parse_message(INVITE + b"garbage")
    assert msg.body == b"v=0\n"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (INVITE.replace(b"Content-Length: 4", b"Content-Length: 40"), "Content-Length larger"),
        (INVITE.replace(b"Content-Length: 4", b"Content-Length: -4"), "bad Content-Length"),
        (REGISTER.replace(b"Call-ID: c1@192.0.2.10\r\n", b""), "missing call-id"),
        (REGISTER.replace(b"CSeq: 10 REGISTER", b"CSeq: 10 INVITE"), "CSeq method"),
        (REGISTER.replace(b"CSeq: 10 REGISTER", b"CSeq: 99999999999 REGISTER"), "CSeq number too large"),
        (REGISTER.replace(b"Max-Forwards: 70", b"Max-Forwards: 300"), "Max-Forwards"),
        (REGISTER.replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1), "version"),
        (REGISTER.replace(b"REGISTER sip:example.com", b"REGISTER  sip:example.com"), "Request-Line"),
        (
            REGISTER.replace(
                b"To: <sip:alice@example.com>\r\n", b"To: <sip:alice@example.com>\r\nTo: <sip:b@c>\r\n"
            ),
            "duplicate to",
        ),
    ],
)
def test_invalid_requests_give_specific_400(raw: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(raw)
    assert reason.lower() in info.value.reason.lower()
    assert info.value.can_reply
    assert info.value.status in (400, 505)


def test_no_via_cannot_be_answered() -> None:
    with pytest.raises(ParseError) as info:
        parse_message(REGISTER.replace(b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1\r\n", b""))
    assert not info.value.can_reply


@pytest.mark.parametrize(
    "field",
    [
        b'From: "Alice <sip:alice@example.com>;tag=f1',
        b"From: Al<ice <sip:alice@example.com>;tag=f1",
        b"From: sip:alice@example.com?x=y;tag=f1",
    ],
)
def test_bad_from_is_refused_on_use(field: bytes) -> None:
    msg = parse_message(REGISTER.replace(b'From: "Alice" <sip:alice@example.com>;tag=f1', field))
    with pytest.raises(ParseError):
        check_fields(msg)


def test_make_response_copies_dialog_headers() -> None:
    req = parse_message(REGISTER)
    assert isinstance(req, Request)
    resp = make_response(req, 200, to_tag="tt")
    data = resp.to_bytes()
    assert data.startswith(b"SIP/2.0 200 OK\r\n")
    assert b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1\r\n" in data
    assert b"To: <sip:alice@example.com>;tag=tt\r\n" in data
    back = parse_message(data)
    assert isinstance(back, Response) and back.status == 200 and back.to.tag == "tt"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parser_never_raises_anything_but_parse_error(data: bytes) -> None:
    try:
        msg = parse_message(data)
        check_fields(msg)
    except ParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(REGISTER)), st.binary(min_size=1, max_size=8))
def test_mutated_register_never_crashes(pos: int, junk: bytes) -> None:
    data = REGISTER[:pos] + junk + REGISTER[pos:]
    try:
        msg = parse_message(data)
        check_fields(msg)
        msg.to_bytes()
    except ParseError:
        pass


# ------------------------------------------------------------------ folding, compact forms, IPv6, errors


def test_folded_headers_unfold_to_one_space_and_serialize_as_received() -> None:
    raw = REGISTER.replace(
        b"User-Agent: Foo/1.0\r\n",
        b"User-Agent: Foo/1.0\r\n   (folded\r\n\tagain)\r\nSubject:\r\n hi\r\n",
    ).replace(b"To: <sip:alice@example.com>", b"To:\r\n <sip:alice@example.com>\r\n ;tag=x")
    msg = parse_message(raw)
    assert msg.headers.get("user-agent") == "Foo/1.0 (folded again)"
    assert msg.headers.get("subject") == "hi"
    assert msg.to.tag == "x" and str(msg.to.uri) == "sip:alice@example.com"
    assert msg.to_bytes() == raw


def test_continuation_before_any_header_is_refused() -> None:
    raw = REGISTER.replace(b"SIP/2.0\r\nVia:", b"SIP/2.0\r\n folded\r\nVia:", 1)
    with pytest.raises(ParseError, match="continuation line before any header"):
        parse_message(raw)


def test_upper_case_compact_forms() -> None:
    raw = (
        b"OPTIONS sip:a@b.example SIP/2.0\r\nV: SIP/2.0/UDP h.example;branch=z9hG4bK1\r\n"
        b"F: <sip:x@y.example>;tag=1\r\nT: <sip:a@b.example>\r\nI: abc\r\nCSeq: 1 OPTIONS\r\n"
        b"M: <sip:x@1.2.3.4>\r\nL: 0\r\n\r\n"
    )
    msg = parse_message(raw)
    assert msg.call_id == "abc" and msg.top_via.host == "h.example" and msg.contacts[0].uri.host == "1.2.3.4"
    assert msg.headers.get("content-length") == "0"


def test_ipv6_via_contact_and_request_uri() -> None:
    raw = (
        b"REGISTER sip:[2001:db8::10] SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas3-111;received=[2001:db8::9:255];rport\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:user@[2001:db8::10]>;tag=81x2\r\n"
        b"To: <sip:user@[2001:db8::10]>\r\n"
        b"Call-ID: SSG9559905523997077@hlau_4100\r\n"
        b"CSeq: 1 REGISTER\r\n"
        b'Contact: "Caller" <sip:caller@[2001:db8::9:1]:5070;transport=udp>\r\n'
        b"Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(raw)
    check_fields(msg)
    via = msg.top_via
    assert (via.host, via.port, via.received, via.rport) == ("[2001:db8::9:1]", 5070, "[2001:db8::9:255]", "")
    assert isinstance(msg.uri, SipURI) and msg.uri.host == "[2001:db8::10]"
    assert msg.contacts[0].uri.port == 5070
    assert msg.to_bytes() == raw
    with pytest.raises(ParseError, match="IPv6"):
        parse_message(raw.replace(b"[2001:db8::9:1]:5070;branch", b"[2001:db8:::9:1]:5070;branch"))


def test_empty_reason_phrase_is_kept() -> None:
    raw = b"SIP/2.0 180 \r\n" + make_response(parse_message(REGISTER), 180).to_bytes().split(b"\r\n", 1)[1]
    msg = parse_message(raw)
    assert isinstance(msg, Response) and msg.reason == ""
    assert msg.to_bytes() == raw
    assert Response(180).reason == "Ringing"  # a new response still gets the standard phrase


def test_parse_error_carries_the_partial_request() -> None:
    raw = REGISTER.replace(b"CSeq: 10 REGISTER", b"CSeq: 10 INVITE")
    with pytest.raises(ParseError) as info:
        parse_message(raw)
    partial = info.value.message
    assert isinstance(partial, Request) and partial.call_id == "c1@192.0.2.10"
    reply = make_response(partial, 400, to_tag="x").to_bytes()
    assert b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1\r\n" in reply
    # start-line errors too, as long as the header fields split
    with pytest.raises(ParseError) as info:
        parse_message(REGISTER.replace(b"REGISTER sip:example.com", b"REGISTER <sip:example.com>", 1))
    assert info.value.can_reply and isinstance(info.value.message, Request)
    assert info.value.message.method == "REGISTER"


@pytest.mark.parametrize(
    ("raw", "can_reply"),
    [
        # a response is never answered
        (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h.example;branch=z9hG4bK1\r\nCSeq: 1 INVITE\r\n\r\n", False),
        # an ACK is never answered
        (REGISTER.replace(b"REGISTER sip:", b"ACK sip:", 1), False),
        # no Via, or one without a usable sent-by: nowhere to send it
        (REGISTER.replace(b"Via: SIP/2.0/UDP 192.0.2.10:5062;", b"Via: junk;"), False),
        (
            REGISTER.replace(b"REGISTER sip:example.com", b"REGISTER  sip:example.com").replace(
                b"Via:", b"X:"
            ),
            False,
        ),
        # broken Via parameters, but a sent-by to answer to
        (REGISTER.replace(b";rport;branch=z9hG4bK-a1", b";;branch=z9hG4bK-a1"), True),
        (REGISTER.replace(b"REGISTER sip:example.com", b"REGISTER  sip:example.com"), True),
    ],
)
def test_can_reply(raw: bytes, can_reply: bool) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(raw)
    assert info.value.can_reply is can_reply


def test_check_fields_errors_on_responses_cannot_be_answered() -> None:
    data = make_response(parse_message(REGISTER), 200).to_bytes().replace(b"To: <sip:", b"To: <sip: ")
    msg = parse_message(data)
    with pytest.raises(ParseError) as info:
        check_fields(msg)
    assert not info.value.can_reply and info.value.message is msg


def test_date_is_checked_by_check_fields_only() -> None:
    good = REGISTER.replace(b"User-Agent", b"Date: Sat, 13 Nov 2010 23:29:00 GMT\r\nUser-Agent")
    check_fields(parse_message(good))
    bad = parse_message(good.replace(b"GMT", b"EST"))  # parse_message lets a proxy forward it
    with pytest.raises(ParseError, match="bad Date"):
        check_fields(bad)


def test_lenient_via_for_routing_replies() -> None:
    from registrar.sip.headers import parse_via_sent_by

    via = parse_via_sent_by("SIP/2.0/UDP 192.0.2.15:5062;;rport;=x;branch=z9hG4bK1;")
    assert (via.host, via.port, via.rport, via.branch) == ("192.0.2.15", 5062, "", "z9hG4bK1")
    with pytest.raises(ParseError):
        parse_via_sent_by("SIP/2.0/UDP ;branch=z9hG4bK1")


def test_outbound_contact_path_route_and_authorization() -> None:
    raw = REGISTER.replace(
        b"User-Agent: Foo/1.0\r\n",
        b'Contact: <sip:line1@192.0.2.10;ob>;+sip.instance="<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'
        b";reg-id=1;q=0.7;expires=600\r\n"
        b"Path: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
        b"Route: <sip:r1.example.com;lr>\r\nRecord-Route: <sip:rr.example.com;lr>\r\n"
        b'Authorization: Digest username="alice", realm="example.com", nonce="a,b",'
        b' uri="sip:example.com", response="0123456789abcdef"\r\n'
        b"Expires: 3600\r\n",
    )
    msg = parse_message(raw)
    check_fields(msg)
    ob = msg.contacts[1]
    assert ob.instance == "<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"
    assert (ob.reg_id, ob.q, ob.expires) == ("1", 0.7, "600")
    assert [str(a.uri) for a in msg.addresses("path")] == ["sip:p1.example.com;lr", "sip:p2.example.com;lr"]
    assert [str(a.uri) for a in msg.addresses("record-route")] == ["sip:rr.example.com;lr"]
    # Authorization is one value, commas and all, and goes out as it came in
    assert msg.headers.values("authorization") == [msg.headers.get("authorization")]
    assert msg.headers.get("expires") == "3600"
    assert msg.to_bytes() == raw
