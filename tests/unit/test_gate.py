"""The gate in front of absorption (behaviour §11 [REC], T55): the per-source token bucket, the replies
that refuse, and which refusals count as refused REGISTERs."""

from __future__ import annotations

from registrar.config import Settings
from registrar.core import digest
from registrar.core.gate import Gate, RateLimiter
from registrar.sip.message import Request, parse_message
from tests.unit.corekit import PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN


def _request() -> Request:
    msg = parse_message(register())
    assert isinstance(msg, Request)
    return msg


def _settings(**more: object) -> Settings:
    return Settings(main_registrar="sip:10.0.0.3:5070", **more)  # type: ignore[arg-type]


def test_bucket_is_per_source_and_refills_at_the_rate() -> None:
    limiter = RateLimiter(rate=2.0)  # burst 4
    assert [limiter.allow("a", 0.0) for _ in range(5)] == [True, True, True, True, False]
    assert limiter.allow("b", 0.0)  # another source has its own bucket
    assert not limiter.allow("a", 0.2)  # 0.4 token since
    assert limiter.allow("a", 0.5)  # one full token
    assert [limiter.allow("a", 100.0) for _ in range(5)] == [True, True, True, True, False]  # capped at burst


def test_refusals_are_a_challenge_then_a_503_with_retry_after() -> None:
    settings = _settings(retry_after=0)
    checked = Gate(digest.DigestGate("example.com", {"alice": "pw"}, b"k" * 32), None)
    challenge = checked.refusal(_request(), PHONE.host, 100.0, settings)
    assert challenge is not None and challenge.status == 401
    assert 'realm="example.com"' in (challenge.headers.get("www-authenticate") or "")
    limited = Gate(None, RateLimiter(rate=1.0, burst=1.0))
    assert limited.refusal(_request(), PHONE.host, 0.0, settings) is None
    refused = limited.refusal(_request(), PHONE.host, 0.0, settings)
    assert refused is not None and refused.status == 503
    assert refused.headers.get("retry-after") == "5"  # never without one, even with retry_after unset
    assert refused.headers.get("p-registrar-error") == "Too many REGISTERs from this source"


def _absorbed_refreshes(m: Core, count: int) -> list[int]:
    """Statuses of ``count`` refreshes of a relayed binding, a second apart (each one absorbable)."""
    contact = "<sip:alice@192.0.2.10:5062>"
    m.feed(register(contact, expires=60), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    statuses = []
    for cseq in range(11, 11 + count):
        m.advance(1)
        m.feed(register(contact, expires=60, cseq=cseq, branch=f"z9hG4bK-{cseq}"), PHONE)
        statuses.append(m.to_phone().status)
    return statuses


def test_only_the_rate_limit_counts_as_a_refused_register() -> None:
    gate = digest.DigestGate("example.com", {"alice": "pw"}, b"k" * 32)
    challenged = Core({"gate": gate}, mode="contact", outgoing_expires=3600)
    assert _absorbed_refreshes(challenged, 2) == [401, 401]
    assert challenged.core.stats.register_errors == 0
    limited = Core(mode="contact", outgoing_expires=3600, register_rate_limit=0.001)
    assert _absorbed_refreshes(limited, 3) == [200, 503, 503]
    assert limited.core.stats.register_errors == 2
