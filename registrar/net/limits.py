"""Guards against floods: which accepted stream connections (TCP, TLS, WebSocket) a process keeps, and how
many messages one source address may send it.

A phone holds one connection for hours; a flood opens thousands and sends nothing. The process refuses a new
connection beyond ``--max-connections`` in all or ``--max-connections-per-source`` from one address (so one
host cannot take every slot from the honest phones), and closes one that has sent no SIP message within
``--new-connection-timeout`` (the shell's idle sweep).

A phone sends a few messages a minute; a flood sends thousands a second from one address, of REGISTERs,
OPTIONS or garbage. :class:`SourceLimit` counts every datagram (and every message of a stream connection) by
source address before anything parses it, and drops what is over ``--source-rate-limit`` per second: unparsed,
unanswered (an answer would need a parse, would double the flood's traffic toward an address that may be
forged, and a flood does not honour Retry-After), counted. A UDP phone that strays over it retransmits.
A source sending ten times its rate in one second is a flood, not a busy NAT: it is blocked for
``--source-block-seconds``, which the shell turns into a kernel socket filter
(registrar/net/kernel_filter.py), so that its datagrams stop costing the process anything. Trusted sources
(``--trusted-sources``, the main registrar, the other registrar processes) are never limited.

Plain bookkeeping, no I/O: the shell calls these on accept, on close and on every message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["DROPS", "REFUSALS", "TIMEOUTS", "Admission", "SourceLimit", "parse_networks"]

REFUSALS = ("max_connections", "per_source")  # label values of midregistrar_connections_refused_total
TIMEOUTS = ("first_message", "idle")  # label values of midregistrar_connections_timed_out_total
DROPS = ("source_rate",)  # label values of midregistrar_messages_dropped_total


@dataclass
class Admission:
    """Counts accepted connections by source address and says which new ones to refuse."""

    max_connections: int  # 0: no limit
    per_source: int  # 0: no limit
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSALS, 0))
    timed_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIMEOUTS, 0))
    _sources: dict[str, int] = field(default_factory=dict)

    def admit(self, host: str, open_now: int) -> str | None:
        """Take a connection accepted from ``host`` with ``open_now`` connections already held (handshakes
        included): None when it may stay (it is counted until :meth:`release`), else the reason it is refused
        (counted)."""
        reason = None
        if self.max_connections and open_now >= self.max_connections:
            reason = "max_connections"
        elif self.per_source and self._sources.get(host, 0) >= self.per_source:
            reason = "per_source"
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self._sources[host] = self._sources.get(host, 0) + 1
        return None

    def release(self, host: str) -> None:
        """A connection :meth:`admit` took has closed (or its handshake failed)."""
        left = self._sources.get(host, 0) - 1
        if left > 0:
            self._sources[host] = left
        else:
            self._sources.pop(host, None)

    def from_source(self, host: str) -> int:
        return self._sources.get(host, 0)

    def close_for_silence(self, phase: str) -> None:
        """Count a connection closed because it sent nothing: before its first message, or for too long."""
        self.timed_out[phase] += 1


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

WINDOW = 1.0  # seconds between fresh starts of the counts (bounded memory)
BLOCK_FACTOR = 10  # a source sending this many times its rate within one second is blocked
MAX_BLOCKED = 64  # sources blocked at once (kernel_filter.MAX_V4); beyond, they are dropped one by one
BLOCK_MAX = 300.0  # seconds: the longest block of a source that keeps flooding
REPEAT_WINDOW = 60.0  # seconds after a block's end within which a new block lasts twice as long
MAX_SOURCES = 100_000  # sources counted in one second; beyond, a new source passes uncounted
TRUST_MEMORY = 60.0  # seconds a trust decision is kept (members come and go)
REPORT_EVERY = 10.0  # seconds between log lines about dropped messages, however hard the flood
_TRUSTED: list[float] = []  # the bucket of a trusted source (for the rest of the second): never empty


def parse_networks(items: Iterable[str]) -> list[Network]:
    """``10.0.0.0/8``, ``192.0.2.7`` or ``2001:db8::/32`` → networks (host bits allowed: masked off)."""
    return [ipaddress.ip_network(item.strip().strip("[]"), strict=False) for item in items if item.strip()]


@dataclass
class SourceLimit:
    """A token bucket per source address: ``rate`` messages per second, bursts of a fifth of that (0: no
    limit).

    The hot path is one dictionary read and a little arithmetic per message; whether an address is trusted
    is asked only once it goes over the rate, and remembered. The buckets refill evenly, so what a flood gets
    through comes spread over the second, not in one burst the process must then catch up with. Memory is
    bounded: the buckets start afresh (full) every second and hold at most :data:`MAX_SOURCES` addresses (a
    spray of addresses each below the rate is no one-source flood: past that many, new ones pass uncounted
    until the next second)."""

    rate: float
    trusted: list[Network] = field(default_factory=list)
    block_seconds: float = 0.0  # 0: never block
    exempt: Callable[[str], bool] = lambda host: False  # the main registrar, the other processes
    max_sources: int = MAX_SOURCES
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROPS, 0))
    limited: int = 0  # (source, second) pairs that went over the rate
    blocks: int = 0  # sources blocked (BLOCK_FACTOR times the rate), counted once per block
    blocked: dict[str, float] = field(default_factory=dict)  # source → blocked until
    changed: bool = False  # ``blocked`` changed since the shell last looked (take_blocked)
    burst: float = 0.0  # set from the rate
    _buckets: dict[str, list[float]] = field(default_factory=dict)  # source → [tokens, when counted]
    _drops: dict[str, int] = field(default_factory=dict)  # source → dropped this second
    _window_end: float = 0.0
    _repeats: dict[str, tuple[int, float]] = field(default_factory=dict)  # source → (doublings, block end)
    _trust: dict[str, bool] = field(default_factory=dict)  # decisions on sources that went over
    _trust_until: float = 0.0
    _reported: float = -REPORT_EVERY
    _since_report: int = 0  # messages dropped since the last report
    _sources: dict[str, int] = field(default_factory=dict)  # over the rate since the last report (≤ 5 kept)

    def __post_init__(self) -> None:
        self.burst = max(1.0, self.rate / 5)

    def allow(self, host: str, now: float) -> bool:
        """Count one message from ``host``: False when it must be dropped (counted)."""
        if now >= self._window_end:
            self._roll(now)
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) < self.max_sources:  # else a spray: uncounted until the next second
                self._buckets[host] = [self.burst - 1.0, now]
            return True
        if bucket is _TRUSTED:
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0 if tokens < self.burst else self.burst - 1.0
            bucket[1] = now
            return True
        return self._over(host, now)

    def _roll(self, now: float) -> None:
        self._buckets.clear()
        self._drops.clear()
        self._window_end = now + WINDOW
        if now >= self._trust_until:
            self._trust.clear()
            self._trust_until = now + TRUST_MEMORY

    def _over(self, host: str, now: float) -> bool:
        trusted = self._trust.get(host)
        if trusted is None:
            trusted = self.is_trusted(host)
            if len(self._trust) >= 10_000:
                self._trust.clear()
            self._trust[host] = trusted
        if trusted:
            self._buckets[host] = _TRUSTED
            return True
        n = self._drops.get(host, 0) + 1
        self._drops[host] = n
        if n == 1:
            self.limited += 1
        sources = self._sources
        if host in sources:
            sources[host] += 1
        elif len(sources) < 5:
            sources[host] = 1
        self.dropped["source_rate"] += 1
        self._since_report += 1
        if (
            n == int(self.rate * (BLOCK_FACTOR - 1))  # ten times its rate (the rate passed, the rest not)
            and self.block_seconds
            and len(self.blocked) < MAX_BLOCKED
        ):
            self._block(host, now)
        return False

    def _block(self, host: str, now: float) -> None:
        """Block ``host``: for ``block_seconds``, twice as long each time it is blocked again within a
        minute of its last block's end (up to :data:`BLOCK_MAX`), since it went on flooding meanwhile."""
        level = 0
        last = self._repeats.get(host)
        if last is not None and now - last[1] <= REPEAT_WINDOW:
            level = min(last[0] + 1, 16)
        seconds = min(max(BLOCK_MAX, self.block_seconds), self.block_seconds * 2**level)
        if len(self._repeats) >= 10_000:
            self._repeats.clear()
        self._repeats[host] = (level, now + seconds)
        self.blocked[host] = now + seconds
        self.blocks += 1
        self.changed = True

    def expire(self, now: float) -> None:
        """Lift the blocks whose time is up."""
        done = [host for host, until in self.blocked.items() if until <= now]
        for host in done:
            del self.blocked[host]
        if done:
            self.changed = True

    def take_blocked(self) -> list[str] | None:
        """The sources blocked now when that changed since the last call (for the shell's filter); else
        None."""
        if not self.changed:
            return None
        self.changed = False
        return list(self.blocked)

    def is_trusted(self, host: str) -> bool:
        """Listed in ``trusted`` or exempted by the caller (never rate-limited)."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return self.exempt(host)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:192.0.2.7 on a dual-stack socket
        return any(address in net or (mapped is not None and mapped in net) for net in self.trusted) or (
            self.exempt(host)
        )

    def report(self, now: float) -> str | None:
        """One line about what was dropped since the last one, at most every :data:`REPORT_EVERY` s; None
        when nothing was dropped or it is too soon."""
        if not self._since_report or now - self._reported < REPORT_EVERY:
            return None
        top = ", ".join(f"{h} ({n})" for h, n in sorted(self._sources.items(), key=lambda kv: -kv[1]))
        line = (
            f"{self._since_report} message{'s' if self._since_report > 1 else ''} dropped over "
            f"--source-rate-limit {self.rate}/s per source"
            f" since {'start' if self._reported < 0 else f'{now - self._reported:.0f} s ago'}"
            f"{'; from ' + top if top else ''} (add an SBC or NAT to --trusted-sources)"
        )
        if self.blocked:
            shown = ", ".join(f"{h} for {until - now:.0f} s" for h, until in list(self.blocked.items())[:5])
            line += f"; blocked (≥ {BLOCK_FACTOR}× the rate): {shown}"
        self._reported = now
        self._since_report = 0
        self._sources.clear()
        return line

    def tracked(self) -> int:
        """Addresses counted in the current second (bounded by ``max_sources``)."""
        return len(self._buckets)
