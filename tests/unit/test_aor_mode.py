"""Mode aor (AoR throttling), behaviour §6 and §9.2, test cases of behaviour §15 D, on the virtual clock.

Where the behaviour reference gives [OBS] and [REC], these tests pin [REC]: a new device is relayed (never
absorbed unauthenticated, §11), changes are staged and committed only on the main registrar's 2xx (T53),
the UA never sees the main registrar's Expires header (T52) and expO is refreshed on every 2xx.
"""

from __future__ import annotations

import random
from dataclasses import replace

from registrar.core.service import MidRegistrar
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from registrar.store.memory import MemoryStore
from tests.unit.corekit import Core, register
from tests.unit.stackkit import MAIN, response_to

A = Peer("udp", "192.0.2.10", 5062)
B = Peer("udp", "198.51.100.7", 5060)
C = Peer("udp", "203.0.113.9", 5064)
CONTACTS = {
    A: "<sip:alice@192.0.2.10:5062>",
    B: "<sip:alice@198.51.100.7:5060>",
    C: "<sip:alice@203.0.113.9:5064>",
}
AGG = "sip:alice%40example.com@10.0.0.2:5060"


def Aor(**settings: object) -> Core:
    base: dict[str, object] = {"mode": "aor", "outgoing_expires": 7200, "max_expires": 7200}
    base.update(settings)
    return Core(**base)


def _send(m: Core, peer: Peer, contact: str | None = None, *, cseq: int = 1, **kw: object) -> None:
    m.feed(
        register(
            contact or CONTACTS[peer],
            cseq=cseq,
            call_id=f"cid-{peer.host}",
            branch=f"z9hG4bK-{peer.host}-{cseq}",
            via_host=f"{peer.host}:{peer.port}",
            **kw,
        ),
        peer,
    )  # type: ignore[arg-type]


def _split(m: Core, peer: Peer) -> tuple[list[Request], list[Response]]:
    sent = m.take()
    return (
        [x for x, p in sent if isinstance(x, Request) and p == MAIN],
        [x for x, p in sent if isinstance(x, Response) and p == peer],
    )


def _main_ok(relayed: Request, expires: int = 7200, extra: str = "") -> bytes:
    value = relayed.contacts[0].expires or str(expires)
    more = (
        f"Contact: <{relayed.contacts[0].uri}>;expires={expires if value != '0' else 0}\r\nExpires: {expires}"
    )
    if extra:
        more = extra + "\r\n" + more
    return response_to(relayed, 200, extra=more)


def _register_a(m: Core, e: int = 120) -> Request:
    _send(m, A, f"{CONTACTS[A]};expires={e}")
    relayed, _ = _split(m, A)
    m.feed(_main_ok(relayed[0]), MAIN)
    _, replies = _split(m, A)
    assert replies[0].status == 200
    return relayed[0]


def test_t39_one_aggregated_contact_use_domain_on() -> None:
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120, <sip:alice@192.0.2.10:5064>;expires=120")
    [relayed], _ = _split(m, A)
    assert [str(c.uri) for c in relayed.contacts] == [AGG] and relayed.contacts[0].expires == "7200"
    m.feed(_main_ok(relayed), MAIN)
    _, [reply] = _split(m, A)
    assert sorted(c.expires for c in reply.contacts) == ["120", "120"]


def test_t39_use_domain_off() -> None:
    m = Aor(use_domain=False)
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    assert str(relayed.contacts[0].uri) == "sip:alice@10.0.0.2:5060"


def test_t40_at_escape_str_and_lookup() -> None:
    m = Aor(at_escape_str="___")
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    assert str(relayed.contacts[0].uri) == "sip:alice___example.com@10.0.0.2:5060"
    m.feed(_main_ok(relayed), MAIN)
    m.take()
    m.feed(_invite("sip:alice___example.com@10.0.0.2:5060"), MAIN)
    assert [p for x, p in m.take() if isinstance(x, Request) and x.method == "INVITE"] == [A]


def test_t41_expires_header_is_rewritten_and_no_param_added() -> None:
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120", expires=120)
    [relayed], _ = _split(m, A)
    assert relayed.headers.get("expires") == "7200" and relayed.contacts[0].expires is None


