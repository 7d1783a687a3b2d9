"""Repeated refreshes answered from a template (registrar/core/refresh.py): the same answers, the same stored
state and the same counters as the full pipeline, and the pipeline for everything else.

Most tests run one scenario twice, templates on and off (``refresh_templates=0``), on the same virtual
clock and ids, and compare every message sent and every binding stored: a template may only ever be a
shorter way to the answer the pipeline gives.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from registrar.core import digest
from registrar.sip.message import Response
from registrar.sip.transport import Peer
from tests.unit.corekit import NATTED, PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN

SETTINGS: dict[str, Any] = {"mode": "contact", "outgoing_expires": 3600}


def registered(
    peer: Peer = PHONE, core_kw: dict[str, Any] | None = None, *, user: str = "alice", **settings: Any
) -> Core:
    """A phone registered through the main registrar (relayed once), then refreshed once (absorbed: the
    template is learned from that one)."""
    m = Core(core_kw, **{**SETTINGS, **settings})
    add_phone(m, peer, user)
    return m


def add_phone(m: Core, peer: Peer, user: str = "alice", extra: str = "") -> None:
    m.feed(refresh(1, user=user, peer=peer, extra=extra), peer)
    m.feed(main_ok(m.to_main(), expires=None, header=None), MAIN)  # main grants what it was asked
    m.take()
    m.advance(1)
    m.feed(refresh(2, user=user, peer=peer, extra=extra), peer)
    m.take()


def refresh(cseq: int, *, user: str = "alice", peer: Peer = PHONE, extra: str = "") -> bytes:
    via_host = f"{peer.host}:{peer.port}" if ":" not in peer.host else f"[{peer.host}]:{peer.port}"
    transport = "" if peer.transport == "udp" else f";transport={peer.transport}"
    return register(
        f"<sip:{user}@{via_host}{transport}>;expires=600",
        cseq=cseq,
        branch=f"z9hG4bK-{user}-{cseq}",
        call_id=f"{user}-call",
        to=f"<sip:{user}@example.com>",
        via_host=via_host,
        extra=extra,
    ).replace(b"SIP/2.0/UDP", b"SIP/2.0/" + peer.transport.upper().encode())


def run_both(scenario: Callable[[Core], None], **settings: Any) -> tuple[Core, Core]:
    """The scenario with templates (first) and without; every message sent and every AoR stored must be the
    same in both."""
    fast = Core(**{**SETTINGS, **settings})
    slow = Core(**{**SETTINGS, **settings, "refresh_templates": 0})
    for m in (fast, slow):
        scenario(m)
    assert [(d, p) for d, p in fast.rig.raw] == [(d, p) for d, p in slow.rig.raw]
    assert fast.store._aors == slow.store._aors
    assert fast.rig.stack.stats == slow.rig.stack.stats
    assert replace(fast.core.stats, template_answers=0) == slow.core.stats  # the one counter that differs
    assert slow.shortcuts == 0
    return fast, slow


def refreshes(
    peer: Peer = PHONE, user: str = "alice", count: int = 5, extra: str = ""
) -> Callable[[Core], None]:
    def scenario(m: Core) -> None:
        add_phone(m, peer, user, extra)
        for cseq in range(3, 3 + count):
            m.advance(7)
            m.feed(refresh(cseq, user=user, peer=peer, extra=extra), peer)

    return scenario


@pytest.mark.parametrize(
    "peer",
    [PHONE, NATTED, Peer("tcp", "192.0.2.10", 40001, conn=7), Peer("udp", "2001:db8::10", 5062)],
    ids=["udp", "natted", "tcp-flow", "ipv6"],
)
def test_templated_refreshes_answer_and_store_what_the_pipeline_does(peer: Peer) -> None:
    fast, _ = run_both(refreshes(peer))
    assert fast.shortcuts == 5
    assert fast.core.stats.template_answers == 5


def test_the_same_with_a_path_a_user_agent_and_the_path_echoed() -> None:
    extra = "Path: <sip:edge.example.com;lr>\r\nSupported: path\r\nUser-Agent: desk/1.0"
    fast, _ = run_both(refreshes(extra=extra))
    assert fast.shortcuts == 5


def test_an_aor_with_two_devices_lists_both_in_every_templated_answer() -> None:
    second = Peer("udp", "192.0.2.11", 5062)

    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        m.feed(
            register(
                "<sip:alice@192.0.2.11:5062>;expires=900",
                cseq=1,
                call_id="d2",
                branch="z9hG4bK-d2",
                via_host="192.0.2.11:5062",
            ),
            second,
        )
        m.feed(main_ok(m.to_main()), MAIN)
        for cseq in range(3, 6):
            m.advance(5)
            m.feed(refresh(cseq), PHONE)

    fast, _ = run_both(scenario)
    assert fast.shortcuts == 3
    last = Response_of(fast.rig.raw[-1][0])
    assert len(last.contacts) == 2


def Response_of(data: bytes) -> Response:
    from registrar.sip.message import parse_message

    msg = parse_message(data)
    assert isinstance(msg, Response)
    return msg


def test_many_phones_behind_one_address_each_get_a_template() -> None:
    """An SBC in front: every user's REGISTERs come from the same address and port."""

    def scenario(m: Core) -> None:
        for user in ("u1", "u2", "u3"):
            add_phone(m, PHONE, user)
        for cseq in range(3, 6):
            m.advance(3)
            for user in ("u1", "u2", "u3"):
                m.feed(refresh(cseq, user=user), PHONE)

    fast, _ = run_both(scenario)
    assert fast.shortcuts == 9
    assert len(fast.core.templates) == 3


