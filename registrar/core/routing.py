"""Requests from the main registrar to the phones (behaviour §8.4, §8.5, §9): look the binding up with
:mod:`registrar.core.lookup` and send the request over the phone's flow.

A phone's flow is held by the process that took its REGISTER. When that is another process, the request is
handed to it with an ``X-Midreg-Flow`` header (architecture "Networking and flow ownership"); the process
receiving one checks that it comes from a live member before it acts on it.
"""

from __future__ import annotations

from registrar.config import Insertion, Listen, Mode
from registrar.core.lookup import Target, branch_target, lookup, lookup_aor, lookup_by_contact
from registrar.core.policy import aor_from_uri
from registrar.core.register import reply_contact_id
from registrar.core.state import CoreState
from registrar.sip.headers import parse_address
from registrar.sip.message import Request, make_response
from registrar.sip.stack import IncomingRequest
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import URI, SipURI

HANDOFF = "X-Midreg-Flow"  # internal hop: "<sender member id> <contact id>"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, SUBSCRIBE, NOTIFY, REFER, INFO, UPDATE, PRACK"


class Routing:
    """Routes every request that is not a REGISTER, and answers OPTIONS addressed to this process."""

    def __init__(self, state: CoreState) -> None:
        self.state = state

    def addressed_to_us(self, request: Request) -> bool:
        """OPTIONS to our own address, or (mode aor) a qualify ping to an aggregated contact
        (behaviour §9.2)."""
        uri = request.uri
        state = self.state
        if not isinstance(uri, SipURI) or not state.stack.is_local_uri(uri):
            return False
        if state.settings.mode is Mode.AOR:
            return True
        return uri.user is None and reply_contact_id(uri, state.settings) is None

    def options(self, event: IncomingRequest) -> None:
        response = make_response(event.request, 200)
        response.headers.add("Allow", ALLOW)
        response.headers.add("Accept", "application/sdp")
        self.state.stack.respond(event.txn, response)

    def route(self, event: IncomingRequest, now: float) -> None:
        """A request from the main registrar (or any request not for us): fork it to the phone's bindings."""
        state = self.state
        request = event.request
        handoff = request.headers.get(HANDOFF)
        if handoff is not None and self._handed_over(event, handoff, now):
            return
        routes = request.headers.values("route")
        if routes:
            self._loose_route(event, routes, now)
            return
        if state.settings.mode is Mode.AOR:
            result = lookup_aor(request, state.store, now, state.settings)
        else:
            result = lookup(request.uri, state.store, now, state.settings)
        lookups = state.stats.lookups
        lookups[result.outcome] = lookups.get(result.outcome, 0) + 1
        if not result.targets:
            state.stack.respond(event.txn, make_response(request, 404))
            return
        branches: list[tuple[Request | URI | None, Peer]] = [
            b for b in (self._branch_via_owner(request, t) for t in result.targets) if b is not None
        ]
        if not branches:
            state.stack.respond(event.txn, make_response(request, 480))  # only dead TCP flows were left
            return
        state.stack.proxy(event.txn, branches)

    def ack(self, request: Request, now: float) -> None:
        """An ACK for a 2xx travels end to end: by its Route set, else by the contact id it targets."""
        state = self.state
        routes = request.headers.values("route")
        if routes:
            state.stack.forward_stateless(request, self._next_hop(request))
            return
        result = lookup(request.uri, state.store, now, state.settings)
        if result.targets:
            target = result.targets[0]
            request.uri = target.uri
            state.stack.forward_stateless(request, target.peer)

    def _branch_via_owner(self, request: Request, target: Target) -> tuple[Request | URI, Peer] | None:
        """A branch over the phone's flow: direct when this process holds it (or a Path leads there), else
        handed to the process that does. With that process gone, a UDP phone is reached directly at the
        address it registered from; a TCP flow died with it (None: no branch)."""
        state = self.state
        store = state.store
        binding = target.binding
        if binding is None or target.routes or binding.owner is None or store.owns(binding):
            return _branch(request, target)
        address = store.member_address(binding.owner)
        if address is None:
            return None if binding.source.reliable else _branch(request, target)
        hop = Listen.parse(address)
        copy = request.copy()
        copy.uri = target.uri
        copy.headers.add(HANDOFF, f"{store.member_id} {binding.ctid}")
        state.stats.handoffs += 1
        return copy, Peer(hop.transport.value, hop.host, hop.port)

    def _handed_over(self, event: IncomingRequest, value: str, now: float) -> bool:
        """A peer process hands us a request for a flow we hold: send it to the phone over that flow. The
        header counts only from a live member's address; from anywhere else it is dropped and ignored."""
        state = self.state
        store = state.store
        request = event.request
        sender, _, ctid_text = value.partition(" ")
        address = store.member_address(sender)
        hop = Listen.parse(address) if address else None
        if (
            hop is None
            or (hop.host, hop.port) != (event.peer.host, event.peer.port)
            or not ctid_text.isdigit()
        ):
            request.headers.remove(HANDOFF)
            return False
        record = store.find_ctid(int(ctid_text))  # may raise Pending: re-run with the header kept
        request.headers.remove(HANDOFF)
        binding = record.bindings.get(int(ctid_text)) if record is not None else None
        target = branch_target(binding) if binding is not None and binding.valid(now) else None
        if target is None or (binding is not None and not store.owns(binding) and binding.source.reliable):
            state.stack.respond(event.txn, make_response(request, 480))
            return True
        state.stack.proxy(event.txn, [_branch(request, target)])
        return True

    def _loose_route(self, event: IncomingRequest, routes: list[str], now: float) -> None:
        """Pre-routed requests: pop our own Route, forward to the next hop (RFC 3261 §16.4). With Path
        insertion, a request from the main registrar to a phone's Contact goes over that phone's flow."""
        state = self.state
        request = event.request
        top = parse_address(routes[0], "Route").uri
        if len(routes) == 1 and state.settings.insertion is Insertion.PATH and state.stack.is_local_uri(top):
            aor = aor_from_uri(top, state.settings)
            target = lookup_by_contact(aor, request.uri, state.store, now)
            if target is not None:
                request.headers.pop_first_value("route")
                state.stack.proxy(event.txn, [_branch(request, target)])
                return
        state.stack.proxy(event.txn, [(None, self._next_hop(request))])

    def _next_hop(self, request: Request) -> Peer:
        routes = self.state.stack.pop_own_routes(request)
        return peer_for_uri(parse_address(routes[0], "Route").uri if routes else request.uri)


def _branch(request: Request, target: Target) -> tuple[Request | URI, Peer]:
    """A branch for the stack: just the new Request-URI, or a copy carrying the Path's Route set."""
    if not target.routes:
        return target.uri, target.peer
    copy = request.copy()
    copy.uri = target.uri
    for route in reversed(target.routes):
        copy.headers.prepend("Route", route)
    return copy, target.peer