def test_t42_new_device_is_relayed_not_absorbed() -> None:
    m = Aor()
    _register_a(m)
    m.advance(30)
    _send(m, B, f"{CONTACTS[B]};expires=600")
    relayed, _ = _split(m, B)
    assert len(relayed) == 1  # [REC] §11: a new device is seen by the main registrar
    m.feed(_main_ok(relayed[0]), MAIN)
    _, [reply] = _split(m, B)
    got = {str(c.uri): c.expires for c in reply.contacts}
    assert got == {"sip:alice@192.0.2.10:5062": "90", "sip:alice@198.51.100.7:5060": "600"}


def _two_devices(m: Core) -> None:
    _register_a(m)
    m.advance(30)
    _send(m, B, f"{CONTACTS[B]};expires=600")
    relayed, _ = _split(m, B)
    m.feed(_main_ok(relayed[0]), MAIN)
    m.take()


def test_t43_aor_refresh_timing() -> None:
    m = Aor()
    _two_devices(m)  # A 120 at 0, B 600 at 30 (relayed: LRTs=30), expO 7200 → max_diff 7080
    cseq = 2
    while m.now + 60 < 30 + 7080:
        m.advance(60)
        _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
        _send(m, B, f"{CONTACTS[B]};expires=600", cseq=cseq)
        relayed, _ = _split(m, A)
        assert relayed == [], m.now
        cseq += 1
    m.advance(30 + 7080 - m.now)
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
    relayed, _ = _split(m, A)
    assert len(relayed) == 1 and relayed[0].contacts[0].expires == "7200"
    m.feed(_main_ok(relayed[0]), MAIN)
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None and record.meta.relayed_at == m.now


def _at_threshold(m: Core) -> int:
    """Both devices absorbed every minute up to the aggregated refresh's threshold; returns the next CSeq."""
    _two_devices(m)
    cseq = 2
    while m.now + 60 < 30 + 7080:
        m.advance(60)
        _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
        _send(m, B, f"{CONTACTS[B]};expires=600", cseq=cseq)
        m.take()
        cseq += 1
    m.advance(30 + 7080 - m.now)
    return cseq


def test_t59_second_device_at_the_threshold_rides_on_the_relay_in_flight() -> None:
    m = Aor()
    cseq = _at_threshold(m)
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
    relayed_a, _ = _split(m, A)
    assert len(relayed_a) == 1
    _send(m, B, f"{CONTACTS[B]};expires=600", cseq=cseq)
    relayed_b, [reply_b] = _split(m, B)
    assert relayed_b == [] and reply_b.status == 200, "the main registrar gets one aggregated refresh"
    m.feed(_main_ok(relayed_a[0]), MAIN)
    _, [reply_a] = _split(m, A)
    assert reply_a.status == 200
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    assert record.meta.relay_until is None and record.meta.relayed_at == m.now
    assert len(record.valid_bindings(m.now)) == 2


def test_t59_failed_relay_clears_its_mark() -> None:
    m = Aor()
    cseq = _at_threshold(m)
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
    [relayed], _ = _split(m, A)
    m.feed(response_to(relayed, 500), MAIN)
    m.take()
    _send(m, B, f"{CONTACTS[B]};expires=600", cseq=cseq)
    relayed_b, _ = _split(m, B)
    assert len(relayed_b) == 1, "with nothing in flight the due refresh goes to the main registrar"


def test_t44_non_last_device_leaving_is_absorbed() -> None:
    m = Aor()
    _two_devices(m)
    m.advance(10)
    _send(m, B, f"{CONTACTS[B]};expires=0", cseq=2)
    relayed, [reply] = _split(m, B)
    assert relayed == [] and [str(c.uri) for c in reply.contacts] == ["sip:alice@192.0.2.10:5062"]
    m.feed(_invite(AGG), MAIN)
    assert [p for x, p in m.take() if isinstance(x, Request) and x.method == "INVITE"] == [A]


def test_t45_last_device_leaving_is_relayed_and_never_deregistered() -> None:
    m = Aor()
    _register_a(m)
    m.advance(10)
    _send(m, A, f"{CONTACTS[A]};expires=0", cseq=2)
    [relayed], _ = _split(m, A)
    assert str(relayed.contacts[0].uri) == AGG and relayed.contacts[0].expires == "0"
    m.feed(response_to(relayed, 200), MAIN)
    m.take()
    assert m.store.counts() == (0, 0)
    m.advance(8000)
    assert [x for x, p in m.take() if p == MAIN] == []


