"""A digest brute force against the local gate (behaviour §11 item 3, docs/operations.md "Floods"): slowed
by a back-off per source and per user that grows while it goes on, counted and logged at a limited rate,
without locking the user's honest phones out. Through the pipeline: SIP messages in, answers out."""

from __future__ import annotations

import logging

import pytest

from registrar.core import digest
from registrar.core.gate import BACKOFF_MAX, FORGET_AFTER, AuthBackoff
from registrar.sip.message import Response
from registrar.sip.transport import Peer
from tests.unit.corekit import PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN

ATTACKER = Peer("udp", "198.51.100.66", 5060)
OTHER = Peer("udp", "203.0.113.5", 40000)  # a second phone of alice's, never authenticated here
FLOWS = {
    PHONE: ("<sip:alice@192.0.2.10:5062>", "c1@192.0.2.10"),
    ATTACKER: ("<sip:alice@198.51.100.66:5060>", "atk@198.51.100.66"),
    OTHER: ("<sip:alice@203.0.113.5:40000>", "c2@203.0.113.5"),
}
REALM = "example.com"


class Rig:
    """Alice registered (through the main registrar) from three flows; their refreshes meet the gate."""

    def __init__(self, limit: int = 3) -> None:
        self.gate = digest.DigestGate(REALM, {"alice": "pw"}, b"k" * 32)
        self.m = Core({"gate": self.gate}, mode="contact", outgoing_expires=3600, auth_failure_limit=limit)
        self.cseq = 10
        for peer in FLOWS:
            contact, call_id = FLOWS[peer]
            self.m.feed(register(contact, expires=60, call_id=call_id, via_host=_via(peer)), peer)
            self.m.feed(main_ok(self.m.to_main()), MAIN)
            assert self.m.to_phone(peer).status == 200

    def refresh(self, peer: Peer, password: str | None) -> Response:
        """An absorbable refresh from ``peer``'s flow, answering a fresh challenge with ``password``."""
        self.cseq += 1
        contact, call_id = FLOWS[peer]
        extra = ""
        if password is not None:
            challenge = digest.parse_challenge(self.gate.challenge(self.m.now))
            creds = digest.Credentials(REALM, "alice", password)
            answer = digest.authorization(challenge, creds, "REGISTER", "sip:example.com", f"cn{self.cseq}")
            extra = f"Authorization: {answer}"
        data = register(
            contact, expires=60, cseq=self.cseq, call_id=call_id, branch=f"z9hG4bK-{self.cseq}",
            via_host=_via(peer), extra=extra,
        )  # fmt: skip
        self.m.feed(data, peer)
        return self.m.to_phone(peer)

    def statuses(self, peer: Peer, password: str | None, count: int) -> list[int]:
        return [self.refresh(peer, password).status for _ in range(count)]


def _via(peer: Peer) -> str:
    return f"{peer.host}:{peer.port}"


def test_a_source_answering_wrongly_is_refused_for_a_window_that_doubles() -> None:
    r = Rig(limit=3)
    assert r.statuses(ATTACKER, "guess", 3) == [401, 401, 401]
    refused = r.refresh(ATTACKER, "pw")  # even the right password: not checked during the window
    assert refused.status == 503 and refused.headers.get("retry-after") == "2"
    assert refused.headers.get("p-registrar-error") == "Too many failed authentications"
    r.m.advance(1.0)
    assert r.refresh(ATTACKER, "guess").headers.get("retry-after") == "1"  # what is left of it
    r.m.advance(1.1)
    assert r.statuses(ATTACKER, "guess", 3) == [401, 401, 401]  # the next three guesses are checked
    assert r.refresh(ATTACKER, "guess").headers.get("retry-after") == "4"  # then twice as long
    stats = r.m.core.stats
    assert stats.auth_failures == 6
    assert stats.auth_refused == {"source": 3}
    assert stats.register_errors == 3  # the 503s are refusals; the challenges are not


def test_the_users_honest_phones_are_not_locked_out_by_a_brute_force() -> None:
    r = Rig(limit=3)
    assert r.refresh(PHONE, None).status == 401  # challenged first, as usual
    assert r.refresh(PHONE, "pw").status == 200  # this source has now authenticated as alice
    for _ in range(3):  # the attacker keeps going: both its address and the user alice are in back-off
        assert r.statuses(ATTACKER, "guess", 3) == [401, 401, 401]
        refused = r.refresh(ATTACKER, "guess")
        assert refused.status == 503
        assert r.refresh(PHONE, "pw").status == 200  # known: checked as usual throughout
        r.m.advance(int(refused.headers.get("retry-after") or 0))
    # A phone of alice that never authenticated here: challenged, then its first try in the window is
    # checked, so the right password gets in and it is known from then on.
    assert r.statuses(ATTACKER, "guess", 3) == [401, 401, 401]
    assert r.refresh(OTHER, None).status == 401
    assert r.refresh(OTHER, "pw").status == 200
    assert r.refresh(OTHER, "pw").status == 200
    assert r.m.core.stats.auth_refused.get("user", 0) == 0


