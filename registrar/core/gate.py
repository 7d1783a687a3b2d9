"""What a REGISTER must pass before it is answered here instead of by the main registrar (behaviour §11
[REC], T55): the optional local digest check, slowed down for whoever keeps answering it wrongly, then a
per-source rate limit. A relayed REGISTER meets none of them: the main registrar authenticates it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from registrar.config import Settings
from registrar.core.digest import DigestGate, Verdict
from registrar.core.policy import RegistrarError
from registrar.core.reply import error_reply
from registrar.core.state import CoreStats
from registrar.sip.message import Request, Response, make_response
from registrar.sip.uri import SipURI

log = logging.getLogger("midregistrar.gate")

BACKOFF_START = 2.0  # seconds of the first back-off window; each one that follows doubles it
BACKOFF_MAX = 300.0  # the longest window
FORGET_AFTER = 600.0  # an offender quiet for this long starts afresh (failures and window length)
KNOWN_FOR = 3600.0  # a source that authenticated as a user passes that user's back-off this long
MAX_ENTRIES = 100_000  # per table: the oldest entry goes when a new one needs room (bounded memory)
MAX_TRIED = 4096  # sources one user in back-off remembers having let try; beyond, new ones wait too
REPORT_EVERY = 10.0  # seconds between log lines about back-offs, however hard the brute force
REFUSED = ("source", "user")  # label values of midregistrar_auth_refused_total


class RateLimiter:
    """Token bucket per source address for locally answered REGISTERs (behaviour §11 [REC] mitigation 5)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 2)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, source: str, now: float) -> bool:
        tokens, last = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) > 100_000:
            self._buckets.clear()  # bounded memory under a spray of sources: start afresh
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True


@dataclass(slots=True)
class _Offender:
    """Wrong answers seen from one source, or for one user, and the back-off they earned."""

    failures: int = 0  # since the last window began
    level: int = 0  # windows earned so far: the next lasts BACKOFF_START × 2**level
    until: float = 0.0  # end of the current window
    last: float = 0.0  # last wrong answer
    tried: dict[str, float] = field(default_factory=dict)  # a user's: source → the window it tried in


def _bounded_put(table: dict[str, _Offender], key: str, now: float) -> _Offender:
    entry = table.get(key)
    if entry is None or (now - entry.last > FORGET_AFTER and now >= entry.until):
        if entry is None and len(table) >= MAX_ENTRIES:
            del table[next(iter(table))]  # the oldest offender goes first
        entry = table[key] = _Offender()
    return entry