def test_t46_one_register_removing_all_is_relayed_with_expires_0() -> None:
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120, <sip:alice@192.0.2.10:5064>;expires=120")
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed), MAIN)
    m.take()
    m.advance(10)
    _send(m, A, f"{CONTACTS[A]};expires=0, <sip:alice@192.0.2.10:5064>;expires=0", cseq=2)
    [relayed], _ = _split(m, A)
    assert relayed.contacts[0].expires == "0"


def test_t47_aor_expiry_sends_one_deregister() -> None:
    m = Aor()
    _two_devices(m)
    m.advance(100)  # A (120 from t=0) expired at 120: nothing sent
    assert [x for x, p in m.take() if p == MAIN] == []
    m.advance(600 + 30 - m.now + 1)  # B expires at 630
    deregs = {x.top_via.branch: x for x, p in m.take() if isinstance(x, Request) and p == MAIN}
    [dereg] = deregs.values()
    assert str(dereg.contacts[0].uri) == AGG and dereg.contacts[0].expires == "0"
    assert dereg.call_id == "cid-198.51.100.7" and dereg.cseq.seq == 2
    assert str(dereg.to.uri) == "sip:alice@example.com" and dereg.to.tag is None


def _invite(ruri: str, method: str = "INVITE", branch: str = "z9hG4bK-inv") -> bytes:
    return (
        f"{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3:5070;branch={branch}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:bob@example.com>;tag=b1\r\nTo: <sip:alice@example.com>\r\nCall-ID: {branch}\r\n"
        f"CSeq: 1 {method}\r\nContact: <sip:bob@10.0.0.3:5070>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_t48_parallel_forking_in_q_order() -> None:
    m = Aor()
    _send(
        m, A, f"{CONTACTS[A]};q=0.5;expires=600, {CONTACTS[B]};q=1.0;expires=600, {CONTACTS[C]};expires=600"
    )
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed), MAIN)
    m.take()
    m.feed(_invite(AGG), MAIN)
    invites = [(x, p) for x, p in m.take() if isinstance(x, Request) and x.method == "INVITE"]
    assert [str(x.uri) for x, _ in invites] == [CONTACTS[B][1:-1], CONTACTS[A][1:-1], CONTACTS[C][1:-1]]
    assert {p for _, p in invites} == {A}  # all registered from A's flow
    first, _ = invites[0]
    m.feed(response_to(first, 200), A)
    sent = m.take()
    assert [x.status for x, p in sent if isinstance(x, Response) and p == MAIN] == [200]
    assert (
        len([x for x, _ in sent if isinstance(x, Request) and x.method == "CANCEL"]) == 0
    )  # no 1xx yet: wait
    for other, _ in invites[1:]:
        m.feed(response_to(other, 180), A)
    assert len([x for x, _ in m.take() if isinstance(x, Request) and x.method == "CANCEL"]) == 2


def test_t49_method_filtering() -> None:
    m = Aor(method_filtering=True)
    _send(m, A, f"{CONTACTS[A]};expires=600", extra="Allow: INVITE, ACK, BYE, CANCEL")
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed), MAIN)
    m.take()
    m.feed(_invite(AGG, "MESSAGE", "z9hG4bK-m1"), MAIN)
    assert [x.status for x, _ in m.take() if isinstance(x, Response)] == [404]  # only A, filtered: -2 → 404
    _send(m, B, f"{CONTACTS[B]};expires=600")
    [relayed], _ = _split(m, B)
    m.feed(_main_ok(relayed), MAIN)
    m.take()
    m.feed(_invite(AGG, "MESSAGE", "z9hG4bK-m2"), MAIN)
    assert [p for x, p in m.take() if isinstance(x, Request) and x.method == "MESSAGE"] == [B]


def test_t50_nothing_registered_gives_404() -> None:
    m = Aor()
    m.feed(_invite("sip:nobody%40example.com@10.0.0.2:5060"), MAIN)
    assert [x.status for x, _ in m.take() if isinstance(x, Response)] == [100, 404]


def test_t51_extra_contacts_in_mains_reply() -> None:
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed, extra="Contact: <sip:bob@203.0.113.9>;expires=50"), MAIN)
    _, [reply] = _split(m, A)
    assert [(str(c.uri), c.expires) for c in reply.contacts] == [("sip:alice@192.0.2.10:5062", "120")]


def test_t52_reply_to_the_ua_has_no_expires_header() -> None:
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed), MAIN)
    _, [reply] = _split(m, A)
    assert reply.headers.get("expires") is None


