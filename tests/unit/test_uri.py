"""URIs: sip/sips/tel parsing, IPv6 references, RFC 3261 §19.1.4 and RFC 3966 §4 comparison."""

import pytest

from registrar.sip.uri import AbsoluteURI, SipURI, TelURI, URIError, parse_uri


def _sip(text: str) -> SipURI:
    uri = parse_uri(text)
    assert isinstance(uri, SipURI)
    return uri


# RFC 3261 §19.1.4: "the following are equivalent"
EQUAL = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
    # more of the rules
    ("sip:alice@atlanta.com", "SIP:alice@ATLANTA.COM"),
    ("sip:alice:secret@atlanta.com", "sip:alice:secr%65t@atlanta.com"),
    ("sip:alice@[2001:db8::1]", "sip:alice@[2001:0DB8:0:0::1]"),
    ("sip:alice@atlanta.com;maddr=239.255.255.1;ttl=15", "sip:alice@atlanta.com;ttl=15;maddr=239.255.255.1"),
    ("sip:alice@atlanta.com;lr", "sip:alice@atlanta.com;%6C%72"),
]

# RFC 3261 §19.1.4: "the following are not equivalent"
NOT_EQUAL = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),  # user case
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),  # a port is not its default
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),  # nor is a transport
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),  # header component
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),  # no DNS in comparison
    # the intransitive example: each equals sip:carol@chicago.com but not each other
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
    # more of the rules
    ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
    ("sip:alice@atlanta.com;user=phone", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;method=INVITE", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;maddr=10.0.0.1", "sip:alice@atlanta.com"),
    ("sip:alice@atlanta.com;ttl=1", "sip:alice@atlanta.com"),
    ("sip:alice:a@atlanta.com", "sip:alice:A@atlanta.com"),  # password case
    ("sip:a%40b@atlanta.com", "sip:a%2540b@atlanta.com"),  # %25 is a literal %, not an escape
    ("sip:alice@atlanta.com?subject=x", "sip:alice@atlanta.com?subject=x&priority=urgent"),
]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_rfc3261_equal_uris(a: str, b: str) -> None:
    ua, ub = parse_uri(a), parse_uri(b)
    assert ua.equals(ub) and ub.equals(ua)


@pytest.mark.parametrize(("a", "b"), NOT_EQUAL)
def test_rfc3261_different_uris(a: str, b: str) -> None:
    ua, ub = parse_uri(a), parse_uri(b)
    assert not ua.equals(ub) and not ub.equals(ua)


def test_reserved_characters_do_not_equal_their_escapes() -> None:
    # ";" is reserved: "%3B" in a user part is data, a raw ";" is a separator inside user info.
    assert not parse_uri("sip:a%3Bb@x.example").equals(parse_uri("sip:a;b@x.example"))
    # but the hex case of an escape never matters
    assert parse_uri("sip:a%3bb@x.example").equals(parse_uri("sip:a%3Bb@x.example"))


def test_sip_uri_parts() -> None:
    uri = _sip("sips:alice:pw@Atlanta.example.com:5061;transport=TCP;lr;maddr=10.0.0.1?h=1&x")
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == (
        "sips",
        "alice",
        "pw",
        "Atlanta.example.com",
        5061,
    )
    assert uri.params == (("transport", "TCP"), ("lr", None), ("maddr", "10.0.0.1"))
    assert uri.headers == (("h", "1"), ("x", None))
    assert uri.transport == "tcp" and uri.param("LR") == "" and uri.param("nope") is None
    assert str(uri) == "sips:alice:pw@Atlanta.example.com:5061;transport=TCP;lr;maddr=10.0.0.1?h=1&x"
    assert _sip("sips:h.example").transport == "tls"
    assert _sip("sip:h.example").transport == "udp"


