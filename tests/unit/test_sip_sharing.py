"""Copies share immutable Header objects and their parsed views; the fast parsing paths agree with the
general grammar they short-cut."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.sip.errors import ParseError
from registrar.sip.headers import Via, parse_address, parse_params, split_commas
from registrar.sip.message import Header, Request, Response, parse_message, parse_via_list, typed_header
from registrar.sip.proxy import forward_copy, strip_top_via
from registrar.sip.stack import _stamp_received
from registrar.sip.transport import Peer
from registrar.sip.uri import _SIP_MATCH
from tests.unit.sipdata import REGISTER

OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-x;rport\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport=5062;branch=z9hG4bK-a1;received=192.0.2.10\r\n"
    b"From: <sip:alice@example.com>;tag=f1\r\nTo: <sip:alice@example.com>;tag=t1\r\n"
    b"Call-ID: c1\r\nCSeq: 10 REGISTER\r\nContact: <sip:alice@10.0.0.2:5060>;expires=60\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def _request() -> Request:
    msg = parse_message(REGISTER)
    assert isinstance(msg, Request)
    return msg


def test_copy_shares_headers_and_their_parsed_views() -> None:
    msg = _request()
    top = msg.top_via
    copy = msg.copy()
    assert [id(h) for h in copy.headers] == [id(h) for h in msg.headers]
    assert copy.top_via is top  # not parsed again


def test_editing_a_copy_never_changes_the_original() -> None:
    msg = _request()
    before = msg.to_bytes()
    contacts = msg.contacts
    copy = msg.copy()
    copy.headers.set("Max-Forwards", "69")
    copy.headers.remove("contact")
    copy.headers.add("Contact", "<sip:other@10.0.0.9>")
    copy.headers.prepend("Via", "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-new")
    copy.headers.pop_first_value("via")
    copy.headers.pop_first_value("via")
    assert msg.to_bytes() == before
    assert msg.contacts == contacts and msg.top_via.branch == "z9hG4bK-a1"
    assert [str(c.uri) for c in copy.contacts] == ["sip:other@10.0.0.9"]


def test_a_replaced_header_is_parsed_from_its_new_value() -> None:
    msg = _request()
    assert msg.to.tag is None
    msg.headers.set("To", "<sip:alice@example.com>;tag=abc")
    assert msg.to.tag == "abc"


def test_stamping_received_leaves_copies_alone() -> None:
    msg = _request()
    copy = msg.copy()
    _stamp_received(msg, Peer("udp", "198.51.100.7", 40000))
    assert (msg.top_via.received, msg.top_via.rport) == ("198.51.100.7", "40000")
    assert (copy.top_via.received, copy.top_via.rport) == (None, "")
    assert b"received" not in copy.to_bytes()
    # The stamped Via is kept typed; it must be what its text parses to.
    (via_header,) = [h for h in msg.headers if h.key == "via"]
    assert parse_via_list(via_header.value) == msg.vias


def test_stamping_a_via_line_with_several_values_keeps_the_others() -> None:
    data = REGISTER.replace(
        b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1\r\n",
        b"Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1, SIP/2.0/TCP 10.1.1.1;branch=z9hG4bK-b\r\n",
    )
    msg = parse_message(data)
    assert isinstance(msg, Request)
    _stamp_received(msg, Peer("udp", "198.51.100.7", 40000))
    assert [v.host for v in msg.vias] == ["192.0.2.10", "10.1.1.1"]
    assert msg.vias[0].received == "198.51.100.7"
    assert msg.headers.get("via") == (
        "SIP/2.0/UDP 192.0.2.10:5062;rport=40000;branch=z9hG4bK-a1;received=198.51.100.7, "
        "SIP/2.0/TCP 10.1.1.1;branch=z9hG4bK-b"
    )


def test_forward_copy_and_strip_top_via_leave_their_source_alone() -> None:
    msg = _request()
    before = msg.to_bytes()
    via = Via("UDP", "10.0.0.2", 5060, (("branch", "z9hG4bK-1"), ("rport", None)))
    out = forward_copy(msg, uri=None, via=via)
    assert out.top_via == via and [v.branch for v in out.vias] == ["z9hG4bK-1", "z9hG4bK-a1"]
    assert parse_via_list(str(via)) == [via]
    assert msg.to_bytes() == before and out.headers.get("max-forwards") == "69"
    response = parse_message(OK)
    assert isinstance(response, Response)
    upstream = strip_top_via(response)
    assert [v.branch for v in upstream.vias] == ["z9hG4bK-a1"]
    assert [v.branch for v in response.vias] == ["z9hG4bK-x", "z9hG4bK-a1"]


def test_typed_header_and_parsed_cache() -> None:
    via = Via("UDP", "10.0.0.2", 5060, (("branch", "z9hG4bK-1"),))
    header = typed_header("Via", str(via), parse_via_list, [via])
    assert header.key == "via" and header.parsed(parse_via_list)[0] is via
    plain = Header("Via", "SIP/2.0/UDP h.example;branch=z9hG4bK-2")
    first = plain.parsed(parse_via_list)
    assert plain.parsed(parse_via_list) is first
    bad = Header("Via", "nonsense")
    for _ in range(2):  # failures are not remembered
        try:
            bad.parsed(parse_via_list)
        except ParseError:
            pass
        else:
            raise AssertionError("expected a ParseError")


# --- the fast paths agree with the general grammar --------------------------------------------------------

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(
    rf"[ \t]*;[ \t]*({_TOKEN})(?:[ \t]*=[ \t]*({_QUOTED}|[A-Za-z0-9\-.!%*_+`'~\[\]:]*))?[ \t]*"
)


def _reference_params(text: str) -> tuple[tuple[str, str | None], ...] | None:
    """The general parameter grammar, one match at a time (None: does not parse)."""
    text = ";" + text
    pos = 0
    out: list[tuple[str, str | None]] = []
    while (m := _PARAM.match(text, pos)) is not None:
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    return tuple(out) if pos == len(text) else None


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='ab=;" \\\t.:[]<>,%', max_size=24))
def test_parse_params_matches_the_general_grammar(text: str) -> None:
    expected = _reference_params(text) if text else ()
    try:
        got: tuple[tuple[str, str | None], ...] | None = parse_params(text, "x")
    except ParseError:
        got = None
    assert got == expected


def _reference_split(value: str) -> list[str]:
    out, depth, quoted, start, i = [], 0, False, 0, 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            out.append(value[start:i].strip())
            start = i + 1
        i += 1
    out.append(value[start:].strip())
    return [p for p in out if p]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='a,; <>"\\\t', max_size=20))
def test_split_commas_matches_the_scanner(value: str) -> None:
    assert split_commas(value) == _reference_split(value)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["", '"Bob" ', "Bob ", " "]),
    st.sampled_from(["sip:a@b.example", " sip:a@b.example", "sip:a@b<x", "sip:a@b.example;lr"]),
    st.sampled_from(["", ";tag=1", " ;tag=1", "x", ';q="a;b"', ">", ';+sip.instance="<urn:uuid:1>"']),
)
def test_name_addr_without_display_name_parses_like_the_regex_path(display: str, uri: str, tail: str) -> None:
    value = f"{display}<{uri}>{tail}"
    try:
        got = parse_address(value, "Contact")
    except ParseError as exc:
        got_error: str | None = exc.reason
    else:
        got_error = None
    # The same text with a display name always takes the regex path; the results must correspond.
    try:
        ref = parse_address(f'"D" <{uri}>{tail}', "Contact")
    except ParseError as exc:
        ref_error: str | None = exc.reason
    else:
        ref_error = None
    if display:
        return  # only the no-display form takes the fast path
    assert got_error == ref_error
    if got_error is None:
        assert (got.uri, got.params) == (ref.uri, ref.params)


_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_HOSTNAME = r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*[A-Za-z](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.?"
_REFERENCE_SIP = re.compile(
    rf"(?:(?P<user>(?:[{_UNRESERVED}&=+$,;?/]|%[0-9A-Fa-f]{{2}})+)"
    rf"(?::(?P<password>(?:[{_UNRESERVED}&=+$,]|%[0-9A-Fa-f]{{2}})*))?@)?"
    rf"(?P<host>\[[0-9A-Fa-f:.]+\]|{_IPV4}|{_HOSTNAME})(?::(?P<port>[0-9]{{1,5}}))?"
    rf"(?P<params>(?:;(?:[{_UNRESERVED}\[\]/:&+$]|%[0-9A-Fa-f]{{2}})+"
    rf"(?:=(?:[{_UNRESERVED}\[\]/:&+$]|%[0-9A-Fa-f]{{2}})*)?)*)"
    r"(?:\?(?P<headers>[^\s]*))?\Z"
).match


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab1.@:;=?%2F-[]&", max_size=24))
def test_sip_uri_grammar_is_unchanged_by_possessive_runs(rest: str) -> None:
    ref, got = _REFERENCE_SIP(rest), _SIP_MATCH(rest)
    assert (ref and ref.groups()) == (got and got.groups())