def test_t53_rejected_device_is_not_stored() -> None:
    m = Aor()
    _register_a(m)
    m.advance(10)
    _send(m, B, f"{CONTACTS[B]};expires=600")
    [relayed], _ = _split(m, B)
    m.feed(response_to(relayed, 403), MAIN)
    _, [reply] = _split(m, B)
    assert reply.status == 403
    record = m.store.load("alice@example.com")
    assert record is not None and [b.contact for b in record.bindings.values()] == [
        "sip:alice@192.0.2.10:5062"
    ]


def test_t54_max_contacts_503_locally() -> None:
    m = Aor(max_contacts=1)
    _register_a(m)
    _send(m, B, f"{CONTACTS[B]};expires=600")
    relayed, [reply] = _split(m, B)
    assert relayed == [] and reply.status == 503


def test_t54_force_registration_evicts_the_old_device() -> None:
    m = Aor(max_contacts=1, force_registration=True)
    _register_a(m)
    _send(m, B, f"{CONTACTS[B]};expires=600")
    [relayed], _ = _split(m, B)
    m.feed(_main_ok(relayed), MAIN)
    m.take()
    record = m.store.load("alice@example.com")
    assert record is not None and [b.contact for b in record.bindings.values()] == [
        "sip:alice@198.51.100.7:5060"
    ]


def test_qualify_options_to_the_aggregated_contact_is_answered_locally() -> None:
    m = Aor()
    _register_a(m)
    m.feed(_invite(AGG, "OPTIONS", "z9hG4bK-q"), MAIN)
    sent = m.take()
    assert [x.status for x, _ in sent if isinstance(x, Response)] == [200]
    assert [x for x, p in sent if isinstance(x, Request)] == []


def test_t62_gruus_issued_and_a_pub_gruu_reaches_only_its_instance() -> None:
    m = Aor(gruu=True)
    contacts = (
        f'{CONTACTS[A]};+sip.instance="<urn:uuid:1>";expires=600, '
        f'<sip:alice@192.0.2.10:5064>;+sip.instance="<urn:uuid:2>";expires=600'
    )
    _send(m, A, contacts, extra="Supported: gruu")
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed), MAIN)
    _, [reply] = _split(m, A)
    first = reply.contacts[0]
    assert first.param("pub-gruu") == '"sip:alice@example.com;gr=urn:uuid:1"'
    temp = (first.param("temp-gruu") or "").strip('"')
    assert temp.startswith("sip:tgruu.") and temp.endswith("@10.0.0.2:5060;gr")
    assert first.param("+sip.instance") == '"<urn:uuid:1>"'
    m.feed(_invite("sip:alice@example.com;gr=urn:uuid:2"), MAIN)
    assert [str(x.uri) for x, _ in m.take() if isinstance(x, Request) and x.method == "INVITE"] == [
        "sip:alice@192.0.2.10:5064"
    ]
    m.feed(_invite(temp, branch="z9hG4bK-t"), MAIN)
    assert [str(x.uri) for x, _ in m.take() if isinstance(x, Request) and x.method == "INVITE"] == [
        "sip:alice@192.0.2.10:5062"
    ]


def test_no_gruus_without_supported_gruu() -> None:
    m = Aor(gruu=True)
    _send(m, A, f'{CONTACTS[A]};+sip.instance="<urn:uuid:1>";expires=600')
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed), MAIN)
    _, [reply] = _split(m, A)
    assert reply.contacts[0].param("pub-gruu") is None


def test_relay_keeps_the_aggregated_contact_the_main_registrar_holds() -> None:
    """Several processes share the AoR: whichever relays the aggregated refresh renews the one contact the main
    registrar already holds (the first relayer's address), never adds its own."""
    m = Aor()
    cseq = _at_threshold(m)
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    other = record.copy()
    other.meta = replace(record.meta, main_contact="sip:alice%40example.com@10.0.0.9:5080")
    m.store.commit(other, None, m.now)
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
    [relayed], _ = _split(m, A)
    assert [str(c.uri) for c in relayed.contacts] == ["sip:alice%40example.com@10.0.0.9:5080"]


OTHER = "sip:alice%40example.com@10.0.0.9:5080"  # another process's aggregated contact for the same AoR


def test_2xx_listing_another_aggregated_contact_first_confirms_the_one_relayed() -> None:
    """Main lists every contact it holds for the AoR; the one this relay sent is the aggregated contact."""
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    m.feed(_main_ok(relayed, extra=f"Contact: <{OTHER}>;expires=50"), MAIN)
    _, [reply] = _split(m, A)
    assert reply.status == 200
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    assert record.meta.main_contact == AGG and record.meta.main_expires == 7200


