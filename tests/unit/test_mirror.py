"""Mode mirror end to end through the sans-IO pipeline (behaviour §3, §4, §9.1; behaviour §15 A/B)."""

from __future__ import annotations

import re

import pytest

from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from tests.unit.corekit import NATTED, PHONE, Core, ctid_of, main_ok, register
from tests.unit.stackkit import MAIN, response_to


def Mirror(**settings: object) -> Core:
    return Core(mode="mirror", **settings)


def test_t11_initial_registration_and_reply_rewrite() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    relayed = m.to_main()
    assert str(relayed.uri) == "sip:10.0.0.3:5070"
    (contact,) = relayed.contacts
    assert re.fullmatch(r"sip:alice@10\.0\.0\.2:5060;ctid=\d{1,20}", str(contact.uri))
    assert contact.expires == "1800" and contact.instance is None
    assert relayed.call_id == "c1@192.0.2.10" and relayed.cseq.seq == 10
    assert relayed.from_.tag == "f1" and str(relayed.to.uri) == "sip:alice@example.com"
    assert relayed.headers.get("max-forwards") == "69"
    m.feed(main_ok(relayed), MAIN)
    reply = m.to_phone()
    assert reply.status == 200
    assert reply.headers.fields("contact") == ["<sip:alice@192.0.2.10:5062;transport=udp>;expires=1800"]
    assert reply.headers.get("expires") is None
    assert m.store.counts() == (1, 1)
    record = m.store.load("alice@example.com")
    assert record is not None and list(record.bindings) == [int(ctid_of(relayed))]


def test_t12_refresh_is_relayed_with_the_same_id() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    first = m.to_main()
    m.feed(main_ok(first), MAIN)
    m.take()
    m.advance(10)
    m.feed(register(cseq=11, branch="z9hG4bK-a2"), PHONE)
    second = m.to_main()
    assert ctid_of(second) == ctid_of(first)


def test_t13_main_shortens_the_lifetime() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    relayed = m.to_main()
    m.feed(main_ok(relayed, expires=300, header=None), MAIN)
    assert m.to_phone().contacts[0].expires == "300"


def test_t07_expires_precedence_and_clamping() -> None:
    m = Mirror()
    contacts = (
        "<sip:c1@192.0.2.10>;expires=5, <sip:c2@192.0.2.10>, <sip:c3@192.0.2.10>;expires=abc, "
        "<sip:c4@192.0.2.10>;expires=99999"
    )
    m.feed(register(contacts, expires=300), PHONE)
    relayed = m.to_main()
    assert [c.expires for c in relayed.contacts] == ["5", "300", "3600", "99999"]  # raw in mirror mode
    m.feed(main_ok(relayed, expires=3600), MAIN)
    reply = m.to_phone()
    got = {str(c.uri).split("@")[0]: c.expires for c in reply.contacts}
    assert got == {"sip:c1": "10", "sip:c2": "300", "sip:c3": "3600", "sip:c4": "3600"}


def test_t14_foreign_contacts_in_the_reply_are_ignored() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    relayed = m.to_main()
    m.feed(main_ok(relayed, extra="Contact: <sip:27359871@203.0.113.9:5062>;expires=354"), MAIN)
    reply = m.to_phone()
    assert [str(c.uri) for c in reply.contacts] == ["sip:alice@192.0.2.10:5062;transport=udp"]
    assert m.store.counts() == (1, 1)


def test_t15_reply_missing_our_contact_changes_nothing_and_lists_local_bindings() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    relayed = m.to_main()
    m.feed(response_to(relayed, 200, extra="Contact: <sip:other@203.0.113.9>;expires=60"), MAIN)
    reply = m.to_phone()
    assert reply.status == 200 and reply.contacts == []  # [REC] never main's contacts
    assert m.store.counts() == (0, 0)


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        (401, 'WWW-Authenticate: Digest realm="example.com", nonce="abc"'),
        (407, 'Proxy-Authenticate: Digest realm="example.com", nonce="abc"'),
        (403, ""),
        (423, "Min-Expires: 7200"),
        (503, "Retry-After: 30"),
    ],
)
def test_t33_errors_are_relayed_unchanged_and_store_nothing(status: int, extra: str) -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    relayed = m.to_main()
    m.feed(response_to(relayed, status, extra=extra), MAIN)
    reply = m.to_phone()
    assert reply.status == status
    if extra:
        name, value = extra.split(": ", 1)
        assert reply.headers.get(name) == value
    assert m.store.counts() == (0, 0)


