"""Clock skew between registrar processes (registrar/store/members.py): each member key carries its writer's
wall clock; a peer off by more than a second is logged and shown, once two puts in a row agree."""

from __future__ import annotations

import logging

import pytest

from registrar.store.etcd_layout import EtcdKeys, encode_member, member_clock
from registrar.store.members import MemberRegistry


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock) -> MemberRegistry:
    return MemberRegistry(None, EtcdKeys(b"/p/"), "me", 10, clock)  # type: ignore[arg-type]  # no etcd call made


def test_member_values_carry_the_writers_clock_and_old_values_still_decode() -> None:
    assert member_clock(encode_member("udp:10.0.0.7:5060", 1700000000.1234)) == 1700000000.123
    assert member_clock(encode_member("udp:10.0.0.7:5060")) is None  # written by an older version
    for bad in (
        b'{"sip": "x", "clock": "soon"}',
        b'{"sip": "x", "clock": true}',
        b"\xff",
        b'{"sip": "x", "clock": 1e999}',
    ):
        assert member_clock(bad) is None


def test_a_peer_30_s_ahead_is_logged_and_shown_once_two_puts_agree(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(1000.0)
    reg = registry(clock)
    caplog.set_level(logging.INFO, "registrar.store.members")
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 1030.02))
    assert reg.skew() == 0.0 and not caplog.records, "one put alone proves nothing (it may be a late replay)"
    clock.now = 1005.0
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 1035.01))
    assert reg.skew() == pytest.approx(30.01)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "clock of member peer is +30.0 s from ours" in caplog.text
    clock.now = 1035.0
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 1065.0))
    assert len(caplog.records) == 1, "the same skew is logged once"
    reg.gone("peer")
    assert reg.skew() == 0.0


def test_a_late_replay_or_a_small_offset_is_no_skew(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(2000.0)
    reg = registry(clock)
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 1940.0))  # replayed a minute late
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 2000.2))  # then fresh: signs differ
    assert reg.skew() == 0.0
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 2000.3))
    assert reg.skew() == pytest.approx(0.2) and not caplog.records
    reg.put("me", encode_member("udp:10.0.0.7:5060", 9999.0))  # our own key says nothing
    reg.put("me", encode_member("udp:10.0.0.7:5060", 9999.0))
    assert reg.skew() == pytest.approx(0.2)


def test_a_peer_behind_recovering_is_logged_back_in_agreement(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(3000.0)
    reg = registry(clock)
    caplog.set_level(logging.INFO, "registrar.store.members")
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 2998.0))
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 2998.0))
    assert reg.skew() == pytest.approx(2.0) and "-2.0 s from ours" in caplog.text
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 2999.95))
    reg.put("peer", encode_member("udp:10.0.0.8:5060", 2999.95))
    assert reg.skew() == pytest.approx(0.05) and "agrees with ours again" in caplog.text