def test_concurrent_first_registration_elsewhere_keeps_its_contact_and_deregisters_ours() -> None:
    """Two processes relayed the first REGISTERs of one AoR at once, each with its own aggregated contact.
    The other one's 2xx was stored first: this one keeps that contact as the AoR's and de-registers its own
    (CSeq above the relayed one, same Call-ID), while still storing its device's binding."""
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    # meanwhile the other process's relay of device B was confirmed and stored
    meta = MainMeta(
        "sip:alice@example.com", "sip:alice@example.com", "sip:10.0.0.3:5070", call_id="cid-other",
        cseq=1, main_expires=7200, relayed_at=m.now, main_contact=OTHER,
    )  # fmt: skip
    device_b = Binding(9, "sip:alice@198.51.100.7:5060", m.now + 120, B, "cid-other", 1, local_expires=120)
    m.store.commit(AorRecord("alice@example.com", {9: device_b}, meta=meta), None, m.now)
    m.feed(_main_ok(relayed, extra=f"Contact: <{OTHER}>;expires=7199"), MAIN)
    sent = m.take()
    [dereg] = [x for x, p in sent if isinstance(x, Request) and p == MAIN]
    [reply] = [x for x, p in sent if isinstance(x, Response) and p == A]
    assert reply.status == 200
    assert sorted(str(c.uri) for c in reply.contacts) == [
        "sip:alice@192.0.2.10:5062",
        "sip:alice@198.51.100.7:5060",
    ]
    assert dereg.method == "REGISTER" and [str(c.uri) for c in dereg.contacts] == [AGG]
    assert (dereg.contacts[0].expires or dereg.headers.get("expires")) == "0"
    assert dereg.call_id == relayed.call_id and dereg.cseq.seq == relayed.cseq.seq + 1
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    assert record.meta.main_contact == OTHER and record.meta.call_id == "cid-other"
    assert len(record.bindings) == 2


def test_stored_contact_main_no_longer_holds_is_replaced_without_deregister() -> None:
    m = Aor()
    _send(m, A, f"{CONTACTS[A]};expires=120")
    [relayed], _ = _split(m, A)
    stale = MainMeta(
        "sip:alice@example.com", "sip:alice@example.com", "sip:10.0.0.3:5070", call_id="cid-old",
        cseq=1, main_expires=60, relayed_at=m.now - 61, main_contact=OTHER,
    )  # fmt: skip
    device_b = Binding(9, "sip:alice@198.51.100.7:5060", m.now + 120, B, "cid-old", 1, local_expires=120)
    m.store.commit(AorRecord("alice@example.com", {9: device_b}, meta=stale), None, m.now)
    m.feed(_main_ok(relayed), MAIN)
    sent = m.take()
    assert not [x for x, p in sent if isinstance(x, Request) and p == MAIN]
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None and record.meta.main_contact == AGG


class SharedStore(MemoryStore):
    """A memory store that answers like a shared one: this process is member "B", ``live`` the others."""

    member_id = "B"

    def __init__(self, live: dict[str, str]) -> None:
        super().__init__(random.Random(7))
        self.live = live

    def member_address(self, member: str) -> str | None:
        return self.live.get(member)


def _shared(live: dict[str, str], **settings: object) -> Core:
    m = Aor(**settings)
    m.store = SharedStore(live)
    m.core = MidRegistrar(m.settings, m.rig.stack, m.store, random.Random(1))
    return m


def _held_by_a(m: Core) -> None:
    """alice's device registered; the aggregated contact main holds carries process A's address."""
    _register_a(m)
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None and record.meta.contact_owner == "B"
    moved = record.copy()
    moved.meta = replace(record.meta, main_contact=OTHER, contact_owner="A", call_id="cid-a", cseq=7)
    m.store.commit(moved, record, m.now)


def test_aggregated_contact_of_a_live_process_is_kept_and_refreshed_with_its_address() -> None:
    m = _shared({"A": "udp:10.0.0.9:5080"})
    _held_by_a(m)
    start, cseq = m.now, 2
    while m.now + 60 < start + 7080:  # absorbed every minute until main's copy is due
        m.advance(60)
        _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
        relayed, [reply] = _split(m, A)
        assert relayed == [] and reply.status == 200
        cseq += 1
    m.advance(start + 7080 - m.now)
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=cseq)
    [relayed], _ = _split(m, A)
    assert [str(c.uri) for c in relayed.contacts] == [OTHER]
    m.feed(_main_ok(relayed), MAIN)
    sent = m.take()
    assert not [x for x, p in sent if isinstance(x, Request) and p == MAIN]  # nothing to withdraw
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    assert record.meta.main_contact == OTHER and record.meta.contact_owner == "A"


