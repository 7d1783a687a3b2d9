"""Mode contact (contact throttling), behaviour §5 and the test cases of §15 C/E, on the virtual clock."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from registrar.core import digest
from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from tests.unit.corekit import PHONE, Core, ctid_of, main_ok, register
from tests.unit.stackkit import MAIN, response_to

CONTACT = "<sip:alice@192.0.2.10:5062>"


def Contact(**settings: object) -> Core:
    return Core(**{"mode": "contact", "outgoing_expires": 3600, **settings})  # type: ignore[arg-type]


def _to_main(m: Core) -> list[Request]:
    """Requests sent to the main registrar, retransmissions (same branch) folded."""
    out: dict[str, Request] = {}
    for x, p in m.take():
        if isinstance(x, Request) and p == MAIN:
            out.setdefault(x.top_via.branch or "", x)
    return list(out.values())


def _keep_refreshing(m: Core, until: float, cseq: int, every: float = 50) -> int:
    """The phone refreshes every `every` seconds (absorbed) up to `until`; returns the next CSeq."""
    while m.now + every < until:
        m.advance(every)
        relayed, replies = _refresh(m, cseq)
        assert relayed == [] and replies[0].status == 200, (m.now, relayed)
        cseq += 1
    m.advance(until - m.now)
    return cseq


def _initial(m: Core, *, grant: int = 3600, expires: int = 60, cseq: int = 10) -> Request:
    m.feed(register(CONTACT, expires=expires, cseq=cseq), PHONE)
    relayed = m.to_main()
    m.feed(main_ok(relayed, expires=grant, header=grant), MAIN)
    reply = m.to_phone()
    assert reply.status == 200
    return relayed


def _refresh(
    m: Core, cseq: int, *, expires: int = 60, extra: str = ""
) -> tuple[list[Request], list[Response]]:
    m.feed(register(CONTACT, expires=expires, cseq=cseq, branch=f"z9hG4bK-r{cseq}", extra=extra), PHONE)
    sent = m.take()
    relayed = [x for x, p in sent if isinstance(x, Request) and p == MAIN]
    replies = [x for x, p in sent if isinstance(x, Response) and p == PHONE]
    return relayed, replies


def test_t21_initial_registration_is_lengthened() -> None:
    m = Contact()
    m.feed(register(CONTACT, expires=60), PHONE)
    relayed = m.to_main()
    assert relayed.contacts[0].expires == "3600" and relayed.headers.get("expires") == "3600"
    m.feed(main_ok(relayed), MAIN)
    reply = m.to_phone()
    assert [c.expires for c in reply.contacts] == ["60"] and reply.headers.get("expires") is None
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    (b,) = record.bindings.values()
    assert (b.local_expires, b.main_expires, b.relayed_at, b.relayed_call_id) == (
        60,
        3600,
        0.0,
        "c1@192.0.2.10",
    )
    assert b.main_contact == f"sip:alice@10.0.0.2:5060;ctid={ctid_of(relayed)}"
    assert record.meta.ruri == "sip:10.0.0.3:5070" and record.meta.to_uri == "sip:alice@example.com"


def test_t22_refresh_inside_the_window_is_absorbed() -> None:
    m = Contact()
    _initial(m)
    m.advance(55)
    relayed, replies = _refresh(m, 11)
    assert relayed == [] and [r.status for r in replies] == [200]
    assert replies[0].contacts[0].expires == "60"
    (b,) = m.store.load("alice@example.com").bindings.values()  # type: ignore[union-attr]
    assert b.expires_at == 115 and b.cseq == 11 and b.relayed_at == 0


def test_t23_refresh_at_the_threshold_is_relayed() -> None:
    m = Contact()
    _initial(m)
    cseq = _keep_refreshing(m, 3539, 11)
    assert _refresh(m, cseq)[0] == []
    m.advance(1)
    relayed, _ = _refresh(m, cseq + 1)
    assert len(relayed) == 1 and relayed[0].contacts[0].expires == "3600"
    m.feed(main_ok(relayed[0]), MAIN)
    (b,) = m.store.load("alice@example.com").bindings.values()  # type: ignore[union-attr]
    assert b.relayed_at == 3540


def test_t24_main_grants_less() -> None:
    m = Contact()
    _initial(m, grant=1800)
    cseq = _keep_refreshing(m, 1739, 11)
    assert _refresh(m, cseq)[0] == []
    m.advance(1)
    assert len(_refresh(m, cseq + 1)[0]) == 1


def test_t25_ua_asks_more_than_outgoing() -> None:
    m = Contact(max_expires=7200)
    m.feed(register(CONTACT, expires=7200), PHONE)
    relayed = m.to_main()
    assert relayed.contacts[0].expires == "3600" and relayed.headers.get("expires") == "3600"
    m.feed(main_ok(relayed), MAIN)
    assert m.to_phone().contacts[0].expires == "3600"
    m.advance(60)
    assert len(_refresh(m, 11, expires=7200)[0]) == 1  # expO - e < 0: every refresh relayed


def test_t27_second_device_is_relayed_with_a_new_id() -> None:
    m = Contact()
    first = _initial(m)
    other = Peer("udp", "198.51.100.7", 5060)
    m.feed(
        register(
            "<sip:alice@198.51.100.7:5060>",
            expires=60,
            call_id="c2",
            branch="z9hG4bK-b",
            via_host="198.51.100.7:5060",
        ),
        other,
    )
    second = m.to_main()
    assert ctid_of(second) != ctid_of(first)
    m.feed(main_ok(second), MAIN)
    assert len(m.to_phone(other).contacts) == 2


def test_t28_known_and_new_contact_together_are_relayed_with_their_ids() -> None:
    m = Contact()
    first = _initial(m)
    m.advance(10)
    m.feed(
        register(f"{CONTACT}, <sip:alice@192.0.2.10:5064>", expires=60, cseq=11, branch="z9hG4bK-x"), PHONE
    )
    relayed = m.to_main()
    ids = [str(c.uri).split("ctid=")[1] for c in relayed.contacts]
    assert ids[0] == ctid_of(first) and ids[1] != ids[0]


def test_t29_ua_deregistration_is_relayed_and_never_followed_by_a_deregister() -> None:
    m = Contact()
    first = _initial(m)
    m.advance(10)
    relayed, _ = _refresh(m, 11, expires=0)
    assert relayed[0].contacts[0].expires == "0"
    assert str(relayed[0].contacts[0].uri) == str(first.contacts[0].uri)
    m.feed(response_to(relayed[0], 200), MAIN)
    assert m.store.counts() == (0, 0)
    m.advance(4000)
    assert _to_main(m) == []


def test_t30_expiry_sends_a_deregister_within_2_seconds() -> None:
    m = Contact()
    first = _initial(m)
    for i, t in enumerate((50, 50, 50, 50)):
        m.advance(t)
        assert _refresh(m, 11 + i)[0] == []
    m.advance(59)  # last refresh at 200 (CSeq 14) gave it until 260
    assert _to_main(m) == []
    m.advance(2)
    [dereg] = _to_main(m)
    assert str(dereg.uri) == "sip:10.0.0.3:5070"
    assert str(dereg.from_.uri) == "sip:alice@example.com" and dereg.from_.tag
    assert str(dereg.to.uri) == "sip:alice@example.com" and dereg.to.tag is None
    assert dereg.call_id == "c1@192.0.2.10" and dereg.cseq.seq == 15
    assert str(dereg.contacts[0].uri) == str(first.contacts[0].uri) and dereg.contacts[0].expires == "0"
    assert dereg.headers.get("authorization") is None and dereg.headers.get("expires") is None
    assert m.store.counts() == (0, 0)


def test_t32_challenged_refresh_is_relayed_again_with_credentials() -> None:
    m = Contact()
    _initial(m)
    cseq = _keep_refreshing(m, 3540, 11)
    relayed, _ = _refresh(m, cseq)
    m.feed(
        response_to(relayed[0], 401, extra='WWW-Authenticate: Digest realm="example.com", nonce="n1"'), MAIN
    )
    assert m.to_phone().status == 401
    auth = 'Authorization: Digest username="alice", realm="example.com", nonce="n1", uri="sip:example.com", response="00"'
    again, _ = _refresh(m, cseq + 1, extra=auth)
    assert len(again) == 1 and auth.encode() in again[0].to_bytes()


def test_t33_rejected_initial_stores_nothing() -> None:
    m = Contact()
    m.feed(register(CONTACT, expires=60), PHONE)
    relayed = m.to_main()
    m.feed(response_to(relayed, 403), MAIN)
    assert m.to_phone().status == 403
    assert m.store.counts() == (0, 0)


def test_t34_cseq_rules() -> None:
    m = Contact()
    _initial(m, cseq=20)
    m.advance(30)
    _, replies = _refresh(m, 19)
    assert replies[0].status == 400 and replies[0].headers.get("p-registrar-error") == "Invalid CSeq number"
    m.feed(register(CONTACT, expires=60, cseq=21, branch="z9hG4bK-21"), PHONE)
    m.take()
    m.advance(5)
    relayed, replies = _refresh(m, 21)  # same CSeq within cseq_delay: a retransmission, answered
    assert relayed == [] and replies[0].status == 200


def test_t34_allow_dup_cseq_makes_an_equal_cseq_a_refresh() -> None:
    m = Contact(allow_dup_cseq=True)
    _initial(m, cseq=20)
    m.advance(30)
    relayed, replies = _refresh(m, 20)
    assert relayed == [] and replies[0].status == 200
    (b,) = m.store.load("alice@example.com").bindings.values()  # type: ignore[union-attr]
    assert b.expires_at == 90


def test_t35_max_contacts_is_decided_before_relaying() -> None:
    m = Contact(max_contacts=2, retry_after=30)
    for port in (5062, 5064):
        peer = Peer("udp", "192.0.2.10", port)
        m.feed(
            register(
                f"<sip:alice@192.0.2.10:{port}>",
                expires=60,
                call_id=f"c{port}",
                branch=f"z9hG4bK-{port}",
                via_host=f"192.0.2.10:{port}",
            ),
            peer,
        )
        m.feed(main_ok(m.to_main()), MAIN)
        m.take()
    third = Peer("udp", "192.0.2.10", 5066)
    m.feed(
        register(
            "<sip:alice@192.0.2.10:5066>",
            expires=60,
            call_id="c3",
            branch="z9hG4bK-3",
            via_host="192.0.2.10:5066",
        ),
        third,
    )
    sent = m.take()
    assert [x for x, p in sent if p == MAIN] == []
    [reply] = [x for x, _ in sent if isinstance(x, Response)]
    assert reply.status == 503 and reply.headers.get("p-registrar-error") == "Too many registered contacts"
    assert reply.headers.get("retry-after") == "30"
    assert m.store.counts() == (1, 2)


def test_t36_force_registration_evicts_and_deregisters() -> None:
    m = Contact(max_contacts=1, force_registration=True)
    first = _initial(m)
    other = Peer("udp", "192.0.2.10", 5064)
    m.feed(
        register(
            "<sip:alice@192.0.2.10:5064>",
            expires=60,
            call_id="c2",
            branch="z9hG4bK-2",
            via_host="192.0.2.10:5064",
        ),
        other,
    )
    second = m.to_main()
    m.feed(main_ok(second), MAIN)
    sent = m.take()
    [dereg] = [x for x, p in sent if isinstance(x, Request) and p == MAIN]
    assert str(dereg.contacts[0].uri) == str(first.contacts[0].uri) and dereg.contacts[0].expires == "0"
    record = m.store.load("alice@example.com")
    assert record is not None and [b.contact for b in record.bindings.values()] == [
        "sip:alice@192.0.2.10:5064"
    ]


def test_t37_star_wipes_the_aor_without_deregisters() -> None:
    m = Contact()
    _initial(m)
    m.feed(register("*", expires=0, cseq=11, branch="z9hG4bK-s"), PHONE)
    relayed = m.to_main()
    assert relayed.headers.get("contact") == "*" and relayed.headers.get("expires") == "0"
    m.feed(response_to(relayed, 200), MAIN)
    m.take()
    assert m.store.counts() == (0, 0)
    m.advance(4000)
    assert _to_main(m) == []


def test_t38_min_expires_raises_short_lifetimes() -> None:
    m = Contact(min_expires=10)
    _initial(m, expires=5)
    m.advance(5)
    assert m.store.counts() == (1, 1)
    m.advance(6)
    assert m.store.counts() == (0, 0)


def test_t38_max_expires_lowers_long_lifetimes() -> None:
    m = Contact(min_expires=5, max_expires=5, default_expires=5)
    _initial(m, expires=10)
    m.advance(5.5)
    assert m.store.counts() == (0, 0)


def test_t56_refresh_from_another_address_is_relayed_not_absorbed() -> None:
    m = Contact()
    _initial(m)
    m.advance(30)
    spoofer = Peer("udp", "198.51.100.66", 5060)
    m.feed(
        register(CONTACT, expires=60, cseq=11, branch="z9hG4bK-spoof", via_host="198.51.100.66:5060"), spoofer
    )
    relayed = [x for x, p in m.take() if isinstance(x, Request) and p == MAIN]
    assert len(relayed) == 1
    (b,) = m.store.load("alice@example.com").bindings.values()  # type: ignore[union-attr]
    assert b.source == PHONE  # calls keep going to the phone until main confirms the change


def _flow_held_by(m: Core, owner: str) -> None:
    """The phone's binding as another process that held its flow left it in the shared store."""
    record = m.store.load("alice@example.com")
    assert record is not None
    moved = record.copy()
    (ctid,) = moved.bindings
    moved.bindings[ctid] = replace(moved.bindings[ctid], owner=owner)
    m.store.commit(moved, record, m.now)


