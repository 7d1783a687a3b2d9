"""Requests from the main registrar to the phones (behaviour §8.4, §8.5, §9): look the binding up with
:mod:`registrar.core.lookup` and send the request over the phone's flow.

A phone's flow is held by the process that took its REGISTER. When that is another process, the request is
handed to it with an ``X-Midreg-Flow`` header (architecture "Networking and flow ownership"); the process
receiving one checks that it comes from a live member before it acts on it.
"""

from __future__ import annotations

import logging

from registrar.config import Insertion, Listen, Mode
from registrar.core.handoff import HEADER as HANDOFF
from registrar.core.handoff import sign, unsigned, verify
from registrar.core.lookup import (
    Target,
    branch_target,
    lookup,
    lookup_aor,
    lookup_by_contact,
    one_flow_per_instance,
)
from registrar.core.policy import aor_from_uri
from registrar.core.register import reply_contact_id
from registrar.core.state import CoreState
from registrar.sip.errors import ParseError
from registrar.sip.headers import parse_address
from registrar.sip.message import Request, make_response
from registrar.sip.proxy import flow_of
from registrar.sip.stack import IncomingRequest
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import URI, SipURI

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, SUBSCRIBE, NOTIFY, REFER, INFO, UPDATE, PRACK"


log = logging.getLogger("midregistrar.core")


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
        branches: list[tuple[Request | URI | None, Peer]] = []
        flows: list[bool] = []
        live = [
            t for t in result.targets if not self._flow_closed(t)
        ]  # a gone connection: wait for a REGISTER
        for target in one_flow_per_instance(live):
            branch = self._branch_via_owner(request, target, now)
            if branch is not None:
                branches.append(branch)
                flows.append(branch[1] is target.peer and over_flow(target))  # not a hand-off
        if not branches:
            state.stack.respond(event.txn, make_response(request, 480))  # only dead flows were left
            return
        state.stack.proxy(event.txn, branches, flows=flows)

    def ack(self, request: Request, peer: Peer, now: float) -> None:
        """An ACK for a 2xx travels end to end: by its Route set, else by the contact id it targets.
        ParseError when its Route does not parse or names no SIP URI."""
        state = self.state
        routes = request.headers.values("route")
        if routes:
            flow = self._recorded_flow(routes[0])
            if flow is not None:
                state.stack.pop_own_routes(request)  # ours: one entry, or two when double record-routed
                hop = self._next_hop(request) if _from_flow(flow, peer) else flow
                state.stack.forward_stateless(request, hop)
                return
            state.stack.forward_stateless(request, self._next_hop(request))
            return
        result = lookup(request.uri, state.store, now, state.settings)
        if result.targets:
            target = result.targets[0]
            request.uri = target.uri
            state.stack.forward_stateless(request, target.peer)

    def _branch_via_owner(
        self, request: Request, target: Target, now: float
    ) -> tuple[Request | URI, Peer] | None:
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
        copy.headers.add(HANDOFF, sign(state.handoff_keys, store.member_id, binding.ctid, copy, now))
        state.stats.handoffs += 1
        return copy, Peer(hop.transport.value, hop.host, hop.port)

    def _handed_over(self, event: IncomingRequest, value: str, now: float) -> bool:
        """A peer process hands us a request for a flow we hold: send it to the phone over that flow. With
        hand-off keys the header counts only when its MAC verifies, it is fresh and names a live member
        (:mod:`registrar.core.handoff`); without, only from a live member's address. Otherwise it is
        dropped, counted, and the request is routed as if it had none."""
        state = self.state
        store = state.store
        request = event.request
        keys = state.handoff_keys
        handoff = (
            verify(keys, value, request, now, store.clock_offset) if keys is not None else unsigned(value)
        )
        address = store.member_address(handoff.sender) if handoff is not None else None
        trusted = address is not None
        if trusted and keys is None:
            hop = Listen.parse(address or "")
            trusted = (hop.host, hop.port) == (event.peer.host, event.peer.port)
        if handoff is None or not trusted:
            log.debug(
                "hand-off refused (%s): %s", "not verified" if handoff is None else "unknown sender", value
            )
            request.headers.remove(HANDOFF)
            state.stats.handoffs_refused += 1
            return False
        record = store.find_ctid(handoff.ctid)  # may raise Pending: re-run with the header kept
        request.headers.remove(HANDOFF)
        binding = record.bindings.get(handoff.ctid) if record is not None else None
        target = branch_target(binding) if binding is not None and binding.valid(now) else None
        if (
            target is None
            or self._flow_closed(target)
            or (binding is not None and not store.owns(binding) and binding.source.reliable)
        ):
            state.stack.respond(event.txn, make_response(request, 480))
            return True
        state.stack.proxy(event.txn, [_branch(request, target)], flows=[over_flow(target)])
        return True

    def _loose_route(self, event: IncomingRequest, routes: list[str], now: float) -> None:
        """Pre-routed requests: pop our own Route, forward to the next hop (RFC 3261 §16.4). With Path
        insertion, a request from the main registrar to a phone's Contact goes over that phone's flow."""
        state = self.state
        request = event.request
        flow = self._recorded_flow(routes[0])
        if flow is not None:  # an in-dialog request of a dialog we record-routed over a phone's flow
            state.stack.pop_own_routes(request)  # ours: one entry, or two when double record-routed
            hop = self._next_hop(request) if _from_flow(flow, event.peer) else flow
            state.stack.proxy(event.txn, [(None, hop)])
            return
        top = parse_address(routes[0], "Route").uri
        if len(routes) == 1 and state.settings.insertion is Insertion.PATH and state.stack.is_local_uri(top):
            aor = aor_from_uri(top, state.settings)
            target = lookup_by_contact(aor, request.uri, state.store, now)
            outcome = "unknown" if target is None else "found"  # a lookup by Contact: count it like one
            state.stats.lookups[outcome] = state.stats.lookups.get(outcome, 0) + 1
            if target is not None:
                request.headers.pop_first_value("route")
                state.stack.proxy(event.txn, [_branch(request, target)])
                return
        state.stack.proxy(event.txn, [(None, self._next_hop(request))])

    def _flow_closed(self, target: Target) -> bool:
        """The binding's flow is a connection this process held and saw close (RFC 5626 §5.2: a failed
        flow): nothing can reach the phone over it, and connecting to its source port would be refused."""
        binding = target.binding
        if binding is None or target.routes:
            return False
        conn = binding.source.conn
        return (
            conn is not None
            and binding.source.reliable
            and self.state.store.owns(binding)
            and conn not in self.state.flows
        )

    def _recorded_flow(self, route: str) -> Peer | None:
        """The phone's flow a Route names when it is our own Record-Route with a flow token."""
        try:
            uri = parse_address(route, "Route").uri
        except ParseError:
            return None
        if not isinstance(uri, SipURI) or not self.state.stack.is_local_uri(uri):
            return None
        return flow_of(uri.user)

    def _next_hop(self, request: Request) -> Peer:
        """Where a pre-routed request goes next: its first Route that is not ours, else its Request-URI.
        ParseError (416) when that is not a SIP URI: nothing tells where a ``tel:`` or a mangled scheme is."""
        routes = self.state.stack.pop_own_routes(request)
        uri = parse_address(routes[0], "Route").uri if routes else request.uri
        if not isinstance(uri, SipURI):
            raise ParseError(f"next hop {str(uri)[:40]!r} is not a SIP URI", status=416)
        return peer_for_uri(uri)


def over_flow(target: Target) -> bool:
    """A branch reaches the phone only over its own flow: a connection the phone opened, or an address
    other than the one its Contact names (NAT). Such dialogs are record-routed (RFC 5626 §5.3): the other
    end could not reach the phone at its Contact."""
    binding = target.binding
    if binding is None or target.routes:
        return False  # no flow of ours (a Path leads the way)
    source = binding.source
    if source.reliable:
        return True
    uri = target.uri
    if not isinstance(uri, SipURI):
        return True
    return uri.host.strip("[]") != source.host or (uri.port or 5060) != source.port


def _from_flow(flow: Peer, peer: Peer) -> bool:
    """The request came from the phone over that flow (it goes on toward the other end), not toward it."""
    return (flow.transport, flow.host, flow.port) == (peer.transport, peer.host, peer.port)


def _branch(request: Request, target: Target) -> tuple[Request | URI, Peer]:
    """A branch for the stack: just the new Request-URI, or a copy carrying the Path's Route set."""
    if not target.routes:
        return target.uri, target.peer
    copy = request.copy()
    copy.uri = target.uri
    for route in reversed(target.routes):
        copy.headers.prepend("Route", route)
    return copy, target.peer
