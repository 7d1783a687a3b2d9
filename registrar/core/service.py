"""The mid-registrar pipeline over the sans-IO stack (SPEC.md §1: REGISTER → save → relay or answer;
request from the main registrar → lookup → forward).

:class:`MidRegistrar` reacts to the stack's events with the pure decisions of :mod:`registrar.core.register`
and :mod:`registrar.core.lookup`, reads and commits through the store, and gives the stack its commands.
It never touches a socket; the shell drains the stack after each call.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from registrar.config import Mode, Settings
from registrar.core import register as reg
from registrar.core.lookup import LookupResult, lookup
from registrar.core.policy import RegistrarError
from registrar.sip.errors import ParseError
from registrar.sip.headers import parse_address
from registrar.sip.message import Request, Response, make_response
from registrar.sip.proxy import ResponseContext
from registrar.sip.stack import ClientResult, Event, IncomingRequest, ProxyFinal, Stack, StrayAck
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import URI, SipURI, parse_uri
from registrar.store.base import Store

log = logging.getLogger("midregistrar.core")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, SUBSCRIBE, NOTIFY, REFER, INFO, UPDATE, PRACK"


@dataclass
class CoreStats:
    registers_relayed: int = 0
    registers_answered: int = 0
    register_errors: int = 0
    lookups: dict[str, int] = field(default_factory=dict)


class MidRegistrar:
    """One process's mid-registrar logic."""

    def __init__(
        self, settings: Settings, stack: Stack, store: Store, rng: random.Random | None = None
    ) -> None:
        if settings.main_registrar is None:
            raise ValueError("a main registrar URI is required")
        self.settings = settings
        self.stack = stack
        self.store = store
        self.rng = rng or random.Random()
        self.main_uri: URI = parse_uri(settings.main_registrar)
        self.main_peer = peer_for_uri(self.main_uri)
        self.stats = CoreStats()
        self._pending: dict[int, reg.PendingRegister] = {}

    def handle(self, event: Event, now: float) -> None:
        if isinstance(event, IncomingRequest):
            self._request(event, now)
        elif isinstance(event, ProxyFinal):
            self._final(event.ctx, event, now)
        elif isinstance(event, StrayAck):
            self._ack(event.request, now)
        elif isinstance(event, ClientResult):
            log.debug("originated %s got %s", event.request.method, event.response.status)

    # ------------------------------------------------------------------------------------ requests

    def _request(self, event: IncomingRequest, now: float) -> None:
        request = event.request
        try:
            if request.method == "REGISTER":
                self._register(event, now)
            elif request.method == "OPTIONS" and self._addressed_to_us(request):
                self._options(event)
            else:
                self._route(event, now)
        except ParseError as exc:
            self.stack.respond(event.txn, _bad_request(request, exc.reason))

    def _addressed_to_us(self, request: Request) -> bool:
        uri = request.uri
        if not isinstance(uri, SipURI) or not self.stack.is_local_uri(uri):
            return False
        return uri.user is None and reg.reply_contact_id(uri, self.settings) is None

    def _options(self, event: IncomingRequest) -> None:
        response = make_response(event.request, 200)
        response.headers.add("Allow", ALLOW)
        response.headers.add("Accept", "application/sdp")
        self.stack.respond(event.txn, response)

    def _register(self, event: IncomingRequest, now: float) -> None:
        settings = self.settings
        request = event.request
        try:
            view = reg.inspect(request, event.peer, settings)
            record = self.store.load(view.aor)
            if not view.contacts:
                # A binding query is answered here with the current bindings (SPEC §3.1 item 6 [REC]).
                self.stats.registers_answered += 1
                self.stack.respond(event.txn, reg.binding_reply(request, record, now, settings))
                return
            pending = reg.plan(view, record, now, settings, self.store.new_contact_id, self.rng)
        except RegistrarError as err:
            self.stats.register_errors += 1
            log.debug("REGISTER refused with %s: %s", err.status, err.text)
            self.stack.respond(event.txn, reg.error_reply(request, err, settings))
            return
        if not view.star and not pending.planned:
            # every contact was a retransmission of the last one we saw: answer from state (SPEC §3.4)
            self.stats.registers_answered += 1
            self.stack.respond(event.txn, reg.binding_reply(request, record, now, settings))
            return
        if settings.mode is not Mode.MIRROR:
            log.debug("mode %s not built yet: relaying like mirror", settings.mode.value)
        local = self.stack.local_for(self.main_peer)
        relayed = reg.relayed_request(pending, self.main_uri, local.hostport, settings)
        ctx = self.stack.proxy(event.txn, [(relayed, self.main_peer)], hold_final=True)
        self._pending[id(ctx)] = pending
        self.stats.registers_relayed += 1

    def _final(self, ctx: ResponseContext, event: ProxyFinal, now: float) -> None:
        pending = self._pending.pop(id(ctx), None)
        response = event.response
        if pending is None or not 200 <= response.status < 300:
            # 401/407/403/423/5xx/408 reach the UA unchanged; nothing local changes (SPEC §7).
            self.stack.finish(ctx, response)
            return
        aor = pending.view.aor
        record = self.store.load(aor)
        updated = reg.apply_2xx(pending, record, response, now, self.settings)
        if updated is None:
            self.store.delete(aor)
        else:
            self.store.commit(updated)
        self.stack.finish(ctx, reg.rewrite_reply(response, updated, now, self.settings))

    # ------------------------------------------------------------------------------------ routing

    def _route(self, event: IncomingRequest, now: float) -> None:
        request = event.request
        routes = request.headers.values("route")
        if routes:
            self._loose_route(event, routes)
            return
        result = lookup(request.uri, self.store, now, self.settings)
        self.stats.lookups[result.outcome] = self.stats.lookups.get(result.outcome, 0) + 1
        if result.target is None:
            self.stack.respond(event.txn, make_response(request, 404))
            return
        self.stack.proxy(event.txn, [_branch(result)])

    def _loose_route(self, event: IncomingRequest, routes: list[str]) -> None:
        """Pre-routed (in-dialog) requests: pop our own Route, forward to the next hop (RFC 3261 §16.4)."""
        self.stack.proxy(event.txn, [(None, self._next_hop(event.request, routes))])

    def _next_hop(self, request: Request, routes: list[str]) -> Peer:
        if self.stack.is_local_uri(parse_address(routes[0], "Route").uri):
            request.headers.pop_first_value("route")
            routes = routes[1:]
        return peer_for_uri(parse_address(routes[0], "Route").uri if routes else request.uri)

    def _ack(self, request: Request, now: float) -> None:
        """An ACK for a 2xx travels end to end: by its Route set, else by the contact id it targets."""
        routes = request.headers.values("route")
        if routes:
            self.stack.forward_stateless(request, self._next_hop(request, routes))
            return
        result = lookup(request.uri, self.store, now, self.settings)
        if result.target is not None:
            uri, peer = _branch(result)
            request.uri = uri
            self.stack.forward_stateless(request, peer)


def _branch(result: LookupResult) -> tuple[URI, Peer]:
    assert result.target is not None and result.uri is not None
    return result.uri, result.target


def _bad_request(request: Request, reason: str) -> Response:
    response = make_response(request, 400)
    response.reason = f"Bad Request ({reason})"
    return response