def test_path_insertion_relays_once_a_refresh_whose_flow_another_process_held() -> None:
    """A pod is gone and its phone refreshes through this one (same source: the Service moved the flow):
    main still routes to the phone through the gone pod's Path, so the refresh is relayed once with this
    process's Path (same Contact: main updates it in place), then absorbed again."""
    m = Contact(insertion="path")
    _initial(m)
    _flow_held_by(m, "pod-a")
    m.advance(20)
    relayed, replies = _refresh(m, 11)
    assert len(relayed) == 1 and replies == []
    assert "@10.0.0.2:5060;lr" in relayed[0].headers.get("path")  # this process's advertised address
    assert relayed[0].contacts[0].uri.host == "192.0.2.10"  # the phone's own Contact
    m.feed(main_ok(relayed[0]), MAIN)
    assert m.to_phone().status == 200
    (b,) = m.store.load("alice@example.com").bindings.values()  # type: ignore[union-attr]
    assert b.owner == m.store.member_id
    m.advance(20)
    assert _refresh(m, 12)[0] == []


def test_contact_insertion_absorbs_a_refresh_whose_flow_another_process_held() -> None:
    """With Contact insertion the processes are reached at one shared address (a Service) and hand a call
    to the flow's holder: a moved flow changes nothing main holds."""
    m = Contact()
    _initial(m)
    _flow_held_by(m, "pod-a")
    m.advance(20)
    assert _refresh(m, 11)[0] == []