def test_a_retransmission_is_answered_again_from_the_stored_binding() -> None:
    """Template answers are stateless (RFC 3261 §8.2.7): nothing is kept for Timer J, so a retransmission goes
    through the pipeline, which answers it from the binding while its CSeq repeats within cseq_delay
    (behaviour §3.4): the same 200 but for the To tag, and nothing stored changes."""
    m = registered()
    m.advance(5)
    m.feed(refresh(3), PHONE)
    first = m.to_phone()
    stored = dict(m.store._aors)
    m.advance(0.5)
    m.feed(refresh(3), PHONE)  # T1 later: the 200 was lost
    again = m.to_phone()
    assert m.shortcuts == 1 and first.status == again.status == 200
    for name in ("via", "from", "call-id", "cseq", "contact"):
        assert again.headers.get(name) == first.headers.get(name), name
    assert str(again.to.uri) == str(first.to.uri)
    assert m.store._aors == stored
    assert m.rig.stack.stats.requests_in["REGISTER"] == 4  # relayed, learned from, then these two
    m.advance(40)  # past cseq_delay the same CSeq is out of order
    m.feed(refresh(3), PHONE)
    assert m.to_phone().status == 400


def test_what_the_pipeline_refuses_or_relays_is_never_templated() -> None:
    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        m.advance(1)
        m.feed(refresh(1).replace(b"alice-1", b"alice-1b"), PHONE)  # CSeq below the last one: 400
        m.feed(refresh(2), PHONE)  # the last one again, within cseq_delay: answered from state
        m.advance(150)  # the main registrar's copy is due (700 - 600 s after the relay): relayed
        m.feed(refresh(5), PHONE)
        m.feed(main_ok(m.to_main(), expires=None, header=None), MAIN)
        m.advance(1)
        m.feed(refresh(6), PHONE)  # absorbed again, from a template
        bye = "<sip:alice@192.0.2.10:5062>;expires=0"
        m.feed(register(bye, cseq=7, call_id="alice-call", branch="z9hG4bK-bye"), PHONE)
        m.feed(main_ok(m.to_main(), expires=0, header=0), MAIN)
        m.advance(1)
        m.feed(refresh(8), PHONE)  # the binding is gone: relayed as a new one

    fast, _ = run_both(scenario, outgoing_expires=700)
    statuses = [Response_of(d).status for d, p in fast.rig.raw if p == PHONE]
    assert 400 in statuses
    assert fast.shortcuts == 1
    assert len(fast.core.templates) == 0  # the binding it stood for was removed


def test_a_changed_register_goes_through_the_pipeline_and_becomes_the_template() -> None:
    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        m.advance(1)
        m.feed(refresh(3, extra="User-Agent: new/2"), PHONE)
        m.advance(1)
        m.feed(refresh(4, extra="User-Agent: new/2"), PHONE)

    fast, _ = run_both(scenario)
    assert fast.shortcuts == 1
    assert len(fast.core.templates) == 1


def test_rate_limited_absorption_stays_limited() -> None:
    fast, _ = run_both(refreshes(count=4), register_rate_limit=0.05)
    statuses = [Response_of(d).status for d, p in fast.rig.raw if p == PHONE]
    # one token per 20 s, a refresh every 7 s: the bucket refills for every third one
    assert statuses[-4:] == [503, 503, 200, 503]
    assert fast.shortcuts == 1


def test_a_draining_process_caps_every_answer_through_the_pipeline() -> None:
    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        m.core.draining = True
        m.advance(1)
        m.feed(refresh(3), PHONE)

    fast, _ = run_both(scenario, drain_expires=30)
    assert fast.shortcuts == 0
    assert Response_of(fast.rig.raw[-1][0]).contacts[0].expires == "30"


def test_no_template_with_a_digest_gate_so_a_replayed_authorization_is_checked() -> None:
    gate = digest.DigestGate("example.com", {"alice": "pw"}, b"k" * 32)
    m = registered(core_kw={"gate": gate})
    for cseq in range(3, 6):
        m.advance(1)
        m.feed(refresh(cseq), PHONE)
        assert m.to_phone().status == 401
    assert m.shortcuts == 0 and len(m.core.templates) == 0


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "aor"},
        {"mode": "mirror"},
        {"refresh_templates": 0},
        {"gruu": True},
        {"expires_max_deviation": 5},
    ],
    ids=["aor", "mirror", "off", "gruu", "randomised-lifetimes"],
)
def test_settings_that_turn_templates_off(settings: dict[str, Any]) -> None:
    m = registered(**settings)
    m.advance(1)
    m.feed(refresh(3), PHONE)
    assert m.shortcuts == 0 and len(m.core.templates) == 0


