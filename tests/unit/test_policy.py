"""AoR canonical form (behaviour §3.2, T06), lifetimes (§3.3) and the mode-aor escaping (§6.1, T40)."""

from __future__ import annotations

import pytest

from registrar.config import Settings
from registrar.core.policy import RegistrarError, aor_from_uri, canonical_aor, escape_aor
from registrar.sip.uri import parse_uri


def _s(**kw: object) -> Settings:
    return Settings(main_registrar="sip:10.0.0.3:5070", **kw)  # type: ignore[arg-type]


def test_t06_canonical_aor_case_sensitive() -> None:
    uri = parse_uri("sip:Ali%63e@sip.Example.COM")
    assert canonical_aor(uri, _s(realm_prefix="sip.", case_sensitive=True)) == "Alice@example.com"
    assert canonical_aor(uri, _s(realm_prefix="sip.", case_sensitive=False)) == "alice@example.com"


def test_t06_realm_prefix_compared_case_insensitively() -> None:
    assert canonical_aor(parse_uri("sip:bob@SIP.Example.COM"), _s(realm_prefix="sip.")) == "bob@example.com"


def test_use_domain_off_keeps_the_user_only() -> None:
    assert canonical_aor(parse_uri("sip:bob@example.com"), _s(use_domain=False)) == "bob"


def test_t04_empty_user_and_too_long() -> None:
    with pytest.raises(RegistrarError) as info:
        canonical_aor(parse_uri("sip:example.com"), _s())
    assert info.value.status == 400
    with pytest.raises(RegistrarError) as info:
        canonical_aor(parse_uri(f"sip:{'a' * 65}@example.com"), _s())
    assert info.value.status == 500


@pytest.mark.parametrize(
    ("aor", "escape", "use_domain", "user"),
    [
        ("alice@example.com", "%40", True, "alice%40example.com"),
        ("alice@example.com", "___", True, "alice___example.com"),
        ("alice", "%40", False, "alice"),
        ("a b@example.com", "%40", True, "a%20b%40example.com"),
    ],
)
def test_escape_and_back(aor: str, escape: str, use_domain: bool, user: str) -> None:
    s = _s(at_escape_str=escape, use_domain=use_domain)
    assert escape_aor(aor, s) == user
    assert aor_from_uri(parse_uri(f"sip:{user}@10.0.0.2:5060"), s) == aor
