"""REGISTER handling as pure functions (behaviour §3, §4, §5.1, §5.3): validate, plan each contact's id and
lifetimes, rewrite the REGISTER for the main registrar, apply its 2xx. The replies to the phone are
:mod:`registrar.core.reply`. Nothing here awaits, sends or reads a clock: ``now`` and ids come in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from registrar.config import ContactIdInsertion, Insertion, Mode, PathMode, Settings
from registrar.core.gruu import instance_id
from registrar.core.policy import (
    MAX_CONTACT_LEN,
    Lifetimes,
    RegistrarError,
    canonical_aor,
    escape_aor,
    lifetimes,
)
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.errors import ParseError
from registrar.sip.headers import Contact, is_digits, parse_address
from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from registrar.sip.uri import URI, SipURI, URIError, parse_uri


@dataclass(slots=True)
class RegisterView:
    """A validated REGISTER: its AoR, contacts and the Expires header (behaviour §3.1)."""

    request: Request
    aor: str
    contacts: list[Contact]
    star: bool
    expires_header: int | None
    source: Peer
    paths: list[str] = field(default_factory=list)
    # RFC 5626 §6: its contacts with +sip.instance and reg-id are bindings keyed by (instance, reg-id), one
    # per flow, rather than by Contact URI.
    outbound: bool = False


@dataclass(slots=True)
class PlannedContact:
    ctid: int
    contact: Contact
    life: Lifetimes
    known: bool


@dataclass(slots=True)
class PendingRegister:
    """What a relayed REGISTER changes once the main registrar answers 2xx."""

    view: RegisterView
    planned: list[PlannedContact]
    ruri: str = ""  # the Request-URI it was relayed with (behaviour §2.2 ru)
    hop: str | None = None  # the outbound proxy it went through (behaviour §2.2 hop)
    aggregated: str | None = None  # mode aor: the aggregated contact it was relayed with
    aggregated_owner: str | None = None  # and the member whose address that contact carries
    retried_423: bool = False


def inspect(request: Request, source: Peer, settings: Settings) -> RegisterView:
    """Validate a REGISTER (behaviour §3.1 items 2–4); raise :class:`RegistrarError` with the reply to
    send."""
    try:
        to = request.to
        request.call_id  # noqa: B018
        request.cseq  # noqa: B018
    except ParseError as exc:
        raise RegistrarError(400, f"Bad header: {exc.reason}") from None
    expires_text = request.headers.get("expires")
    expires_header: int | None = None
    if expires_text is not None:
        if not is_digits(expires_text):
            raise RegistrarError(400, "Expires parse error")
        expires_header = int(expires_text)
    try:
        contacts = request.contacts
    except ParseError as exc:
        raise RegistrarError(400, f"Bad Contact: {exc.reason}") from None
    aor = canonical_aor(to.uri, settings)
    star = any(c.star for c in contacts)
    if star:
        if len(contacts) > 1:
            raise RegistrarError(400, "* used in contact and more than 1 contact")
        if expires_header != 0:
            raise RegistrarError(400, "* used in contact and expires is not zero")
    for contact in contacts:
        if not contact.star and len(str(contact.uri)) > MAX_CONTACT_LEN:
            raise RegistrarError(400, "Contact URI too long")
    paths = request.headers.values("path")
    if paths:
        check_path(request, paths, settings)
    outbound = any(flow_key(c) for c in contacts) and first_hop_outbound(request, paths)
    return RegisterView(request, aor, contacts, star, expires_header, source, paths, outbound)


def flow_key(contact: Contact) -> tuple[str, str] | None:
    """(instance id, reg-id) of a contact registering an RFC 5626 flow, or None."""
    return _flow_id(contact.instance, contact.reg_id)


def binding_flow_key(binding: Binding) -> tuple[str, str] | None:
    """(instance id, reg-id) of a binding registered as an RFC 5626 flow (reg-id is only kept then)."""
    return _flow_id(binding.instance, binding.reg_id)


def _flow_id(instance: str | None, reg_id: str | None) -> tuple[str, str] | None:
    """Instances compare without their ``<>`` and case-insensitively (a URN)."""
    if not instance or not reg_id:
        return None
    return instance_id(instance).lower(), reg_id


def first_hop_outbound(request: Request, paths: list[str]) -> bool:
    """Whether RFC 5626 applies to this REGISTER (§6): we are the phone's first hop (one Via), or the edge
    proxy before us did outbound and said so with ``;ob`` on its Path URI. Otherwise reg-id is ignored."""
    if len(request.vias) == 1:
        return True
    if not paths:
        return False
    try:
        first = parse_address(paths[0], "Path").uri
    except ParseError:
        return False
    return isinstance(first, SipURI) and first.has_param("ob")


def wants_outbound(view: RegisterView) -> bool:
    """Whether the answer carries ``Require: outbound`` (RFC 5626 §6): outbound was applied to a phone that
    supports it; the phone then knows its flows are kept apart and keeps them alive."""
    if not view.outbound:
        return False
    headers = view.request.headers
    return has_option_tag([*headers.values("supported"), *headers.values("require")], "outbound")


def has_option_tag(values: list[str], tag: str) -> bool:
    """Whether Supported/Require values (already split on commas by ``Headers.values``) name ``tag``."""
    return any(v.lower() == tag for v in values)


def supports_path(request: Request) -> bool:
    return has_option_tag(request.headers.values("supported"), "path")


def check_path(request: Request, paths: list[str], settings: Settings) -> None:
    """Path from the phone side (behaviour §8.4): syntax, a loose-routing first hop, path-strict's 420."""
    try:
        first = parse_address(paths[0], "Path")
        for value in paths[1:]:
            parse_address(value, "Path")
    except ParseError as exc:
        raise RegistrarError(400, f"Bad Path: {exc.reason}") from None
    if not isinstance(first.uri, SipURI) or not first.uri.has_param("lr"):
        raise RegistrarError(400, "Path: first hop is not a loose router (;lr)")
    if settings.path_mode is PathMode.STRICT and not supports_path(request):
        raise RegistrarError(420, "Path not supported by the UA")