def test_the_limit_keeps_the_newest_templates() -> None:
    m = registered(refresh_templates=2)
    add_phone(m, NATTED, "bob")
    add_phone(m, Peer("udp", "192.0.2.12", 5062), "carol")
    assert len(m.core.templates) == 2
    m.advance(1)
    m.feed(refresh(3), PHONE)  # alice's was the oldest: gone
    m.feed(refresh(3, user="carol", peer=Peer("udp", "192.0.2.12", 5062)), Peer("udp", "192.0.2.12", 5062))
    assert m.shortcuts == 1


def test_any_one_byte_change_is_answered_as_the_pipeline_answers_it() -> None:
    """Every position of a templated refresh changed to another byte: with templates or without, the same
    messages come out (most changes make another request, which the template must not take for its own)."""
    base = refresh(3)
    rng = random.Random(5)
    positions = list(range(len(base)))
    for at in positions:
        for byte in {rng.choice(b"0123456789;:= \r\nABCabcz"), base[at] ^ 0x20}:
            if byte == base[at]:
                continue
            mutated = base[:at] + bytes([byte]) + base[at + 1 :]

            def scenario(m: Core, data: bytes = mutated) -> None:
                add_phone(m, PHONE)
                m.advance(1)
                m.feed(data, PHONE)

            run_both(scenario)


def test_a_phone_that_draws_a_new_from_tag_for_every_register_is_answered_from_its_template() -> None:
    """RFC 3261 §8.1.1.3: a new tag for every request outside a dialog; the reply echoes each one."""

    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        for cseq in range(3, 7):
            m.advance(5)
            m.feed(refresh(cseq).replace(b";tag=f1", b";tag=ft%d" % cseq), PHONE)

    fast, _ = run_both(scenario)
    assert fast.shortcuts == 4  # the template learned with the first tag serves every later one
    last = Response_of(fast.rig.raw[-1][0])
    assert last.from_.tag == "ft6"


def test_a_from_uri_with_a_tag_parameter_is_not_taken_for_the_from_tag() -> None:
    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        for cseq in range(3, 6):
            m.advance(5)
            data = refresh(cseq).replace(
                b"From: <sip:alice@example.com>;tag=f1", b"From: <sip:alice@example.com;tag=u>;tag=f1"
            )
            m.feed(data, PHONE)

    fast, _ = run_both(scenario)
    assert fast.shortcuts == 0


def test_a_phone_that_leaves_takes_its_template_with_it() -> None:
    """A phone that De-REGISTERs or vanishes never sends again, so :meth:`RefreshTemplates.answer` never finds
    its template unused: it goes when its binding goes (the soak's ~1.5 KB per departed phone, issue 15 item
    6), whether the phone De-REGISTERed or its binding expired."""
    phones = [(f"u{i}", Peer("udp", f"192.0.2.{20 + i}", 5062)) for i in range(6)]

    def scenario(m: Core) -> None:
        for user, peer in phones:
            add_phone(m, peer, user)
        m.advance(5)
        for user, peer in phones:
            m.feed(refresh(3, user=user, peer=peer), peer)  # answered from its template
        m.take()
        for user, peer in phones[:3]:
            m.feed(refresh(4, user=user, peer=peer).replace(b"expires=600", b"expires=0"), peer)
            m.feed(main_ok(m.to_main(), expires=0, header=0), MAIN)
            m.take()

    fast, _ = run_both(scenario)
    assert fast.shortcuts == 6
    assert len(fast.core.templates) == 3  # the three De-REGISTERed phones' templates are gone
    fast.advance(700)  # the other three vanished: their bindings expire (and are De-REGISTERed at main)
    assert fast.core.stats.expired == 3
    assert len(fast.core.templates) == 0


def test_a_binding_evicted_by_max_contacts_takes_its_template_with_it() -> None:
    second = Peer("udp", "192.0.2.11", 5062)

    def scenario(m: Core) -> None:
        add_phone(m, PHONE)
        m.advance(1)
        new_device = register(
            "<sip:alice@192.0.2.11:5062>;expires=900",
            cseq=1,
            call_id="d2",
            branch="z9hG4bK-d2",
            via_host="192.0.2.11:5062",
        )
        m.feed(new_device, second)
        m.feed(main_ok(m.to_main()), MAIN)  # stored: the oldest binding, alice's first phone, is evicted

    fast, _ = run_both(scenario, max_contacts=1, force_registration=True)
    record = fast.store.load("alice@example.com")
    assert record is not None and [b.source for b in record.bindings.values()] == [second]  # the new device
    assert len(fast.core.templates) == 0
