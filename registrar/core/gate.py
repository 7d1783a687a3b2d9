"""What a REGISTER must pass before it is answered here instead of by the main registrar (behaviour §11
[REC], T55): the optional local digest check, then a per-source rate limit. A relayed REGISTER meets
neither: the main registrar authenticates it.
"""

from __future__ import annotations

from registrar.config import Settings
from registrar.core.digest import DigestGate
from registrar.core.policy import RegistrarError
from registrar.core.reply import error_reply
from registrar.sip.message import Request, Response, make_response
from registrar.sip.uri import SipURI


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


class Gate:
    """The digest check and the rate limit, each optional; built only when one of them is configured."""

    def __init__(self, digest: DigestGate | None, limiter: RateLimiter | None) -> None:
        self.digest = digest
        self.limiter = limiter

    def refusal(self, request: Request, source: str, now: float, settings: Settings) -> Response | None:
        """None when the REGISTER from ``source`` may be absorbed; else the reply that refuses it: a 401
        challenge, or a 503 with Retry-After for a source over its rate."""
        if self.digest is not None:
            to = request.to.uri
            to_user = to.user if isinstance(to, SipURI) else None
            if not self.digest.verify(request.headers.get("authorization"), "REGISTER", to_user or "", now):
                response = make_response(request, 401)
                response.headers.add("WWW-Authenticate", self.digest.challenge(now))
                return response
        if self.limiter is not None and not self.limiter.allow(source, now):
            err = RegistrarError(503, "Too many REGISTERs from this source")
            response = error_reply(request, err, settings)
            if "retry-after" not in response.headers:
                response.headers.add("Retry-After", str(max(1, settings.retry_after or 5)))
            return response
        return None