def find_binding(record: AorRecord | None, contact: Contact, outbound: bool = False) -> Binding | None:
    """Match by RFC 3261 URI comparison (usrloc matching_mode 0, behaviour §3.4); with RFC 5626 applied, an
    outbound contact matches by instance and reg-id alone: a phone whose flow moved (a new connection, a new
    NAT binding, a new address) replaces its binding for that flow instead of adding one (§6)."""
    if record is None:
        return None
    key = flow_key(contact) if outbound else None
    if key is not None:
        for binding in record.bindings.values():
            if binding.reg_id is not None and binding_flow_key(binding) == key:
                return binding
        return None
    uri = contact.uri
    text = str(uri)
    for binding in record.bindings.values():
        if binding.contact == text:
            return binding
        try:
            stored = parse_uri(binding.contact)
        except URIError:
            continue
        if stored.equals(uri):
            return binding
    return None


def check_cseq(view: RegisterView, binding: Binding | None, now: float, settings: Settings) -> bool:
    """CSeq rules (behaviour §3.4): True when the contact is a retransmission to skip; 400 when out of
    order."""
    return repeated_cseq(view.request.call_id, view.request.cseq.seq, binding, now, settings)


def repeated_cseq(call_id: str, seq: int, binding: Binding | None, now: float, settings: Settings) -> bool:
    """:func:`check_cseq` on the two fields it reads (the refresh templates have no parsed request)."""
    if binding is None or binding.call_id != call_id:
        return False
    n = seq + (1 if settings.allow_dup_cseq else 0)
    if n > binding.cseq:
        return False
    if n == binding.cseq and now - binding.updated_at < settings.cseq_delay:
        return True
    raise RegistrarError(400, "Invalid CSeq number")


def plan(
    view: RegisterView,
    record: AorRecord | None,
    now: float,
    settings: Settings,
    new_id: Callable[[], int],
    rng: random.Random | None = None,
) -> PendingRegister:
    """Decide each contact's id and lifetimes, re-using the id of a known binding (behaviour §4.2)."""
    planned: list[PlannedContact] = []
    if view.star:
        return PendingRegister(view, planned)  # relayed unchanged (behaviour §3.1 item 5)
    for contact in view.contacts:
        binding = find_binding(record, contact, view.outbound)
        if check_cseq(view, binding, now, settings):
            continue
        life = lifetimes(contact, view.expires_header, settings, rng)
        ctid = binding.ctid if binding is not None else new_id()
        planned.append(PlannedContact(ctid, contact, life, binding is not None))
    return PendingRegister(view, planned)