def test_t33_timeout_gives_408_and_stores_nothing() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.to_main()
    m.advance(33)
    replies = [r for r, p in m.take() if isinstance(r, Response) and p == PHONE]
    assert [r.status for r in replies] == [408]
    assert m.store.counts() == (0, 0)


def test_t32_authorization_is_relayed_byte_identical() -> None:
    m = Mirror()
    auth = 'Authorization: Digest username="alice", realm="example.com", nonce="abc", uri="sip:example.com", response="0123456789abcdef0123456789abcdef"'
    m.feed(register(extra=auth), PHONE)
    relayed = m.to_main()
    assert auth.encode() + b"\r\n" in relayed.to_bytes()


def test_deregistration_removes_the_binding() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.feed(
        register("<sip:alice@192.0.2.10:5062;transport=udp>;expires=0", cseq=11, branch="z9hG4bK-d"), PHONE
    )
    relayed = m.to_main()
    assert relayed.contacts[0].expires == "0"
    m.feed(response_to(relayed, 200), MAIN)  # main lists nothing any more
    reply = m.to_phone()
    assert reply.status == 200 and reply.contacts == []
    assert m.store.counts() == (0, 0)


def test_star_deregistration_is_relayed_unchanged_and_wipes_the_aor() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.feed(register("*", cseq=11, branch="z9hG4bK-s", expires=0), PHONE)
    relayed = m.to_main()
    assert relayed.headers.get("contact") == "*"
    m.feed(response_to(relayed, 200), MAIN)
    assert m.to_phone().status == 200
    assert m.store.counts() == (0, 0)


def test_second_device_gets_a_new_id_and_reply_lists_both() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    first = m.to_main()
    m.feed(main_ok(first), MAIN)
    m.take()
    other = Peer("udp", "198.51.100.7", 5060)
    m.feed(
        register(
            "<sip:alice@198.51.100.7:5060>;expires=600",
            call_id="c2",
            branch="z9hG4bK-b1",
            via_host="198.51.100.7:5060",
        ),
        other,
    )
    second = m.to_main()
    assert ctid_of(second) != ctid_of(first)
    m.feed(main_ok(second, expires=600), MAIN)
    reply = m.to_phone(other)
    assert sorted(str(c.uri) for c in reply.contacts) == [
        "sip:alice@192.0.2.10:5062;transport=udp",
        "sip:alice@198.51.100.7:5060",
    ]


@pytest.mark.parametrize(
    ("data", "status", "text"),
    [
        (register("*", expires=60), 400, "* used in contact and expires is not zero"),
        (register("*"), 400, "* used in contact and expires is not zero"),
        (register("*, <sip:alice@192.0.2.10>", expires=0), 400, "* used in contact and more than 1 contact"),
        (register(to="<sip:example.com>"), 400, "Missing AoR username"),
        (register(expires=None, extra="Expires: soon"), 400, None),
    ],
)
def test_t02_t03_t04_validation(data: bytes, status: int, text: str | None) -> None:
    m = Mirror()
    m.feed(data, PHONE)
    sent = m.take()
    assert not [x for x, p in sent if p == MAIN]
    [reply] = [x for x, _ in sent if isinstance(x, Response)]
    assert reply.status == status
    if text:
        assert reply.headers.get("p-registrar-error") == text


def test_t05_binding_query_lists_bindings_locally() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.advance(100)
    m.feed(register("", cseq=11, branch="z9hG4bK-q"), PHONE)
    sent = m.take()
    assert not [x for x, p in sent if p == MAIN]
    [reply] = [x for x, _ in sent if isinstance(x, Response)]
    assert reply.status == 200 and reply.contacts[0].expires == "1700"


def test_t05_query_for_an_unknown_user_lists_nobody_else() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.feed(register("", to="<sip:bob@example.com>", call_id="q2", branch="z9hG4bK-q2"), PHONE)
    [reply] = [x for x, _ in m.take() if isinstance(x, Response)]
    assert reply.status == 200 and reply.contacts == []


def test_t10_retransmission_before_main_answers_is_relayed_once() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.to_main()
    m.feed(register(), PHONE)
    assert [x for x, p in m.take() if isinstance(x, Request) and p == MAIN] == []


