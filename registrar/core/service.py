"""The mid-registrar over the sans-IO stack (behaviour §1: REGISTER → save → relay or answer; request from
the main registrar → lookup → forward; expiry → De-REGISTER).

:class:`MidRegistrar` is what the stack and the store talk to: it hands each event to the part that does
that job (:class:`~registrar.core.registration.Registration`, :class:`~registrar.core.routing.Routing`,
:class:`~registrar.core.expiry.Expiry`), which share one :class:`~registrar.core.state.CoreState`.
Nothing here touches a socket; the shell drains the stack after each call.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from functools import partial

from registrar.config import Settings
from registrar.core import digest
from registrar.core.expiry import Expiry
from registrar.core.gate import AuthBackoff, Gate, RateLimiter
from registrar.core.refresh import RefreshTemplates
from registrar.core.registration import Registration
from registrar.core.routing import Routing
from registrar.core.state import CoreState, CoreStats
from registrar.records import AorRecord, Binding
from registrar.sip.errors import ParseError
from registrar.sip.message import Request, Response, make_response
from registrar.sip.stack import ClientResult, Event, IncomingRequest, ProxyFinal, Stack, StrayAck
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import parse_uri
from registrar.store.base import Pending, Store, StoreUnavailable

log = logging.getLogger("midregistrar.core")


class MidRegistrar:
    """One process's mid-registrar: the event dispatcher over its three parts."""

    def __init__(
        self,
        settings: Settings,
        stack: Stack,
        store: Store,
        rng: random.Random | None = None,
        *,
        gate: digest.DigestGate | None = None,
        credentials: list[digest.Credentials] | None = None,
    ) -> None:
        if settings.main_registrar is None:
            raise ValueError("a main registrar URI is required")
        main_uri = parse_uri(settings.main_registrar)
        main_peer = peer_for_uri(parse_uri(settings.main_proxy) if settings.main_proxy else main_uri)
        self.state = CoreState(settings, stack, store, rng or random.Random(), main_uri, main_peer)
        limiter = RateLimiter(settings.register_rate_limit) if settings.register_rate_limit else None
        self.expiry = Expiry(self.state, credentials or [])
        backoff = (
            AuthBackoff(settings.auth_failure_limit)
            if gate is not None and settings.auth_failure_limit
            else None
        )
        absorb_gate = (
            Gate(gate, limiter, backoff, self.state.stats)
            if gate is not None or limiter is not None
            else None
        )
        self.templates = RefreshTemplates(self.state, limiter, gate is not None, settings.refresh_templates)
        store.released = self.templates.forget
        self.registration = Registration(self.state, self.expiry, self.handle, absorb_gate, self.templates)
        self.routing = Routing(self.state)

    @property
    def stats(self) -> CoreStats:
        return self.state.stats

    @property
    def draining(self) -> bool:
        """Set while the process shuts down: the lifetimes in 200 OKs are capped to drain_expires."""
        return self.state.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.state.draining = value

    @property
    def store(self) -> Store:
        return self.state.store

    def shortcut(self, data: bytes, peer: Peer, now: float) -> bool:
        """Answer a datagram or framed message without the stack when it repeats an absorbed refresh
        (:mod:`registrar.core.refresh`); False when :meth:`Stack.receive` must take it."""
        return self.templates.answer(data, peer, now)

    def handle(self, event: Event, now: float) -> None:
        """One stack event. Work the store cannot answer yet is parked and runs again on ``store_ready``."""
        try:
            if isinstance(event, IncomingRequest):
                self._request(event, now)
            elif isinstance(event, ProxyFinal):
                self.registration.final(event, now)
            elif isinstance(event, StrayAck):
                self._ack(event, now)
            elif isinstance(event, ClientResult):
                self.expiry.client_result(event)
        except Pending as wait:
            self.state.park(wait.key, partial(self.handle, event))
        except StoreUnavailable:
            self._unavailable(event)

    def _request(self, event: IncomingRequest, now: float) -> None:
        request = event.request
        try:
            if request.method == "REGISTER":
                self.registration.register(event, now)
            elif request.method == "OPTIONS" and self.routing.addressed_to_us(request):
                self.routing.options(event)
            else:
                self.routing.route(event, now)
        except ParseError as exc:
            self.state.stack.respond(event.txn, _parse_error_response(request, exc))

    def _ack(self, event: StrayAck, now: float) -> None:
        """An ACK is never answered: one that cannot be routed is dropped."""
        try:
            self.routing.ack(event.request, event.peer, now)
        except ParseError as exc:
            log.debug("ACK dropped: %s", exc.reason)

    def _unavailable(self, event: Event) -> None:
        """The store cannot be reached: 503 with Retry-After, never a guessed answer (architecture "Shared
        state in etcd")."""
        state = self.state
        state.stats.unavailable += 1
        if isinstance(event, IncomingRequest):
            request, answer = event.request, partial(state.stack.respond, event.txn)
        elif isinstance(event, ProxyFinal):
            self.registration.relays.pop(id(event.ctx), None)
            request, answer = event.ctx.request, partial(state.stack.finish, event.ctx)
        else:
            return
        response = make_response(request, 503)
        response.reason = "Service Unavailable (registration state unreachable)"
        response.headers.add("Retry-After", str(max(1, state.settings.retry_after or 5)))
        answer(response)

    # ------------------------------------------------------------------------------------ store
    # A networked store (etcd) answers later: parked work and ticketed writes resume from its callbacks.

    def park(self, key: str, work: Callable[[float], None]) -> None:
        """Run ``work(now)`` once the store reports ``key`` ready."""
        self.state.park(key, work)

    def store_ready(self, key: str, now: float) -> None:
        for work in self.state.parked.pop(key, []):
            work(now)

    def store_committed(self, ticket: int, ok: bool, now: float) -> None:
        """A ticketed write ended: go on with what it was for, or decide again from fresh state."""
        entry = self.state.tickets.pop(ticket, None)
        if entry is None:
            return
        done, again = entry
        if ok:
            done()
        elif again is not None:
            again(now)

    def orphans_expired(self, before: AorRecord, gone: list[Binding], now: float) -> None:
        """Bindings of a dead process ran out their lease; this process won the claim to de-register them."""
        self.expiry.orphans_expired(before, gone, now)

    @property
    def waiting(self) -> int:
        """Pieces of work waiting for the store (parked or behind a write)."""
        return sum(map(len, self.state.parked.values())) + len(self.state.tickets)

    # ------------------------------------------------------------------------------------ timers and flows

    def next_deadline(self) -> float | None:
        return self.state.schedule.next_deadline()

    def on_timer(self, now: float) -> None:
        self.expiry.on_timer(now)

    def keep_flow_until(self, conn: int) -> float:
        """A TCP connection that carries a binding stays open until it expires plus 10 s (behaviour §4.3,
        T64)."""
        return self.state.flows.get(conn, 0.0)

    def flow_closed(self, conn: int) -> None:
        self.state.flows.pop(conn, None)


def _parse_error_response(request: Request, exc: ParseError) -> Response:
    """The answer to a request the core could not read (400) or route (416), naming what was wrong."""
    response = make_response(request, exc.status)
    response.reason = f"{response.reason} ({exc.reason})"
    return response
