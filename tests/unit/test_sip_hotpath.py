"""The stack's cheap paths for answered non-INVITE transactions and the helpers behind them."""

from __future__ import annotations

import dataclasses
import gc

import pytest

from registrar.core.policy import Lifetimes
from registrar.net.server import unique_tokens
from registrar.sip.message import Response, make_response
from registrar.sip.stack import IncomingRequest
from registrar.sip.transport import Peer
from tests.unit.stackkit import PHONE, make_rig, request_bytes


def _answer(rig, status: int = 200) -> IncomingRequest:  # type: ignore[no-untyped-def]
    [event] = rig.take_events()
    assert isinstance(event, IncomingRequest)
    rig.stack.respond(event.txn, make_response(event.request, status))
    rig.drain()
    return event


def test_answered_register_keeps_only_bytes_and_resends_them_byte_for_byte() -> None:
    rig = make_rig()
    stack = rig.stack
    data = request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/UDP 192.0.2.10:5062;rport")
    stack.receive(data, PHONE, 0.0)
    [event] = stack.pop_events()
    assert isinstance(event, IncomingRequest)
    stack.respond(event.txn, make_response(event.request, 200))
    first = stack.pop_outgoing()
    assert stack._servers == {}  # the transaction object is gone; its response bytes stay for Timer J
    assert len(stack._completed) == 1 and stack.active_transactions == 1
    # str -> bytes only: the cyclic GC never tracks that dict, so a full collection does not walk it
    assert not gc.is_tracked(stack._completed)
    stack.receive(data, PHONE, 1.0)
    again = stack.pop_outgoing()
    assert stack.pop_events() == []
    assert again == first and again[0][1] == Peer("udp", "192.0.2.10", 5062)
    assert again[0][0].startswith(b"SIP/2.0 200 OK") and b"rport=5062" in again[0][0]
    assert stack.stats.retransmissions_absorbed == 1


def test_same_key_after_timer_j_is_a_new_transaction_with_its_own_timer() -> None:
    rig = make_rig()
    data = request_bytes("OPTIONS", "sip:10.0.0.2", via="SIP/2.0/UDP 192.0.2.10:5062")
    rig.feed(data, PHONE)
    _answer(rig)
    rig.advance(32.1)
    assert rig.stack.active_transactions == 0
    rig.feed(data, PHONE)  # new transaction, same key
    _answer(rig, 404)
    rig.advance(10)
    rig.feed(data, PHONE)
    assert [r.status for r, _ in rig.take() if isinstance(r, Response)] == [200, 404, 404]
    rig.advance(22.2)  # 32 s after the second answer: its own Timer J, not the first one's
    assert rig.stack.active_transactions == 0


def test_retransmitted_cancel_of_an_unknown_invite_gets_the_same_481() -> None:
    rig = make_rig()
    data = request_bytes("CANCEL", via="SIP/2.0/UDP 192.0.2.10:5062", branch="z9hG4bK-c1")
    rig.feed(data, PHONE)
    rig.feed(data, PHONE)
    statuses = [r.status for r, _ in rig.take() if isinstance(r, Response)]
    assert statuses == [481, 481]


def test_late_answer_to_a_completed_transaction_sends_nothing() -> None:
    rig = make_rig()
    rig.feed(request_bytes("REGISTER", "sip:example.com", via="SIP/2.0/UDP 192.0.2.10:5062"), PHONE)
    event = _answer(rig)
    rig.take()
    rig.stack.respond(event.txn, make_response(event.request, 500))
    rig.drain()
    assert rig.take() == []


def test_frozen_fast_init_keeps_dataclass_behaviour() -> None:
    peer = Peer("udp", "192.0.2.1", 5060)
    assert peer == Peer("udp", "192.0.2.1", 5060, None, 0) and hash(peer) == hash(
        Peer("udp", "192.0.2.1", 5060)
    )
    assert dataclasses.replace(peer, port=5062).port == 5062
    with pytest.raises(dataclasses.FrozenInstanceError):
        peer.port = 1  # type: ignore[misc]
    life = Lifetimes(60, 50, 600)
    assert (life.requested, life.local, life.outgoing) == (60, 50, 600)


def test_unique_tokens_are_48_bit_hex_and_do_not_repeat() -> None:
    unique = unique_tokens()
    tokens = {unique() for _ in range(10_000)}
    assert len(tokens) == 10_000 and all(len(t) == 12 and int(t, 16) >= 0 for t in tokens)
    assert unique_tokens()() not in tokens  # another generator is seeded afresh