class AuthBackoff:
    """Slows a digest brute force down (behaviour §11 item 3).

    After ``limit`` wrong answers from one source address, that source's REGISTERs through the gate are
    answered 503 with Retry-After, unchecked, for a window of 2 s that doubles each time the source goes on
    (up to 5 min; forgotten after 10 quiet minutes). After ``limit`` wrong answers for one user, from any
    sources, that user is in back-off the same way, with two exceptions so that an attacker cannot lock the
    user's honest phone out: a source that authenticated as that user within the last hour is checked as
    usual, and any other source may still try once per window (so a phone of the user is let in at its first
    try, and a brute force spread over many addresses gets one guess per address per window). A request
    without credentials is challenged as usual (it costs nothing and reveals nothing) unless its source is in
    back-off."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sources: dict[str, _Offender] = {}
        self._users: dict[str, _Offender] = {}
        self._known: dict[tuple[str, str], float] = {}  # (user, source) → last successful authentication
        self._reported = -REPORT_EVERY
        self._new: list[str] = []  # back-offs begun since the last log line (a few kept)
        self._begun = 0

    def held(self, source: str, user: str, credentials: bool, now: float) -> tuple[str, float] | None:
        """(what is in back-off, seconds left) when this attempt must be refused unchecked; else None."""
        entry = self._sources.get(source)
        if entry is not None and now < entry.until:
            return "source", entry.until - now
        entry = self._users.get(user)
        if entry is None or now >= entry.until or not credentials:
            return None
        if now - self._known.get((user, source), -math.inf) <= KNOWN_FOR:
            return None
        tried = entry.tried
        if tried.get(source) == entry.until or (source not in tried and len(tried) >= MAX_TRIED):
            return "user", entry.until - now
        tried[source] = entry.until  # its one try in this window
        return None

    def failed(self, source: str, user: str, now: float) -> None:
        """A wrong answer from ``source`` for ``user``."""
        for kind, table, key in (("source", self._sources, source), ("user", self._users, user)):
            entry = _bounded_put(table, key, now)
            entry.last = now
            entry.failures += 1
            if entry.failures >= self.limit and now >= entry.until:
                window = min(BACKOFF_MAX, BACKOFF_START * 2**entry.level)
                entry.level += 1
                entry.until = now + window
                entry.failures = 0
                entry.tried.clear()
                self._begun += 1
                if len(self._new) < 5:
                    self._new.append(f"{kind} {key} for {window:g} s")

    def succeeded(self, source: str, user: str, now: float) -> None:
        known = self._known
        if (user, source) not in known and len(known) >= MAX_ENTRIES:
            del known[next(iter(known))]
        known[(user, source)] = now

    def report(self, now: float) -> str | None:
        """A line about the back-offs begun since the last one, at most every :data:`REPORT_EVERY` s."""
        if not self._begun or now - self._reported < REPORT_EVERY:
            return None
        line = (
            f"digest brute force: {self._begun} back-off(s) begun after {self.limit} wrong answers "
            f"(--auth-failure-limit): {', '.join(self._new)}"
        )
        self._reported = now
        self._begun = 0
        self._new.clear()
        return line


class Gate:
    """The digest check (with its back-off) and the rate limit, each optional; built only when one of them
    is configured."""

    def __init__(
        self,
        digest: DigestGate | None,
        limiter: RateLimiter | None,
        backoff: AuthBackoff | None = None,
        stats: CoreStats | None = None,
    ) -> None:
        self.digest = digest
        self.limiter = limiter
        self.backoff = backoff
        self.stats = stats if stats is not None else CoreStats()

    def refusal(self, request: Request, source: str, now: float, settings: Settings) -> Response | None:
        """None when the REGISTER from ``source`` may be absorbed; else the reply that refuses it: a 401
        challenge, or a 503 with Retry-After for a source or user in back-off or a source over its rate."""
        if self.digest is not None:
            to = request.to.uri
            to_user = (to.user if isinstance(to, SipURI) else None) or ""
            header = request.headers.get("authorization")
            backoff = self.backoff
            if backoff is not None:
                held = backoff.held(source, to_user, header is not None, now)
                if held is not None:
                    kind, left = held
                    self.stats.auth_refused[kind] = self.stats.auth_refused.get(kind, 0) + 1
                    return _busy(request, "Too many failed authentications", math.ceil(left), settings)
            verdict = self.digest.check(header, "REGISTER", to_user, now)
            if verdict is not Verdict.OK:
                if verdict is Verdict.WRONG:
                    self.stats.auth_failures += 1
                    if backoff is not None:
                        backoff.failed(source, to_user, now)
                        line = backoff.report(now)
                        if line is not None:
                            log.warning("%s", line)
                response = make_response(request, 401)
                response.headers.add("WWW-Authenticate", self.digest.challenge(now))
                return response
            if backoff is not None:
                backoff.succeeded(source, to_user, now)
        if self.limiter is not None and not self.limiter.allow(source, now):
            return _busy(request, "Too many REGISTERs from this source", settings.retry_after or 5, settings)
        return None


def _busy(request: Request, why: str, retry_after: int, settings: Settings) -> Response:
    response = error_reply(request, RegistrarError(503, why), settings)
    response.headers.remove("retry-after")
    response.headers.add("Retry-After", str(max(1, retry_after)))
    return response