def test_rewritten_uri_serializes_from_its_parts() -> None:
    uri = _sip("sip:alice@10.0.0.2:5060;transport=udp")
    changed = uri.replace(params=(("transport", None), ("ctid", "42"))).without_params("nothing")
    assert str(changed) == "sip:alice@10.0.0.2:5060;transport;ctid=42"
    assert str(uri.replace(host="10.0.0.9", port=None)) == "sip:alice@10.0.0.9;transport=udp"
    assert str(uri.without_params("transport")) == "sip:alice@10.0.0.2:5060"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:alice@[2001:db8::10]", "[2001:db8::10]", None),
        ("sip:alice@[2001:db8::10]:5070;transport=tcp", "[2001:db8::10]", 5070),
        ("sip:[::1]:5060", "[::1]", 5060),
        ("sip:[2001:db8::192.0.2.1]", "[2001:db8::192.0.2.1]", None),  # RFC 5118 §4.7
        ("sip:[::ffff:192.0.2.1]", "[::ffff:192.0.2.1]", None),
    ],
)
def test_ipv6_references(text: str, host: str, port: int | None) -> None:
    uri = _sip(text)
    assert (uri.host, uri.port) == (host, port)
    assert str(uri) == text


@pytest.mark.parametrize(
    "text",
    [
        "sip:alice@2001:db8::10",  # RFC 5118 §4.2: an IPv6 address must be bracketed
        "sip:alice@[2001:db8:::192.0.2.1]",  # RFC 5118 §4.10: three colons
        "sip:alice@[2001:db8::10",
        "sip:alice@[g::1]",
        "sip:alice@[2001:db8::1::2]",
    ],
)
def test_bad_ipv6_references(text: str) -> None:
    with pytest.raises(URIError):
        parse_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:alice@",
        "sip:alice@host:99999",
        "sip:alice@ho st",
        "sip:al ice@host",
        "sip:alice@-host.example",
        "nocolon",
        ":nothing",
        "1sip:x",
        "tel:",
        "tel:+",
        "tel:xyz",
        "http:",
        "http:has space",
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(URIError):
        parse_uri(text)


def test_tel_uris() -> None:
    uri = parse_uri("tel:+1-201-555-0123;ext=1234;phone-context=example.com")
    assert isinstance(uri, TelURI)
    assert uri.number == "+1-201-555-0123"
    assert uri.param("EXT") == "1234"
    assert str(uri) == "tel:+1-201-555-0123;ext=1234;phone-context=example.com"
    local = parse_uri("tel:7042;phone-context=+1-201-555")
    assert isinstance(local, TelURI) and local.param("phone-context") == "+1-201-555"
    assert isinstance(parse_uri("TEL:*21#"), TelURI)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tel:+1-201-555-0123", "tel:+12015550123"),  # RFC 3966 §4: visual separators ignored
        ("tel:+1(201)555.0123", "tel:+12015550123"),
        ("tel:+12015550123;ext=1;isub=a", "tel:+12015550123;isub=A;EXT=1"),  # params: any order/case
        ("tel:7042;phone-context=+1-201-555", "tel:7042;phone-context=+1201555"),
        ("tel:7042;phone-context=Example.COM", "tel:7042;phone-context=example.com"),
        ("tel:ABC1;phone-context=x.example", "tel:abc1;phone-context=x.example"),
    ],
)
def test_equal_tel_uris(a: str, b: str) -> None:
    assert parse_uri(a).equals(parse_uri(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tel:+12015550123", "tel:12015550123;phone-context=+1"),  # global vs local
        ("tel:+12015550123", "tel:+12015550124"),
        ("tel:+12015550123;ext=1", "tel:+12015550123"),
        ("tel:7042;phone-context=a.example", "tel:7042;phone-context=b.example"),
        ("tel:+12015550123", "sip:+12015550123@example.com;user=phone"),
    ],
)
def test_different_tel_uris(a: str, b: str) -> None:
    assert not parse_uri(a).equals(parse_uri(b))


def test_other_schemes_are_carried_as_text() -> None:
    uri = parse_uri("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert isinstance(uri, AbsoluteURI) and uri.scheme == "urn"
    assert str(uri) == "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
    assert uri.equals(parse_uri("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"))
    assert not uri.equals(parse_uri("sip:x@y.example"))
    assert isinstance(parse_uri("mailto:alice@example.com"), AbsoluteURI)


def test_escapes_and_semicolons_in_user_info() -> None:
    uri = parse_uri("sip:user;par=u%40example.net@example.com;lr")
    assert isinstance(uri, SipURI)
    assert uri.user == "user;par=u%40example.net"
    assert uri.params == (("lr", None),)
