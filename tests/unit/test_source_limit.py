"""The per-source message limit (registrar/net/limits.py SourceLimit, docs/operations.md "Floods"): counted
per address in one-second windows before anything parses a message, trusted addresses never limited, memory
bounded under a spray of addresses, one log line per 10 s however hard the flood; and its settings."""

from __future__ import annotations

import pytest

from registrar.config import ConfigError, Settings, build_settings
from registrar.net.limits import SourceLimit, parse_networks

FLOOD = "198.51.100.66"
PHONE = "192.0.2.10"


def _sent(limit: SourceLimit, host: str, count: int, now: float, every: float = 0.0) -> int:
    """How many of ``count`` messages from ``host``, from ``now`` on ``every`` seconds apart, pass."""
    return sum(limit.allow(host, now + i * every) for i in range(count))


def test_each_source_gets_its_rate_in_a_bucket_and_the_rest_is_dropped_and_counted() -> None:
    limit = SourceLimit(100)  # bursts of 20
    assert _sent(limit, FLOOD, 50, 100.0) == 20  # at once: the burst
    assert _sent(limit, PHONE, 3, 100.0) == 3  # another address: a bucket of its own
    assert _sent(limit, FLOOD, 100, 100.001, every=0.001) in (9, 10)  # then 100/s, evenly: 10 in 0.1 s
    assert _sent(limit, FLOOD, 50, 100.5, every=0.02) == 50  # at its rate, every one passes
    assert limit.dropped["source_rate"] in (120, 121)
    assert limit.limited == 1  # one source went over in that second
    assert _sent(limit, FLOOD, 50, 101.6) == 20  # the next second: counted afresh, over again
    assert limit.limited == 2 and limit.dropped["source_rate"] in (150, 151)


def test_a_source_at_ten_times_its_rate_is_blocked_for_a_while_then_counted_afresh() -> None:
    limit = SourceLimit(10, block_seconds=5.0)  # bursts of 2
    assert limit.take_blocked() is None
    assert _sent(limit, FLOOD, 91, 50.0, every=0.001) == 2 and limit.blocked == {}  # 89 dropped: over only
    assert _sent(limit, FLOOD, 1, 50.05) == 0  # the 90th dropped in one second: ten times the rate
    assert limit.blocked == {FLOOD: 55.05} and limit.blocks == 1
    assert limit.take_blocked() == [FLOOD] and limit.take_blocked() is None  # for the shell's filter
    assert "blocked (≥ 10× the rate): 198.51.100.66 for 5 s" in (limit.report(50.05) or "")
    limit.expire(55.0)
    assert limit.take_blocked() is None
    limit.expire(55.05)
    assert limit.blocked == {} and limit.take_blocked() == []  # lifted: the filter comes off
    assert _sent(limit, FLOOD, 100, 55.05) == 2 and limit.blocks == 2  # it goes on: blocked again,
    assert limit.blocked == {FLOOD: 65.05}  # twice as long
    limit.expire(65.05)
    assert _sent(limit, FLOOD, 100, 65.1) == 2 and limit.blocked == {FLOOD: 85.1}  # and so on
    limit.expire(85.1)
    assert _sent(limit, FLOOD, 100, 85.1 + 61) == 2 and limit.blocked == {
        FLOOD: 151.1
    }  # after a quiet minute
    lengths = []
    until = limit.blocked[FLOOD]
    for _ in range(8):  # it goes on flooding as each block ends: up to 5 minutes
        limit.expire(until)
        _sent(limit, FLOOD, 100, until)
        lengths.append(round(limit.blocked[FLOOD] - until))
        until = limit.blocked[FLOOD]
    assert lengths == [10, 20, 40, 80, 160, 300, 300, 300]
    never = SourceLimit(10)  # --source-block-seconds 0
    assert _sent(never, FLOOD, 1000, 1.0) == 2 and never.blocked == {} and not never.changed


def test_trusted_networks_the_main_registrar_and_members_are_never_limited() -> None:
    asked: list[str] = []

    def member(host: str) -> bool:
        asked.append(host)
        return host == "10.1.2.3"

    limit = SourceLimit(10, parse_networks(["203.0.113.0/24", "2001:db8::/32"]), exempt=member)
    for host in ("203.0.113.9", "2001:db8::5", "::ffff:203.0.113.9", "10.1.2.3"):
        assert _sent(limit, host, 50, 10.0) == 50, host
    assert _sent(limit, FLOOD, 50, 10.0) == 2
    # Trust is asked only of a source over its rate, and remembered: not once per message.
    assert asked.count("10.1.2.3") == 1 and asked.count(FLOOD) == 1
    assert _sent(limit, "10.1.2.3", 50, 10.5) == 50 and asked.count("10.1.2.3") == 1
    assert limit.dropped["source_rate"] == 48


def test_memory_stays_bounded_under_a_spray_of_sources() -> None:
    limit = SourceLimit(10, max_sources=1000)
    for i in range(50_000):
        limit.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 5.0)
    assert limit.tracked() == 1000  # past the bound new sources pass uncounted
    assert _sent(limit, "10.0.0.1", 10, 5.0) == 1  # one counted early on keeps its bucket (2, one used)
    limit.allow(PHONE, 6.0)  # a new window starts afresh
    assert limit.tracked() == 1


def test_a_flood_is_reported_at_most_every_ten_seconds_with_its_sources() -> None:
    limit = SourceLimit(5)  # bursts of 1
    assert limit.report(0.0) is None  # nothing dropped
    lines = []
    for tick in range(300):  # 30 s of a flood, 10 messages per 0.1 s
        now = 1000.0 + tick / 10
        _sent(limit, FLOOD, 10, now)
        line = limit.report(now)
        if line is not None:
            lines.append(line)
    assert len(lines) == 3
    assert FLOOD in lines[0] and "--source-rate-limit 5/s" in lines[0] and "--trusted-sources" in lines[0]
    # 100 messages a second, about 5 let through: the rest dropped, every one counted against its source.
    dropped = int(lines[1].split()[0])
    assert 940 <= dropped <= 960 and "since 10 s ago" in lines[1]
    assert f"from {FLOOD} ({dropped})" in lines[1]


def test_zero_is_no_limit_in_the_settings_and_trusted_sources_are_validated() -> None:
    base = {"main_registrar": "sip:10.0.0.3:5070"}
    assert Settings(**base).source_rate_limit == 500  # type: ignore[arg-type]
    assert Settings(**base).trusted_sources == ["127.0.0.0/8", "::1/128"]  # type: ignore[arg-type]
    env = {"MIDREG_TRUSTED_SOURCES": "10.0.0.0/8, 192.0.2.7,[2001:db8::1]", "MIDREG_SOURCE_RATE_LIMIT": "0"}
    settings = build_settings(base, environ=env)
    assert settings.trusted_sources == ["10.0.0.0/8", "192.0.2.7", "[2001:db8::1]"]
    assert settings.source_rate_limit == 0
    nets = parse_networks(settings.trusted_sources)
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::1/128"]
    assert build_settings({**base, "trusted_sources": [""]}, environ={}).trusted_sources == []
    with pytest.raises(ConfigError, match=r"invalid trusted-sources: 'sbc\.example\.com' is not an IP"):
        build_settings({**base, "trusted_sources": ["sbc.example.com"]}, environ={})
    with pytest.raises(ConfigError, match="invalid source-rate-limit"):
        build_settings({**base, "source_rate_limit": "-1"}, environ={})