def test_aggregated_contact_of_a_process_that_left_moves_here_and_the_old_one_is_withdrawn() -> None:
    """Process A, whose address the AoR's aggregated contact carries, has left: main would send calls to an
    address nobody listens on. The next refresh is relayed with this process's address, and A's contact is
    de-registered with A's Call-ID and a CSeq above A's."""
    m = _shared({})
    _held_by_a(m)
    m.advance(m.settings.member_ttl)  # A's member lease would have been renewed by now had A lived
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=2)
    [relayed], _ = _split(m, A)
    assert [str(c.uri) for c in relayed.contacts] == [AGG]
    m.feed(_main_ok(relayed, extra=f"Contact: <{OTHER}>;expires=7190"), MAIN)
    sent = m.take()
    [dereg] = [x for x, p in sent if isinstance(x, Request) and p == MAIN]
    [reply] = [x for x, p in sent if isinstance(x, Response) and p == A]
    assert reply.status == 200
    assert [str(c.uri) for c in dereg.contacts] == [OTHER]
    assert (dereg.contacts[0].expires or dereg.headers.get("expires")) == "0"
    assert dereg.call_id == "cid-a" and dereg.cseq.seq == 8
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    assert record.meta.main_contact == AGG and record.meta.contact_owner == "B"


def test_423_retry_sends_the_same_aggregated_contact() -> None:
    """A 423 above outgoing_expires is retried once with the higher lifetime, and with the same aggregated
    contact as the first try (here the one main holds for the AoR: live process A's address)."""
    m = _shared({"A": "udp:10.0.0.9:5080"}, raise_on_423=True)
    _held_by_a(m)
    _send(m, C, f"{CONTACTS[C]};expires=120")  # a new device: relayed
    [first], _ = _split(m, C)
    assert [str(c.uri) for c in first.contacts] == [OTHER]
    m.feed(response_to(first, 423, extra="Min-Expires: 9000"), MAIN)
    [retry], _ = _split(m, C)
    assert [str(c.uri) for c in retry.contacts] == [OTHER] and retry.contacts[0].expires == "9000"
    m.feed(_main_ok(retry, expires=9000), MAIN)
    _, [reply] = _split(m, C)
    assert reply.status == 200
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    assert record.meta.main_contact == OTHER and record.meta.contact_owner == "A"


def test_withdrawal_cseq_is_above_every_relay_with_that_call_id() -> None:
    """[REC] T60: the process that left relayed with the device's own Call-ID (CSeq 1); the refresh relayed here
    used CSeq 2 with the same Call-ID: the De-REGISTER of the old contact goes out with CSeq 3."""
    m = _shared({})
    _register_a(m)
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None
    moved = record.copy()
    moved.meta = replace(record.meta, main_contact=OTHER, contact_owner="A")
    m.store.commit(moved, record, m.now)
    m.advance(m.settings.member_ttl)  # A's member lease would have been renewed by now had A lived
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=2)
    [relayed], _ = _split(m, A)
    assert relayed.call_id == record.meta.call_id and relayed.cseq.seq == 2
    m.feed(_main_ok(relayed, extra=f"Contact: <{OTHER}>;expires=7190"), MAIN)
    [dereg] = [x for x, p in m.take() if isinstance(x, Request) and p == MAIN]
    assert [str(c.uri) for c in dereg.contacts] == [OTHER]
    assert dereg.call_id == relayed.call_id and dereg.cseq.seq == 3


def test_holder_missing_from_the_member_view_right_after_it_relayed_is_not_taken_over() -> None:
    """A process registers as a member before it relays, but another may list the members just before that
    and learn of it through its watch a moment later: within a member lease of its relay, a holder missing
    from the view is not taken for gone (the refresh is absorbed as usual, nothing withdrawn)."""
    m = _shared({})
    _held_by_a(m)
    m.advance(m.settings.member_ttl - 1)
    _send(m, A, f"{CONTACTS[A]};expires=120", cseq=2)
    relayed, [reply] = _split(m, A)
    assert relayed == [] and reply.status == 200
    record = m.store.load("alice@example.com")
    assert record is not None and record.meta is not None and record.meta.main_contact == OTHER