def test_t57_challenged_deregister_is_resent_once_with_credentials() -> None:
    creds = digest.Credentials("example.com", "mid", "secret")
    m = Core({"credentials": [creds]}, mode="contact", outgoing_expires=3600)
    _initial(m)
    m.advance(61)
    [dereg] = _to_main(m)
    challenge = 'WWW-Authenticate: Digest realm="example.com", nonce="abc123", qop="auth"'
    m.feed(response_to(dereg, 401, extra=challenge), MAIN)
    [retry] = _to_main(m)
    assert retry.cseq.seq == dereg.cseq.seq + 1 and retry.call_id == dereg.call_id
    fields = digest.parse_challenge(retry.headers.get("authorization") or "")
    ha1 = hashlib.md5(b"mid:example.com:secret").hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{retry.uri}".encode()).hexdigest()
    expected = hashlib.md5(f"{ha1}:abc123:{fields['nc']}:{fields['cnonce']}:auth:{ha2}".encode()).hexdigest()
    assert fields["response"] == expected
    m.feed(response_to(retry, 401, extra=challenge), MAIN)
    assert _to_main(m) == []  # only once


def test_t60_deregister_cseq_is_above_what_main_saw_for_its_call_id() -> None:
    m = Contact()
    m.feed(register(CONTACT, expires=60, cseq=500), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.advance(10)
    # the phone restarts with a new Call-ID: [REC] relayed, so main learns the new Call-ID
    m.feed(register(CONTACT, expires=60, cseq=3, call_id="c2", branch="z9hG4bK-c2"), PHONE)
    relayed = m.to_main()
    m.feed(main_ok(relayed), MAIN)
    m.take()
    m.advance(61)
    [dereg] = _to_main(m)
    assert dereg.call_id == "c2" and dereg.cseq.seq == 4


def test_t63_expires_max_deviation() -> None:
    m = Contact(expires_max_deviation=100, max_expires=3600)
    m.feed(register(CONTACT, expires=1800), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    told = int(m.to_phone().contacts[0].expires or 0)
    assert 1700 <= told <= 1900


def test_t55_local_digest_gate_in_front_of_absorption(tmp_path: Path) -> None:
    gate = digest.DigestGate("example.com", {"alice": "pw"}, b"k" * 32)
    m = Core({"gate": gate}, mode="contact", outgoing_expires=3600)
    _initial(m)  # relayed: the main registrar authenticates it
    m.advance(30)
    relayed, replies = _refresh(m, 11)
    assert relayed == [] and replies[0].status == 401
    challenge = digest.parse_challenge(replies[0].headers.get("www-authenticate") or "")
    answer = digest.authorization(
        challenge, digest.Credentials("example.com", "alice", "pw"), "REGISTER", "sip:example.com", "cn1"
    )
    relayed, replies = _refresh(m, 12, extra=f"Authorization: {answer}")
    assert relayed == [] and replies[0].status == 200
    wrong = digest.authorization(
        challenge, digest.Credentials("example.com", "alice", "nope"), "REGISTER", "sip:example.com", "cn2"
    )
    _, replies = _refresh(m, 13, extra=f"Authorization: {wrong}")
    assert replies[0].status == 401


def test_rate_limit_on_locally_answered_registers() -> None:
    m = Contact(register_rate_limit=1)
    _initial(m)
    statuses = []
    for i in range(5):
        m.advance(0.01)
        statuses.append(_refresh(m, 11 + i)[1][0].status)
    assert statuses[:2] == [200, 200] and 503 in statuses
    m.advance(5)
    assert _refresh(m, 30)[1][0].status == 200


def test_t31_deregister_uses_the_stored_ruri_and_next_hop() -> None:
    m = Contact(main_registrar="sip:registrar.example.com", main_proxy="sip:10.0.0.3:5070")
    m.feed(register(CONTACT, expires=60), PHONE)
    relayed = m.to_main()  # sent to the proxy's address
    assert str(relayed.uri) == "sip:registrar.example.com"
    m.feed(main_ok(relayed), MAIN)
    m.take()
    m.advance(61)
    [dereg] = _to_main(m)
    assert str(dereg.uri) == "sip:registrar.example.com"


def test_423_above_outgoing_is_raised_and_retried_once() -> None:
    m = Contact(raise_on_423=True, outgoing_expires=600)
    m.feed(register(CONTACT, expires=60), PHONE)
    first = m.to_main()
    assert first.contacts[0].expires == "600"
    m.feed(response_to(first, 423, extra="Min-Expires: 1800"), MAIN)
    retry = m.to_main()
    assert retry.contacts[0].expires == "1800" and retry.headers.get("expires") == "1800"
    m.feed(response_to(retry, 423, extra="Min-Expires: 3600"), MAIN)
    reply = m.to_phone()
    assert reply.status == 423  # only once
    assert [x for x, p in m.take() if p == MAIN] == []


def test_423_is_relayed_unchanged_by_default() -> None:
    m = Contact(outgoing_expires=600)
    m.feed(register(CONTACT, expires=60), PHONE)
    m.feed(response_to(m.to_main(), 423, extra="Min-Expires: 1800"), MAIN)
    reply = m.to_phone()
    assert reply.status == 423 and reply.headers.get("min-expires") == "1800"


def test_t64_a_tcp_flow_is_kept_for_the_binding_lifetime_plus_10s() -> None:
    m = Contact()
    flow = Peer("tcp", "192.0.2.10", 40001, conn=7)
    m.feed(
        register(
            "<sip:alice@192.0.2.10:5062;transport=tcp>", expires=600, via_host="192.0.2.10:5062"
        ).replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"),
        flow,
    )
    relayed = m.to_main()
    m.feed(main_ok(relayed), MAIN)
    assert m.core.keep_flow_until(7) >= m.now + 610
    m.core.flow_closed(7)
    assert m.core.keep_flow_until(7) == 0.0


def test_draining_process_tells_phones_to_come_back_soon() -> None:
    m = Contact(drain_expires=30)
    _initial(m)
    m.core.draining = True
    m.advance(10)
    relayed, replies = _refresh(m, 11)
    assert relayed == [] and replies[0].contacts[0].expires == "30"
    (b,) = m.store.load("alice@example.com").bindings.values()  # type: ignore[union-attr]
    assert b.expires_at == 70  # the binding itself keeps its lifetime


def test_absorbing_never_edits_the_stored_record_in_place() -> None:
    m = Contact()
    _initial(m)
    before = m.store.load("alice@example.com")
    assert before is not None
    (old,) = before.bindings.values()
    snapshot = old.to_dict()
    m.advance(30)
    assert _refresh(m, 11)[0] == []
    assert old.to_dict() == snapshot  # the absorbed refresh replaced the binding, it did not edit it
    after = m.store.load("alice@example.com")
    assert after is not None and next(iter(after.bindings.values())).expires_at == 90
