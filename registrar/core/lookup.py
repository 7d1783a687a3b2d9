"""Lookup of requests from the main registrar (behaviour §9).

Modes mirror and contact: the contact id in the Request-URI names exactly one binding. Mode aor: the
Request-URI's user part is the escaped AoR, and every valid contact becomes a parallel branch in q order.
Either way a branch goes to the phone's Contact over the flow it registered from (or its Path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from registrar.config import Settings
from registrar.core.gruu import decode_temp_gruu, instance_id
from registrar.core.policy import RegistrarError, aor_from_uri, canonical_aor
from registrar.core.register import binding_flow_key, reply_contact_id
from registrar.records import Binding
from registrar.sip.errors import ParseError
from registrar.sip.headers import parse_address
from registrar.sip.message import Request
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import URI, SipURI, URIError, parse_uri
from registrar.store.base import Store


@dataclass(frozen=True, slots=True)
class Target:
    """One branch: the phone's Contact, the next hop, and the Route set its Path asks for (behaviour §8.4)."""

    uri: URI
    peer: Peer
    routes: tuple[str, ...] = ()
    binding: Binding | None = None  # the binding it came from (its owner and contact id)


@dataclass(frozen=True, slots=True)
class LookupResult:
    outcome: str  # found, no_id, unknown, expired, method_filtered
    targets: tuple[Target, ...] = ()


def lookup(request_uri: URI, store: Store, now: float, settings: Settings) -> LookupResult:
    """Modes mirror/contact: exactly one binding by contact id, never an expired one (§9.1 [REC])."""
    ctid = reply_contact_id(request_uri, settings)
    if ctid is None:
        return LookupResult("no_id")
    record = store.find_ctid(ctid)
    binding = None if record is None else record.bindings.get(ctid)
    if binding is None:
        return LookupResult("unknown")
    if not binding.valid(now):
        return LookupResult("expired")
    target = branch_target(binding)
    return LookupResult("found", (target,)) if target is not None else LookupResult("unknown")


def lookup_aor(request: Request, store: Store, now: float, settings: Settings) -> LookupResult:
    """Mode aor: every valid contact of the AoR, q order, optionally filtered by method (§9.2); a GRUU
    selects its one instance (§8.6)."""
    uri = request.uri
    temp = decode_temp_gruu(uri, settings) if settings.gruu else None
    pub = settings.gruu and temp is None and isinstance(uri, SipURI) and bool(uri.param("gr"))
    if temp is not None:
        aor: str | None = temp[0]
    elif pub:
        try:
            aor = canonical_aor(uri, settings)  # a public GRUU is the AoR itself plus ;gr
        except RegistrarError:
            aor = None
    else:
        aor = aor_from_uri(uri, settings)
    record = store.load(aor) if aor else None
    if record is None:
        return LookupResult("unknown")
    bindings = record.valid_bindings(now)
    if temp is not None:
        bindings = [b for b in bindings if b.instance == temp[1] and b.call_id == temp[2]]
    elif pub and isinstance(uri, SipURI):
        wanted = uri.param("gr")
        bindings = [b for b in bindings if b.instance and instance_id(b.instance) == wanted]
    if not bindings:
        return LookupResult("expired")
    if settings.method_filtering:
        bindings = [b for b in bindings if b.methods is None or request.method in b.methods]
        if not bindings:
            return LookupResult("method_filtered")
    targets = tuple(t for t in (branch_target(b) for b in bindings) if t is not None)
    return LookupResult("found", targets) if targets else LookupResult("unknown")


def one_flow_per_instance(targets: Sequence[Target]) -> list[Target]:
    """RFC 5626 §5.3: a device registered over several flows (one binding per reg-id) gets a request over
    one of them only, the most recently registered; the caller has already left out flows known dead, so a
    device whose newest flow failed is reached over its other one. Other targets pass unchanged, in order."""
    newest: dict[str, Target] = {}
    for target in targets:
        instance = _flow_instance(target)
        if instance is not None:
            best = newest.get(instance)
            if best is None or _updated(target) > _updated(best):
                newest[instance] = target
    if not newest:
        return list(targets)
    return [t for t in targets if (i := _flow_instance(t)) is None or newest[i] is t]


def _flow_instance(target: Target) -> str | None:
    """The instance id of a target registered as an RFC 5626 flow."""
    key = binding_flow_key(target.binding) if target.binding is not None else None
    return None if key is None else key[0]


def _updated(target: Target) -> float:
    return target.binding.updated_at if target.binding is not None else 0.0


def branch_target(binding: Binding) -> Target | None:
    """The phone's Contact as Request-URI; next hop its first Path URI (with the Path as Route set), else
    the flow it registered from (behaviour §8.4, §8.5)."""
    try:
        uri = parse_uri(binding.contact)
    except URIError:
        return None
    if binding.path:
        try:
            first = parse_address(binding.path[0], "Path").uri
            return Target(uri, peer_for_uri(first, binding.source.local), tuple(binding.path), binding)
        except (ParseError, ValueError):
            pass
    return Target(uri, binding.source, binding=binding)


def lookup_by_contact(aor: str | None, request_uri: URI, store: Store, now: float) -> Target | None:
    """Path insertion: a request routed back through us targets the phone's own Contact
    (behaviour §8.2 [REC])."""
    record = store.load(aor) if aor else None
    if record is None:
        return None
    for binding in record.valid_bindings(now):
        try:
            if parse_uri(binding.contact).equals(request_uri):
                return branch_target(binding)
        except URIError:
            continue
    return None
