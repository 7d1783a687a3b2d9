"""RFC 4475 torture test messages as test vectors (files in tests/unit/rfc4475/, provenance in its README).

Valid messages parse (parse_message + check_fields) to the values below and serialize back byte-for-byte;
invalid ones are refused with a specific ParseError: the stage that catches it ("parse" = parse_message,
"check" = check_fields), the status to answer with, whether a reply can be routed, and the reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from registrar.sip.errors import FramingError, ParseError
from registrar.sip.framing import PING, StreamFramer
from registrar.sip.headers import parse_via_sent_by
from registrar.sip.message import Request, Response, parse_message
from registrar.sip.uri import AbsoluteURI, SipURI, parse_uri
from tests.unit.torture import assert_refused, assert_refused_on_a_stream, parsed

HERE = Path(__file__).parent / "rfc4475"


def load(name: str) -> bytes:
    return (HERE / f"{name}.dat").read_bytes()


# SHA-256 of the §3.1.1 archive members, as published alongside independent decodes of the archive.
PUBLISHED_SHA256 = {
    "wsinv": "d6f6cdee99cd0a1f8e3d9a0fdd67c877700e19ab86d8186dada06f61260e3e61",
    "intmeth": "b957a8292c1c0a9851fe94705b90f94320738f43aacde64998e401f742ef688d",
    "esc01": "be3a316d4ce5f69cad474646191e390dd4b50fc8371e44b5197fe1237781973e",
    "escnull": "263fe2ecd12a5ccbb6c67b3174e9211d11da9b600e7d69666a86d2ee42873e90",
    "esc02": "9a9c59449f00327b02071feafc8e5c2a261c98c818044167894cc17809a12199",
    "lwsdisp": "d1b36b6316c12824f6f04bf6b1fd1f021cade9b74871693b9c3474cd9fa7f4e6",
    "longreq": "185739292bc676760e5b1cca77c87705aa570240171c506ad76f8c35af0ecdaa",
    "dblreq": "a6be48426565c2a705389c4ce2ea17e57b891cb13f80490a2cb9392c797b46ef",
    "semiuri": "87bbaed6b4b354dbd3c5c7a20e66686303c63e43a0aa19b89de1ac75231611a2",
    "transports": "33b4553a3b9418121b099ff07882535151edd6a1e81898c63a916aad2cbf90bc",
    "mpart01": "92147c8e24997bac59629e1b163767697d0d6d499af87f89e325d69968bec3ba",
    "unreason": "4f939d6ebf4817eea70f011d3209e83732872ffc20ffd304b244084dc392f4d7",
    "noreason": "07e11e470a69fffa3674de805e5165d1351a9439a91045ee70c9570ea24ab4fe",
}

SDP = 150  # the usual test body
UNUSUAL = "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
METHOD = "!interesting-Method0123456789_*+`.%indeed'~"
CYRILLIC = "но сто девяносто девять - простое"

# name -> expected values. method/ruri (requests) or status/reason (responses); to/from_ = (URI, tag);
# vias = [(transport, host, port, branch), ...] from the top (a prefix when via_count is given);
# contacts = [URI text, ...]; body = its length.
VALID: dict[str, dict[str, Any]] = {
    # 3.1.1 valid messages
    "wsinv": dict(
        method="INVITE",
        ruri="sip:vivekg@chair-dnrc.example.com;unknownparam",
        call_id="wsinv.ndaksdj@192.0.2.1",
        cseq=(9, "INVITE"),
        to=("sip:vivekg@chair-dnrc.example.com", "1918181833n"),
        from_=("sip:jdrosen@example.com", "98asjd8"),
        vias=[
            ("UDP", "192.0.2.2", None, "390skdjuw"),
            ("TCP", "spindle.example.com", None, "z9hG4bK9ikj8"),
            ("UDP", "192.168.255.111", None, "z9hG4bK30239"),
        ],
        contacts=["sip:jdrosen@example.com"],
        max_forwards=68,
        body=SDP,
    ),
    "intmeth": dict(
        method=METHOD,
        ruri=f"sip:{UNUSUAL}:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com",
        call_id="intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
        cseq=(139122385, METHOD),
        to=(f"sip:{UNUSUAL}@example.com", None),
        from_=("sip:mundane@example.com", "_token~1'+`*%!-."),
        vias=[("TCP", "host1.example.com", None, "z9hG4bK-.!%66*_+`'~")],
        contacts=[],
        max_forwards=255,
        body=0,
    ),
    "esc01": dict(
        method="INVITE",
        ruri="sip:sips%3Auser%40example.com@example.net",
        call_id="esc01.239409asdfakjkn23onasd0-3234",
        cseq=(234234, "INVITE"),
        to=("sip:%75se%72@example.com", None),
        from_=("sip:I%20have%20spaces@example.net", "938"),
        vias=[("UDP", "host5.example.net", None, "z9hG4bKkdjuw")],
        contacts=["sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31"],
        body=SDP,
    ),
    "escnull": dict(
        method="REGISTER",
        ruri="sip:example.com",
        call_id="escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd",
        cseq=(14398234, "REGISTER"),
        to=("sip:null-%00-null@example.com", None),
        from_=("sip:null-%00-null@example.com", "839923423"),
        vias=[("UDP", "host5.example.com", None, "z9hG4bKkdjuw")],
        contacts=["sip:%00@host5.example.com", "sip:%00%00@host5.example.com"],
        body=0,
    ),
    "esc02": dict(
        method="RE%47IST%45R",
        ruri="sip:registrar.example.com",
        call_id="esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf",
        cseq=(29344, "RE%47IST%45R"),
        to=("sip:resource@example.com", None),
        from_=("sip:resource@example.com", "f232jadfj23"),
        vias=[("TCP", "host.example.com", None, "z9hG4bK209%fzsnel234")],
        contacts=["sip:alias1@host1.example.com", "sip:alias3@host3.example.com"],  # C%6Fntact is not one
        body=0,
    ),
    "lwsdisp": dict(
        method="OPTIONS",
        ruri="sip:user@example.com",
        call_id="lwsdisp.1234abcd@funky.example.com",
        cseq=(60, "OPTIONS"),
        to=("sip:user@example.com", None),
        from_=("sip:caller@example.com", "323"),
        vias=[("UDP", "funky.example.com", None, "z9hG4bKkdjuw")],
        contacts=[],
        body=0,
    ),
    "longreq": dict(
        method="INVITE",
        ruri="sip:user@example.com",
        call_id="longreq.one" + "really" * 20 + "longcallid",
        cseq=(3882340, "INVITE"),
        to=(
            "sip:user@example.com:6000;unknownparam1=very"
            + "long" * 20
            + "value;longparam"
            + "name" * 25
            + "=shortvalue;very"
            + "long" * 25
            + "ParameterNameWithNoValue",
            None,
        ),
        from_=("sip:" + "amazinglylongcallername" * 5 + "@example.net", "1" + "298" * 50 + "2424"),
        vias=[("TCP", "sip33.example.com", None, None), ("TCP", "sip32.example.com", None, None)],
        via_count=34,
        contacts=["sip:" + "amazinglylongcallername" * 5 + "@host5.example.net"],
        max_forwards=70,
        body=SDP,
    ),
    "dblreq": dict(
        method="REGISTER",
        ruri="sip:example.com",
        call_id="dblreq.0ha0isndaksdj99sdfafnl3lk233412",
        cseq=(8, "REGISTER"),
        to=("sip:j.user@example.com", None),
        from_=("sip:j.user@example.com", "43251j3j324"),
        vias=[("UDP", "192.0.2.125", None, "z9hG4bKkdjuw23492")],
        contacts=["sip:j.user@host.example.com"],
        body=0,
    ),
    "semiuri": dict(
        method="OPTIONS",
        ruri="sip:user;par=u%40example.net@example.com",
        call_id="semiuri.0ha0isndaksdj",
        cseq=(8, "OPTIONS"),
        to=("sip:j_user@example.com", None),
        from_=("sip:caller@example.org", "33242"),
        vias=[("UDP", "192.0.2.1", None, "z9hG4bKkdjuw")],
        contacts=[],
        body=0,
    ),
    "transports": dict(
        method="OPTIONS",
        ruri="sip:user@example.com",
        call_id="transports.kijh4akdnaqjkwendsasfdj",
        cseq=(60, "OPTIONS"),
        to=("sip:user@example.com", None),
        from_=("sip:caller@example.com", "323"),
        vias=[
            ("UDP", "t1.example.com", None, "z9hG4bKkdjuw"),
            ("SCTP", "t2.example.com", None, "z9hG4bKklasjdhf"),
            ("TLS", "t3.example.com", None, "z9hG4bK2980unddj"),
            ("UNKNOWN", "t4.example.com", None, "z9hG4bKasd0f3en"),
            ("TCP", "t5.example.com", None, "z9hG4bK0a9idfnee"),
        ],
        contacts=[],
        body=0,
    ),
    "mpart01": dict(
        method="MESSAGE",
        ruri="sip:kumiko@example.org",
        call_id="3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..",
        cseq=(1, "MESSAGE"),
        to=("sip:kumiko@example.org", None),
        from_=("sip:fluffy@example.com", "2fb0dcc9"),
        vias=[("UDP", "127.0.0.1", 5070, "z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-")],
        contacts=["sip:fluffy@127.0.0.1:5070"],
        body=553,
    ),
    "unreason": dict(
        status=200,
        reason="= 2**3 * 5**2 " + CYRILLIC,
        call_id="unreason.1234ksdfak3j2erwedfsASdf",
        cseq=(35, "INVITE"),
        to=("sip:user@example.edu", "2229"),
        from_=("sip:user@example.com", "11141343"),
        vias=[("UDP", "192.0.2.198", None, "z9hG4bK1324923")],
        contacts=["sip:user@host198.example.com"],
        body=154,
    ),
    "noreason": dict(
        status=100,
        reason="",
        call_id="noreason.asndj203insdf99223ndf",
        cseq=(35, "INVITE"),
        to=("sip:user@example.edu", "902jndnke3"),
        from_=("sip:user@example.com", "39ansfi3"),
        vias=[("UDP", "192.0.2.105", None, "z9hG4bK2398ndaoe")],
        contacts=["sip:user@host105.example.com"],
        body=0,
    ),
    # 3.2 / 3.3 / 3.4: syntactically valid; what they test is above the parser
    "badbranch": dict(
        method="OPTIONS",
        call_id="badbranch.sadonfo23i420jv0as0derf3j3n",
        vias=[("UDP", "192.0.2.1", None, "z9hG4bK")],
        max_forwards=3,
    ),
    "unkscm": dict(method="OPTIONS", ruri="nobodyKnowsThisScheme:totallyopaquecontent", contacts=[]),
    "novelsc": dict(method="OPTIONS", ruri="soap.beep://192.0.2.103:3002"),
    "unksm2": dict(
        method="REGISTER",
        to=("isbn:2983792873", None),
        from_=("http://www.example.com", "3234233"),
        contacts=["name:John_Smith"],
        vias=[("UDP", "192.0.2.21", 5060, "z9hG4bKkdjuw")],
    ),
    "bext01": dict(method="OPTIONS", vias=[("TLS", "fold-and-staple.example.com", None, "z9hG4bKkdjuw")]),
    "invut": dict(method="INVITE", call_id="invut.0ha0isndaksdjadsfij34n23d", body=40),
    "regaut01": dict(method="REGISTER", cseq=(9338, "REGISTER"), body=0),
    "bcast": dict(
        status=200,
        reason="OK",
        vias=[
            ("UDP", "192.0.2.198", None, "z9hG4bK1324923"),
            ("UDP", "255.255.255.255", None, "z9hG4bK1saber23"),
        ],
        body=154,
    ),
    "zeromf": dict(method="OPTIONS", max_forwards=0, body=0),
    "cparam01": dict(method="REGISTER", contacts=["sip:+19725552222@gw1.example.net"]),
    "cparam02": dict(method="REGISTER", contacts=["sip:+19725552222@gw1.example.net;unknownparam"]),
    "regescrt": dict(method="REGISTER", contacts=["sip:user@example.com?Route=%3Csip:sip.example.com%3E"]),
    "sdp01": dict(method="INVITE", call_id="sdp01.ndaksdj9342dasdd", body=SDP),
    "inv2543": dict(
        method="INVITE",
        ruri="sip:UserB@example.com",
        call_id="inv2543.1717@ift.client.example.com",
        cseq=(56, "INVITE"),
        to=("sip:+16505552222@ss1.example.net", None),
        from_=("sip:+13035551111@ift.client.example.net;user=phone", None),
        vias=[("UDP", "iftgw.example.com", None, None)],
        contacts=[],
        max_forwards=None,
        body=105,
    ),
}

# name -> (stage, status, can_reply, reason substring)
INVALID: dict[str, tuple[str, int, bool, str]] = {
    "badinv01": ("parse", 400, True, "empty Via parameter"),
    "clerr": ("parse", 400, True, "Content-Length larger than the message body"),
    "ncl": ("parse", 400, True, "bad Content-Length '-999': negative"),
    "scalar02": ("parse", 400, True, "CSeq number too large"),
    "scalarlg": ("parse", 400, False, "CSeq number too large"),  # a response: dropped
    "quotbal": ("check", 400, True, "unterminated quoted display name in To"),
    "ltgtruri": ("parse", 400, True, "Request-URI must not be enclosed in <>"),
    "lwsruri": ("parse", 400, True, "Request-URI contains whitespace"),
    "lwsstart": ("parse", 400, True, "Request-Line elements must be separated by a single SP"),
    "trws": ("parse", 400, True, "whitespace at the end of the Request-Line"),
    "escruri": ("check", 400, True, "Request-URI must not carry header components"),
    "baddate": ("check", 400, True, "bad Date"),
    "regbadct": ("check", 400, True, "Contact URI with spaces, commas or headers must be enclosed in <>"),
    "badaspec": ("check", 400, True, "whitespace inside <> around the URI in To"),
    "baddn": ("check", 400, True, "display name must be tokens or a quoted string"),
    "badvers": ("parse", 505, True, "SIP version 'SIP/7.0' not supported"),
    "mismatch01": ("parse", 400, True, "CSeq method does not match the request method"),
    # RFC 4475 §3.1.2.18 prefers 501 for an unknown method; the CSeq mismatch is a syntax error first.
    "mismatch02": ("parse", 400, True, "CSeq method does not match the request method"),
    "bigcode": ("parse", 400, False, "bad Status-Code '4294967301'"),  # a response: dropped
    "insuf": ("parse", 400, True, "missing from, to, call-id header fields"),
    "multi01": ("parse", 400, True, "duplicate cseq header field"),
    "mcl01": ("parse", 400, True, "duplicate content-length header field"),
}


def test_every_file_has_an_expectation() -> None:
    names = {p.stem for p in HERE.glob("*.dat")}
    assert names == VALID.keys() | INVALID.keys()
    assert not VALID.keys() & INVALID.keys()
    assert len(names) == 49


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHA256))
def test_valid_messages_are_the_published_bytes(name: str) -> None:
    assert hashlib.sha256(load(name)).hexdigest() == PUBLISHED_SHA256[name]


def test_messages_keep_their_odd_bytes() -> None:
    assert b"\r\n" in load("wsinv") and b"\n" not in load("wsinv").replace(b"\r\n", b"")
    assert b"\x00" in load("intmeth") and b"\x07" in load("intmeth") and b"\x7f" in load("intmeth")
    assert load("noreason").startswith(b"SIP/2.0 100 \r\n")
    assert load("trws").startswith(b"OPTIONS sip:remote-target@example.com SIP/2.0  \r\n")
    assert b"Expires: 1" + b"0" * 100 + b"\r\n" in load("scalar02")


def _parsed(name: str) -> Request | Response:
    return parsed(load(name))


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_message_values(name: str) -> None:
    want = VALID[name]
    msg = _parsed(name)
    if "method" in want:
        assert isinstance(msg, Request)
        assert msg.method == want["method"]
        if "ruri" in want:
            assert str(msg.uri) == want["ruri"]
    else:
        assert isinstance(msg, Response)
        assert (msg.status, msg.reason) == (want["status"], want["reason"])
    if "call_id" in want:
        assert msg.call_id == want["call_id"]
    if "cseq" in want:
        assert (msg.cseq.seq, msg.cseq.method) == want["cseq"]
    for key, address in (("to", msg.to), ("from_", msg.from_)):
        if key in want:
            assert (str(address.uri), address.tag) == want[key], key
    if "vias" in want:
        got = [(v.transport, v.host, v.port, v.branch) for v in msg.vias]
        count = want.get("via_count", len(want["vias"]))
        assert len(got) == count
        assert got[: len(want["vias"])] == want["vias"]
    if "contacts" in want:
        assert [str(c.uri) for c in msg.contacts] == want["contacts"]
    if "max_forwards" in want:
        assert isinstance(msg, Request) and msg.max_forwards == want["max_forwards"]
    if "body" in want:
        assert len(msg.body) == want["body"]


@pytest.mark.parametrize("name", sorted(set(VALID) - {"dblreq", "inv2543"}))
def test_valid_messages_serialize_back_byte_exact(name: str) -> None:
    assert _parsed(name).to_bytes() == load(name)


def test_dblreq_serializes_the_first_request_only() -> None:
    data = load("dblreq")
    end = data.index(b"\r\n\r\n") + 4
    assert _parsed("dblreq").to_bytes() == data[:end]


def test_inv2543_gains_only_a_content_length() -> None:
    data = load("inv2543")
    head, body = data.split(b"\r\n\r\n", 1)
    assert _parsed("inv2543").to_bytes() == head + b"\r\nContent-Length: 105\r\n\r\n" + body


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_messages_are_refused(name: str) -> None:
    assert_refused(load(name), *INVALID[name])


def test_invalid_requests_fail_the_same_way_on_a_stream() -> None:
    assert_refused_on_a_stream(INVALID, load)  # framing on a stream: see below


# ---------------------------------------------------------------------------------------- details


def test_wsinv_unfolds_to_single_spaces_and_keeps_raw_lines() -> None:
    msg = _parsed("wsinv")
    assert msg.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.headers.get("cseq") == "0009 INVITE"
    assert msg.headers.get("Subject") == ""
    assert msg.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.from_.display == '"J Rosenberg \\\\\\""'
    (contact,) = msg.contacts
    assert contact.address is not None and contact.address.display == '"Quoted string \\"\\""'
    assert contact.address.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))
    assert contact.q == 0.33
    (route,) = msg.addresses("route")
    assert isinstance(route.uri, SipURI) and route.uri.has_param("lr")
    assert route.uri.param("unknownwith") == "value" and route.uri.has_param("unknown-no-value")


def test_intmeth_values() -> None:
    msg = _parsed("intmeth")
    assert isinstance(msg, Request) and isinstance(msg.uri, SipURI)
    assert msg.uri.user == UNUSUAL
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.to.display == '"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f"'
    assert msg.from_.display == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.param("fromParam''~+*_!.-%") == '"работающий"'
    assert msg.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def test_escaped_uris_compare_equal_to_their_plain_forms() -> None:
    esc01 = _parsed("esc01")
    assert isinstance(esc01, Request) and isinstance(esc01.uri, SipURI)
    assert esc01.uri.user == "sips%3Auser%40example.com"  # kept as written: compared escape by escape
    assert esc01.to.uri.equals(parse_uri("sip:user@example.com"))
    contact = esc01.contacts[0].uri
    assert contact.equals(parse_uri("sip:caller@host5.example.net;lr;name=value%2541"))
    escnull = _parsed("escnull")
    assert isinstance(escnull.to.uri, SipURI) and escnull.to.uri.user == "null-%00-null"
    assert not escnull.contacts[0].uri.equals(escnull.contacts[1].uri)


def test_semiuri_user_part_holds_the_semicolon() -> None:
    msg = _parsed("semiuri")
    assert isinstance(msg, Request) and isinstance(msg.uri, SipURI)
    assert (msg.uri.user, msg.uri.host, msg.uri.params) == ("user;par=u%40example.net", "example.com", ())
    assert msg.headers.values("Accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_mpart01_binary_body_is_kept() -> None:
    msg = _parsed("mpart01")
    assert msg.body.startswith(b"--7a9cbec02ceef655\r\n") and msg.body.endswith(b"--7a9cbec02ceef655--\r\n")
    assert b"\x30\x82\x01\x52\x06\x09\x2a\x86\x48\x86\xf7\x0d" in msg.body
    assert msg.top_via.rport == ""


def test_contact_parameters_belong_where_the_brackets_say() -> None:
    (c1,) = _parsed("cparam01").contacts
    assert c1.address is not None and c1.address.params == (("unknownparam", None),)
    assert isinstance(c1.uri, SipURI) and c1.uri.params == ()
    (c2,) = _parsed("cparam02").contacts
    assert c2.address is not None and c2.address.params == ()
    assert isinstance(c2.uri, SipURI) and c2.uri.params == (("unknownparam", None),)
    (c3,) = _parsed("regescrt").contacts
    assert isinstance(c3.uri, SipURI) and c3.uri.headers == (("Route", "%3Csip:sip.example.com%3E"),)


def test_unknown_schemes_parse_as_absolute_uris() -> None:
    for name in ("unkscm", "novelsc"):
        msg = _parsed(name)
        assert isinstance(msg, Request) and isinstance(msg.uri, AbsoluteURI)
    unksm2 = _parsed("unksm2")
    assert isinstance(unksm2.to.uri, AbsoluteURI) and unksm2.to.uri.scheme == "isbn"
    assert isinstance(unksm2.contacts[0].uri, AbsoluteURI)


def test_application_level_fields_are_passed_through() -> None:
    bext = _parsed("bext01")
    assert bext.headers.values("Require") == ["nothingSupportsThis", "nothingSupportsThisEither"]
    assert bext.headers.values("Proxy-Require") == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]
    assert _parsed("regaut01").headers.get("Authorization") == "NoOneKnowsThisScheme opaque-data=here"
    assert _parsed("invut").body == b'<audio>\r\n <pcmu port="443"/>\r\n</audio>\r\n'
    assert _parsed("sdp01").headers.get("Accept") == "text/nobodyKnowsThis"


def test_inv2543_on_a_stream_needs_a_content_length() -> None:
    with pytest.raises(ParseError, match="Content-Length is required"):
        parse_message(load("inv2543"), stream=True)


def test_badinv01_reply_is_routed_by_the_sent_by() -> None:
    with pytest.raises(ParseError) as info:
        parse_message(load("badinv01"))
    assert info.value.message is not None
    via = parse_via_sent_by(info.value.message.headers.fields("via")[0])
    assert (via.transport, via.host, via.port, via.params) == ("UDP", "192.0.2.15", None, ())


def test_an_ack_is_never_answered() -> None:
    data = load("mismatch01").replace(b"OPTIONS sip:", b"ACK sip:", 1)
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert not info.value.can_reply


# ------------------------------------------------------------------------------------ on a stream


def test_dblreq_on_a_stream_is_two_requests() -> None:
    framer = StreamFramer()
    out = framer.feed(load("dblreq"))
    first, second = out[0], out[1]
    assert isinstance(first, bytes) and isinstance(second, bytes)
    assert parse_message(first, stream=True).cseq.method == "REGISTER"
    invite = parse_message(second, stream=True)
    assert invite.cseq.method == "INVITE" and len(invite.body) == 150


def test_clerr_on_a_stream_waits_for_the_rest() -> None:
    framer = StreamFramer()
    assert framer.feed(load("clerr")) == []
    assert framer.buffered == len(load("clerr"))


@pytest.mark.parametrize(("name", "reason"), [("ncl", "bad Content-Length"), ("mcl01", "Content-Length")])
def test_unframeable_messages_break_the_stream(name: str, reason: str) -> None:
    framer = StreamFramer()
    (error,) = framer.feed(load(name))
    assert isinstance(error, FramingError) and reason in error.reason
    assert framer.closed
    assert framer.feed(b"OPTIONS sip:x SIP/2.0\r\n\r\n") == []


def test_keepalive_ping_before_a_torture_message() -> None:
    framer = StreamFramer()
    out = framer.feed(b"\r\n\r\n" + load("esc02"))
    assert out == [PING, load("esc02")]