def rewritten_contact(pc: PlannedContact, hostport: str, settings: Settings) -> str:
    """The Contact the main registrar sees: it points back at us and carries the contact id
    (behaviour §4.2)."""
    extra = settings.extra_contact_params
    if settings.contact_id_insertion is ContactIdInsertion.CT_USERNAME:
        uri = f"sip:{pc.ctid}@{hostport}{extra}"
    else:
        user = pc.contact.uri.user if isinstance(pc.contact.uri, SipURI) else None
        userinfo = f"{user}@" if user else ""
        uri = f"sip:{userinfo}{hostport};{settings.contact_id_param}={pc.ctid}{extra}"
    return f"<{uri}>;expires={pc.life.outgoing}"


def kept_contact(pc: PlannedContact) -> str:
    """Path insertion: the phone's own Contact, with the outgoing lifetime as its expires (behaviour §8.2)."""
    address = pc.contact.address
    assert address is not None
    return str(address.without_params("expires").with_param("expires", str(pc.life.outgoing)))


def path_uri(aor: str, hostport: str, settings: Settings) -> str:
    """Our Path entry: a loose route whose user part names the AoR, so a request routed back through us
    finds its binding without a scan."""
    return f"sip:{escape_aor(aor, settings)}@{hostport};lr"


def relayed_request(pending: PendingRegister, main: URI, hostport: str, settings: Settings) -> Request:
    """The REGISTER sent to the main registrar in modes mirror and contact: new R-URI, rewritten contacts,
    no Path (behaviour §3.1, §4.2, §5.1)."""
    out = pending.view.request.copy()
    out.uri = main
    pending.ruri = str(main)
    out.headers.remove("path")
    if pending.view.star:
        return out
    out.headers.remove("contact")
    for pc in pending.planned:
        if settings.insertion is Insertion.PATH:
            out.headers.add("Contact", kept_contact(pc))
        else:
            out.headers.add("Contact", rewritten_contact(pc, hostport, settings))
    if settings.insertion is Insertion.PATH:
        # RFC 3327: we stay on the path of requests to these contacts; the main registrar must know Path.
        out.headers.add("Path", f"<{path_uri(pending.view.aor, hostport, settings)}>")
        if not supports_path(out):
            out.headers.add("Supported", "path")
    if settings.mode is not Mode.MIRROR and pending.view.expires_header is not None:
        # The Expires header takes the outgoing value of the first contact whose value changes (§5.1).
        for pc in pending.planned:
            if pc.life.outgoing != pc.life.requested:
                out.headers.set("Expires", str(pc.life.outgoing))
                break
    return out


def reply_contact_id(uri: URI, settings: Settings) -> int | None:
    """The contact id a URI from the main registrar carries, if any (behaviour §8.1)."""
    if not isinstance(uri, SipURI):
        return None
    if settings.contact_id_insertion is ContactIdInsertion.CT_USERNAME:
        text = uri.user
    else:
        text = uri.param(settings.contact_id_param)
    if not text or not is_digits(text) or len(text) > 20:
        return None
    return int(text)


def granted_expires(
    reply: Response, settings: Settings, planned: list[PlannedContact] | None = None
) -> dict[int, tuple[int, str]]:
    """Contact id → (lifetime granted, our contact URI as echoed) in a main registrar's 2xx (behaviour §4.3).

    With Path insertion the main registrar holds the phone's own contacts: they are matched by URI."""
    header = reply.headers.get("expires")
    header_expires = int(header) if header and is_digits(header) else None
    granted: dict[int, tuple[int, str]] = {}
    for contact in reply_contacts(reply):
        if contact.star:
            continue
        if settings.insertion is Insertion.PATH:
            ctid = next((pc.ctid for pc in planned or [] if pc.contact.uri.equals(contact.uri)), None)
        else:
            ctid = reply_contact_id(contact.uri, settings)
        if ctid is None:
            continue  # a foreign contact (#1516): tolerated, ignored
        value = contact.expires
        if value and is_digits(value):
            granted[ctid] = (int(value), str(contact.uri))
        elif header_expires is not None:
            granted[ctid] = (header_expires, str(contact.uri))
        else:
            granted[ctid] = (settings.default_expires, str(contact.uri))
    return granted


def main_meta(pending: PendingRegister, old: MainMeta | None) -> MainMeta:
    """From/To/R-URI of the last relayed REGISTER, kept to build De-REGISTERs (behaviour §2.2 F, T, ru)."""
    request = pending.view.request
    from_uri, to_uri = str(request.from_.uri), str(request.to.uri)
    if old is None:
        return MainMeta(from_uri, to_uri, pending.ruri, pending.hop)
    return replace(old, from_uri=from_uri, to_uri=to_uri, ruri=pending.ruri, hop=pending.hop)


