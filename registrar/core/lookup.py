"""Lookup of requests from the main registrar (SPEC.md §9.1): contact id in the Request-URI → one
binding → the phone's Contact as the new Request-URI, sent over the flow the phone registered from."""

from __future__ import annotations

from dataclasses import dataclass

from registrar.config import Settings
from registrar.core.register import reply_contact_id
from registrar.sip.errors import ParseError
from registrar.sip.headers import parse_address
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import URI, URIError, parse_uri
from registrar.store.base import Store


@dataclass(frozen=True, slots=True)
class LookupResult:
    outcome: str  # "found", "no_id", "unknown", "expired"
    uri: URI | None = None
    target: Peer | None = None


def lookup(request_uri: URI, store: Store, now: float, settings: Settings) -> LookupResult:
    ctid = reply_contact_id(request_uri, settings)
    if ctid is None:
        return LookupResult("no_id")
    record = store.find_ctid(ctid)
    binding = None if record is None else record.bindings.get(ctid)
    if binding is None:
        return LookupResult("unknown")
    if not binding.valid(now):
        return LookupResult("expired")  # [REC] an expired binding is never routed (SPEC §9.1 step 2)
    try:
        uri = parse_uri(binding.contact)
    except URIError:
        return LookupResult("unknown")
    if binding.path:
        try:
            first = parse_address(binding.path[0], "Path").uri
            return LookupResult("found", uri, peer_for_uri(first, binding.source.local))
        except (ParseError, ValueError):
            pass
    return LookupResult("found", uri, binding.source)