def test_a_brute_force_spread_over_addresses_gets_one_guess_per_address_per_window() -> None:
    backoff = AuthBackoff(limit=3)
    for i in range(3):  # three wrong answers for alice from three addresses: alice is in back-off
        assert backoff.held(f"10.0.0.{i}", "alice", True, 100.0) is None
        backoff.failed(f"10.0.0.{i}", "alice", 100.0)
    assert backoff.held("10.0.0.9", "alice", True, 100.5) is None  # its one try in this window
    backoff.failed("10.0.0.9", "alice", 100.5)
    assert backoff.held("10.0.0.9", "alice", True, 100.6) == ("user", pytest.approx(1.4))
    assert backoff.held("10.0.0.9", "alice", False, 100.6) is None  # no credentials: just a challenge
    assert backoff.held("10.0.0.9", "bob", True, 100.6) is None  # other users are not concerned
    backoff.succeeded("192.0.2.10", "alice", 50.0)
    assert backoff.held("192.0.2.10", "alice", True, 100.6) is None  # known for alice
    assert backoff.held("192.0.2.10", "alice", True, 100.6) is None  # and not limited to one try
    # Three more wrong answers (one during the window, two after it) earn the next one: twice as long.
    backoff.failed("10.0.0.10", "alice", 102.1)
    assert backoff.held("10.0.0.10", "alice", True, 102.1) is None  # not yet
    backoff.failed("10.0.0.12", "alice", 102.1)
    assert backoff.held("10.0.0.11", "alice", True, 102.2) is None
    assert backoff.held("10.0.0.11", "alice", True, 102.3) == ("user", pytest.approx(3.8))


def test_the_window_stops_growing_at_five_minutes_and_is_forgotten_after_quiet() -> None:
    backoff = AuthBackoff(limit=1)
    now = 0.0
    windows = []
    for _ in range(10):
        backoff.failed("198.51.100.66", "alice", now)
        held = backoff.held("198.51.100.66", "alice", True, now)
        assert held is not None and held[0] == "source"
        windows.append(held[1])
        now += held[1]
    assert windows == [2, 4, 8, 16, 32, 64, 128, 256, BACKOFF_MAX, BACKOFF_MAX]
    now += FORGET_AFTER + 1
    backoff.failed("198.51.100.66", "alice", now)
    assert backoff.held("198.51.100.66", "alice", True, now) == ("source", 2.0)


def test_stale_nonces_and_missing_credentials_are_not_failures(caplog: pytest.LogCaptureFixture) -> None:
    r = Rig(limit=2)
    r.gate.nonce_ttl = 5
    challenge = digest.parse_challenge(r.gate.challenge(r.m.now))
    r.m.advance(6)
    answer = digest.authorization(
        challenge, digest.Credentials(REALM, "alice", "pw"), "REGISTER", "sip:example.com", "cn"
    )
    r.cseq += 1
    contact, call_id = FLOWS[PHONE]
    r.m.feed(register(contact, expires=60, cseq=r.cseq, call_id=call_id, branch="z9hG4bK-st",
                      extra=f"Authorization: {answer}"), PHONE)  # fmt: skip
    assert r.m.to_phone().status == 401  # challenged afresh
    assert r.statuses(PHONE, None, 5) == [401] * 5
    assert r.m.core.stats.auth_failures == 0
    with caplog.at_level(logging.WARNING, logger="midregistrar.gate"):
        for _ in range(20):  # a brute force at full speed: a log line when it begins, not one per guess
            r.refresh(ATTACKER, "guess")
    lines = [rec.getMessage() for rec in caplog.records if "brute force" in rec.getMessage()]
    assert len(lines) == 1
    assert "source 198.51.100.66 for 2 s" in lines[0] and "user alice for 2 s" in lines[0]
    assert r.m.core.stats.auth_failures == 2 and r.m.core.stats.auth_refused == {"source": 18}


def test_no_backoff_when_the_limit_is_zero() -> None:
    r = Rig(limit=0)
    assert r.statuses(ATTACKER, "guess", 20) == [401] * 20
    assert r.m.core.stats.auth_failures == 20 and r.m.core.stats.auth_refused == {}
