"""Absorb or relay: the throttling decisions of modes contact (behaviour §5) and aor (behaviour §6), with the
safe-absorption rules of behaviour §11 [REC], plus mode aor's aggregated contact and its 2xx processing.

Pure functions: a decision takes the request, the AoR as stored and ``now`` and returns what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from registrar.config import Settings
from registrar.core.policy import escape_aor
from registrar.core.register import (
    PendingRegister,
    confirmed_binding,
    enforce_max_contacts,
    main_meta,
    reply_contacts,
    same_flow,
)
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.headers import is_digits
from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer, ip_reference
from registrar.sip.uri import URI, SipURI, parse_uri


@dataclass(slots=True)
class Decision:
    """``relay`` with the reason, or absorb with the record to commit."""

    relay: bool
    reason: str
    record: AorRecord | None = None
    evicted: list[Binding] = field(default_factory=list)


def _relay(reason: str) -> Decision:
    return Decision(True, reason)


# ------------------------------------------------------------------------------------------- mode contact


def decide_contact(
    pending: PendingRegister, record: AorRecord | None, now: float, me: str | None = None
) -> Decision:
    """Mode contact (behaviour §5.2): absorb only when every contact is a known, unchanged refresh inside the
    window.

    ``me`` (given with Path insertion) is this process's member id: a refresh of a binding whose flow
    another process held is relayed once, so that the Path the main registrar keeps for the phone names
    this process from then on, not a process that may be gone."""
    view = pending.view
    if record is None or not record.bindings:
        return _relay("AoR unknown")
    request = view.request
    updated = record.copy()
    for pc in pending.planned:
        e = pc.life.local
        if e == 0:
            return _relay("de-registration")
        binding = updated.bindings.get(pc.ctid) if pc.known else None
        reason = refresh_refusal(binding, e, view.source, request.call_id, me, now)
        if reason is not None:
            return _relay(reason)
        assert binding is not None  # no refusal: a known, valid binding
        updated.bindings[pc.ctid] = refreshed(
            binding, request.cseq.seq, pc.contact.q, e, view.paths, request.headers.get("user-agent"), now
        )
    return Decision(False, "refresh inside the window", updated)


def refresh_refusal(
    binding: Binding | None, e: int, source: Peer, call_id: str, me: str | None, now: float
) -> str | None:
    """Why a refresh of ``binding`` asking for ``e`` seconds must be relayed in mode contact (behaviour
    §5.2, §11 [REC]), or None when it may be absorbed. Shared by the full pipeline and the refresh
    templates of :mod:`registrar.core.refresh`."""
    if binding is None or not binding.valid(now):
        return "new contact"
    if binding.relayed_at is None or binding.main_expires is None:
        return "no relay state"
    if me is not None and binding.owner is not None and binding.owner != me:
        return "flow moved to this process"
    if not same_flow(binding.source, source):
        return "source address, transport or connection changed"
    if binding.call_id != call_id:
        return "Call-ID changed"
    if now - binding.relayed_at >= binding.main_expires - e:
        return "main registrar's copy is due"
    return None


def refreshed(
    binding: Binding,
    cseq: int,
    q: float | None,
    e: int,
    paths: Sequence[str],
    user_agent: str | None,
    now: float,
    **more: object,
) -> Binding:
    """An absorbed refresh: new local expiry and per-request fields; relay state untouched (§5.2 step 5)."""
    relayed_cseq = binding.relayed_cseq
    if binding.call_id == binding.relayed_call_id:
        relayed_cseq = max(relayed_cseq, cseq)
    return binding.replaced(
        expires_at=now + e,
        cseq=cseq,
        relayed_cseq=relayed_cseq,
        q=q,
        path=list(paths),
        user_agent=user_agent,
        updated_at=now,
        **more,
    )


# ------------------------------------------------------------------------------------------- mode aor


def aggregated_uri(aor: str, hostport: str, settings: Settings) -> str:
    return f"sip:{escape_aor(aor, settings)}@{hostport}{settings.extra_contact_params}"


def decide_aor(
    pending: PendingRegister, record: AorRecord | None, now: float, holder_gone: bool = False
) -> Decision:
    """Absorb or relay in mode aor (behaviour §6.2), with changes staged (T53 [REC]) and new devices relayed
    (§11 [REC]). ``holder_gone``: the aggregated contact carries the address of a process that has left
    (shared store): relay, so that the main registrar learns a live one, unless a relay is already on its
    way."""
    view = pending.view
    valid = record.valid_bindings(now) if record is not None else []
    if record is None or not valid:
        return _relay("AoR unknown or empty")
    meta = record.meta
    if meta is None or meta.relayed_at is None or meta.main_expires is None:
        return _relay("no relay state")
    if holder_gone and not (meta.relay_until is not None and meta.relay_until > now):
        return _relay("aggregated contact names a process that has left")
    ctno = len(valid)
    staged = record.copy()
    request = view.request
    renewed = False
    for pc in pending.planned:
        e = min(pc.life.local, meta.main_expires)
        binding = staged.bindings.get(pc.ctid) if pc.known else None
        if binding is not None and not binding.valid(now):
            binding = None
        if binding is not None and e == 0:
            if ctno == 1:
                return _relay("last device leaves")
            del staged.bindings[pc.ctid]
            continue
        if binding is None:
            if e == 0:
                continue
            return _relay("new contact")
        if not same_flow(binding.source, view.source):
            return _relay("source address, transport or connection changed")
        if binding.call_id != request.call_id:
            return _relay("Call-ID changed")
        staged.bindings[pc.ctid] = refreshed(
            binding,
            request.cseq.seq,
            pc.contact.q,
            e,
            view.paths,
            request.headers.get("user-agent"),
            now,
            local_expires=e,
            main_expires=meta.main_expires,
        )
        renewed = True
    left = staged.valid_bindings(now)
    if renewed:
        if any(b.main_expires is None for b in left):
            return _relay("no relay state")
        max_diff = max((b.main_expires or 0) - b.local_expires for b in left)
        if now >= meta.relayed_at + max_diff:
            if meta.relay_until is not None and meta.relay_until > now:
                # Another device's refresh (here or on another process) is on its way to the main
                # registrar right now: it renews the aggregated contact for this one too (T59).
                return Decision(False, "aggregated refresh already in flight", staged)
            return _relay("main registrar's copy is due")
        return Decision(False, "refresh inside the window", staged)
    if ctno >= 2 and not left:
        return _relay("every device leaves")
    return Decision(False, "de-registration of one of several devices", staged)


def relayed_aor_request(pending: PendingRegister, main: URI, hostport: str, settings: Settings) -> Request:
    """All contacts replaced by one aggregated contact (behaviour §6.1; [REC] expires 0 for
    de-registrations)."""
    view = pending.view
    out = view.request.copy()
    out.uri = main
    pending.ruri = str(main)
    out.headers.remove("path")
    if view.star:
        return out
    out.headers.remove("contact")
    leaving = all(pc.life.local == 0 for pc in pending.planned)
    value = 0 if leaving else settings.outgoing_expires
    pending.aggregated = aggregated_uri(view.aor, hostport, settings)
    contact = f"<{pending.aggregated}>"
    if view.expires_header is not None:
        out.headers.set("Expires", str(value))
        out.headers.add("Contact", contact)
    else:
        out.headers.add("Contact", f"{contact};expires={value}")
    return out


def hostport_of(uri: str | None) -> str | None:
    """host:port of a SIP URI as written (the aggregated contact the main registrar echoed), else None."""
    if not uri:
        return None
    try:
        parsed = parse_uri(uri)
    except ValueError:
        return None
    if not isinstance(parsed, SipURI) or not parsed.port:
        return None
    return f"{ip_reference(parsed.host)}:{parsed.port}"


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """An aggregated contact to de-register at the main registrar, with the Call-ID and CSeq to use."""

    contact: str
    call_id: str
    cseq: int


def keep_held_contact(
    before: AorRecord | None, updated: AorRecord | None, now: float, holder_gone: Callable[[MainMeta], bool]
) -> Withdrawal | None:
    """One aggregated contact per AoR at the main registrar, once a 2xx is stored as ``updated``.

    Two processes relaying the first REGISTERs of one AoR at once each send their own aggregated contact (no
    meta says yet which one the AoR has), and the main registrar ends up holding both: every call would be
    forked twice. If the contact already stored is confirmed, still held at main and its process is alive,
    it stays the AoR's (``updated`` keeps that meta) and the one this 2xx confirmed is withdrawn. If its
    process has left, the new one replaces it and the old one is withdrawn: calls must not go to an address
    nobody listens on. None when there is nothing to withdraw."""
    held = before.meta if before is not None else None
    if held is None or updated is None or updated.meta is None:
        return None
    mine = updated.meta
    if mine.main_contact is None or held.main_contact is None or held.no_dr or not held.main_expires:
        return None
    if held.relayed_at is None or held.relayed_at + held.main_expires <= now:
        return None  # main no longer holds the stored one: ours replaces it
    if hostport_of(mine.main_contact) == hostport_of(held.main_contact):
        return None
    # [REC] T60: a CSeq above anything main has seen with that Call-ID (both relays may share one)
    top = max(held.cseq, mine.cseq) if held.call_id == mine.call_id else None
    if holder_gone(held):
        if held.call_id is None:
            return None
        return Withdrawal(held.main_contact, held.call_id, (top or held.cseq) + 1)
    updated.meta = replace(held, relay_until=None)
    if mine.call_id is None:
        return None
    return Withdrawal(mine.main_contact, mine.call_id, (top or mine.cseq) + 1)


def apply_aor_2xx(
    pending: PendingRegister, record: AorRecord | None, reply: Response, now: float, settings: Settings
) -> tuple[AorRecord | None, list[Binding]]:
    """A 2xx in mode aor (behaviour §6.3): find the aggregated contact by its escaped AoR, update the AoR
    meta, then the contacts."""
    view = pending.view
    if view.star:
        return None, []
    escaped = escape_aor(view.aor, settings)
    e_out: int | None = None
    echoed: str | None = None
    owner: str | None = None
    header = reply.headers.get("expires")
    candidates = [c for c in reply_contacts(reply) if not c.star and escaped in str(c.uri)]
    if candidates:
        # Main lists every contact it holds for the AoR: prefer the one we relayed over another process's.
        sent = hostport_of(pending.aggregated)
        contact = next((c for c in candidates if hostport_of(str(c.uri)) == sent), candidates[0])
        value = contact.expires
        if value and is_digits(value):
            e_out = int(value)
        elif header and is_digits(header):
            e_out = int(header)
        else:
            e_out = settings.default_expires
        echoed = str(contact.uri)
        # whose address it carries is known only for the contact this relay sent
        owner = pending.aggregated_owner if hostport_of(echoed) == sent else None
    new = record.copy() if record is not None else AorRecord(view.aor)
    request = view.request
    meta: MainMeta = main_meta(pending, new.meta)
    cseq = request.cseq.seq if meta.call_id != request.call_id else max(meta.cseq, request.cseq.seq)
    if echoed is None or not e_out:
        meta = replace(
            meta, call_id=request.call_id, cseq=cseq, no_dr=True, relayed_at=0.0
        )  # main dropped it
    else:
        # [REC] expO is refreshed on every 2xx (behaviour §12, §6.3 [OBS])
        meta = replace(
            meta,
            call_id=request.call_id,
            cseq=cseq,
            no_dr=False,
            relayed_at=now,
            main_expires=e_out,
            main_contact=echoed,
            contact_owner=owner,
        )
    new.meta = meta
    touched: set[int] = set()
    for pc in pending.planned:
        e = pc.life.local if e_out is None else min(pc.life.local, e_out)
        if e == 0 or echoed is None:
            new.bindings.pop(pc.ctid, None)
            continue
        new.bindings[pc.ctid] = confirmed_binding(pc, view, now, e, e_out)
        touched.add(pc.ctid)
    evicted = enforce_max_contacts(new, touched, now, settings)
    if not new.bindings:
        return None, evicted
    return new, evicted