def test_t34_cseq_going_backwards_is_refused() -> None:
    m = Mirror()
    m.feed(register(cseq=20), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.advance(30)
    m.feed(register(cseq=19, branch="z9hG4bK-old"), PHONE)
    [reply] = [x for x, _ in m.take() if isinstance(x, Response)]
    assert reply.status == 400 and reply.headers.get("p-registrar-error") == "Invalid CSeq number"


def _registered(m: Mirror, peer: Peer = NATTED) -> str:
    m.feed(register(via_host="10.1.1.1:5062"), peer)  # behind NAT: source differs from Via and Contact
    relayed = m.to_main()
    m.feed(main_ok(relayed), MAIN)
    reply = m.to_phone(peer)
    assert reply.contacts[0].param("received") == '"sip:203.0.113.5:40000"'  # T61
    return ctid_of(relayed)


def test_t16_lookup_by_ctid_goes_to_the_received_address() -> None:
    m = Mirror()
    ctid = _registered(m)
    invite = (
        f"INVITE sip:alice@10.0.0.2:5060;ctid={ctid} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-i1\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b1\r\nTo: <sip:alice@example.com>\r\n"
        "Call-ID: call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@10.0.0.3:5070>\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    m.feed(invite, MAIN)
    sent = m.take()
    [fwd] = [x for x, p in sent if isinstance(x, Request) and p == NATTED]
    assert str(fwd.uri) == "sip:alice@192.0.2.10:5062;transport=udp"
    assert [x.status for x, p in sent if isinstance(x, Response) and p == MAIN] == [100]


@pytest.mark.parametrize(
    "ruri",
    ["sip:alice@10.0.0.2:5060", "sip:alice@10.0.0.2:5060;ctid=abc", "sip:alice@10.0.0.2:5060;ctid=12345"],
)
def test_t17_lookup_failures_give_404(ruri: str) -> None:
    m = Mirror()
    _registered(m)
    invite = (
        f"INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-i2\r\nMax-Forwards: 70\r\n"
        "From: <sip:bob@example.com>;tag=b1\r\nTo: <sip:alice@example.com>\r\nCall-ID: call-2\r\n"
        "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    m.feed(invite, MAIN)
    statuses = [x.status for x, _ in m.take() if isinstance(x, Response)]
    assert statuses == [100, 404]


def test_expired_binding_is_not_routed() -> None:
    m = Mirror()
    ctid = _registered(m)
    m.advance(1801)
    invite = (
        f"MESSAGE sip:alice@10.0.0.2:5060;ctid={ctid} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-m\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b1\r\nTo: <sip:alice@example.com>\r\n"
        "Call-ID: m-1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    m.feed(invite, MAIN)
    assert [x.status for x, _ in m.take() if isinstance(x, Response)] == [404]


def test_t18_ct_username_insertion() -> None:
    m = Mirror(contact_id_insertion="ct-username")
    m.feed(register(), PHONE)
    relayed = m.to_main()
    uri = str(relayed.contacts[0].uri)
    assert re.fullmatch(r"sip:\d+@10\.0\.0\.2:5060", uri)
    m.feed(main_ok(relayed), MAIN)
    m.take()
    ctid = uri.split(":")[1].split("@")[0]
    m.feed(
        (
            f"OPTIONS sip:{ctid}@10.0.0.2:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3:5070;branch=z9hG4bK-o\r\n"
            "From: <sip:main@example.com>;tag=1\r\nTo: <sip:x@example.com>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode(),
        MAIN,
    )
    [fwd] = [x for x, p in m.take() if isinstance(x, Request) and p == PHONE]
    assert str(fwd.uri) == "sip:alice@192.0.2.10:5062;transport=udp"


def test_t19_custom_param_and_extra_params() -> None:
    m = Mirror(contact_id_param="regid", extra_contact_params=";transport=tcp")
    m.feed(register(), PHONE)
    uri = str(m.to_main().contacts[0].uri)
    assert re.fullmatch(r"sip:alice@10\.0\.0\.2:5060;regid=\d+;transport=tcp", uri)


def test_t20_no_deregister_generated_in_mirror_mode() -> None:
    m = Mirror()
    m.feed(register(), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.advance(4000)
    assert [x for x, p in m.take() if p == MAIN] == []


def test_options_to_ourselves_is_answered_200() -> None:
    m = Mirror()
    m.feed(
        (
            b"OPTIONS sip:10.0.0.2:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-k\r\n"
            b"From: <sip:probe@example.com>;tag=1\r\nTo: <sip:10.0.0.2:5060>\r\nCall-ID: k1\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        ),
        PHONE,
    )
    [reply] = [x for x, _ in m.take() if isinstance(x, Response)]
    assert reply.status == 200 and "REGISTER" in (reply.headers.get("allow") or "")