def apply_2xx(
    pending: PendingRegister, record: AorRecord | None, reply: Response, now: float, settings: Settings
) -> tuple[AorRecord | None, list[Binding]]:
    """Update the AoR from the main registrar's 2xx in modes mirror and contact (behaviour §4.3 [REC], §5.3).

    Returns the new record (None when nothing is left) and the bindings evicted to respect max_contacts
    with force-registration (mode contact sends them a De-REGISTER).
    """
    view = pending.view
    if view.star:
        return None, []
    granted = granted_expires(reply, settings, pending.planned)
    new = record.copy() if record is not None else AorRecord(view.aor)
    new.meta = main_meta(pending, new.meta)
    request = view.request
    touched: set[int] = set()
    for pc in pending.planned:
        hit = granted.get(pc.ctid)
        e = pc.life.local
        if e == 0 or hit is None or hit[0] == 0:
            new.bindings.pop(pc.ctid, None)  # de-registered, or main no longer lists it: no De-REGISTER
            continue
        e_out, echoed = hit
        e = min(e, e_out)
        old = new.bindings.get(pc.ctid)
        same_call = old is not None and old.relayed_call_id == request.call_id
        new.bindings[pc.ctid] = confirmed_binding(
            pc,
            view,
            now,
            e,
            e_out,
            main_contact=echoed,
            relayed_call_id=request.call_id,
            relayed_cseq=max(request.cseq.seq, old.relayed_cseq if old and same_call else 0),
        )
        touched.add(pc.ctid)
    evicted = enforce_max_contacts(new, touched, now, settings)
    return (new if new.bindings else None), evicted


def confirmed_binding(
    pc: PlannedContact, view: RegisterView, now: float, e: int, e_out: int | None, **relay: object
) -> Binding:
    """A binding as the main registrar's 2xx confirmed it: lifetime ``e`` here, ``e_out`` at main."""
    request = view.request
    return Binding(
        ctid=pc.ctid,
        contact=str(pc.contact.uri),
        expires_at=now + e,
        source=view.source,
        call_id=request.call_id,
        cseq=request.cseq.seq,
        q=pc.contact.q,
        path=list(view.paths),
        instance=pc.contact.instance,
        reg_id=pc.contact.reg_id if view.outbound and flow_key(pc.contact) else None,
        methods=_contact_methods(pc.contact) or _allow(request),
        user_agent=request.headers.get("user-agent"),
        updated_at=now,
        local_expires=e,
        main_expires=e_out,
        relayed_at=now,
        **relay,  # type: ignore[arg-type]
    )


def enforce_max_contacts(record: AorRecord, keep: set[int], now: float, settings: Settings) -> list[Binding]:
    """With force-registration, evict the oldest other valid contacts beyond max_contacts
    (behaviour §10.3)."""
    limit = settings.max_contacts
    valid = [b for b in record.bindings.values() if b.valid(now)]
    if not limit or len(valid) <= limit:
        return []
    victims = sorted((b for b in valid if b.ctid not in keep), key=lambda b: b.updated_at)
    evicted = victims[: len(valid) - limit]
    for b in evicted:
        del record.bindings[b.ctid]
    return evicted


def check_max_contacts(
    pending: PendingRegister, record: AorRecord | None, now: float, settings: Settings
) -> None:
    """[REC] decided before relaying: too many contacts → 503 unless force-registration
    (behaviour §10.3, T35)."""
    limit = settings.max_contacts
    if not limit or settings.force_registration:
        return
    valid = {b.ctid for b in record.valid_bindings(now)} if record is not None else set()
    for pc in pending.planned:
        if pc.life.local == 0:
            valid.discard(pc.ctid)
        else:
            valid.add(pc.ctid)
    if len(valid) > limit:
        raise RegistrarError(503, "Too many registered contacts")


def same_flow(a: Peer, b: Peer) -> bool:
    """Same transport, source address and (for TCP) connection: a refresh that may be absorbed ([REC] §11)."""
    return a.transport == b.transport and a.host == b.host and a.port == b.port and a.conn == b.conn


def reply_contacts(reply: Response) -> list[Contact]:
    """The Contacts a main registrar's 2xx lists; none when they do not parse, as if it listed none."""
    try:
        return reply.contacts
    except ParseError:
        return []


def _allow(request: Request) -> list[str] | None:
    values = request.headers.values("allow")
    return [v.upper() for v in values] if values else None


def _contact_methods(contact: Contact) -> list[str] | None:
    value = contact.param("methods")
    if not value:
        return None
    return [m.strip().upper() for m in value.strip('"').split(",") if m.strip()]
