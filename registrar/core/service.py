"""The mid-registrar pipeline over the sans-IO stack (SPEC.md §1: REGISTER → save → relay or answer;
request from the main registrar → lookup → forward).

:class:`MidRegistrar` reacts to the stack's events with the pure decisions of :mod:`registrar.core.register`
and :mod:`registrar.core.lookup`, reads and commits through the store, and gives the stack its commands.
It never touches a socket; the shell drains the stack after each call.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from registrar.config import Insertion, Listen, Mode, Settings
from registrar.core import deregister, digest, throttle
from registrar.core import register as reg
from registrar.core.lookup import Target, branch_target, lookup, lookup_aor, lookup_by_contact
from registrar.core.policy import RegistrarError, aor_from_uri
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.errors import ParseError
from registrar.sip.headers import parse_address
from registrar.sip.message import Request, Response, make_response
from registrar.sip.proxy import ResponseContext
from registrar.sip.stack import ClientResult, Event, IncomingRequest, ProxyFinal, Stack, StrayAck
from registrar.sip.transaction import ServerTransaction
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import URI, SipURI, parse_uri
from registrar.store.base import Pending, Store, StoreUnavailable

log = logging.getLogger("midregistrar.core")

FLOW_GRACE = 10.0
HANDOFF = "X-Midreg-Flow"  # internal hop: "<sender member id> <contact id>" (DESIGN §6 flow owner)
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, SUBSCRIBE, NOTIFY, REFER, INFO, UPDATE, PRACK"


@dataclass
class CoreStats:
    registers_relayed: int = 0
    registers_answered: int = 0
    register_errors: int = 0
    deregisters_sent: int = 0
    expired: int = 0
    unavailable: int = 0  # requests answered 503 because the store could not be reached
    handoffs: int = 0  # requests handed to the process holding the phone's flow
    lookups: dict[str, int] = field(default_factory=dict)


class RateLimiter:
    """Token bucket per source address for locally answered REGISTERs (SPEC §11 [REC] mitigation 5)."""

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


class MidRegistrar:
    """One process's mid-registrar logic."""

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
        self.settings = settings
        self.stack = stack
        self.store = store
        self.rng = rng or random.Random()
        self.main_uri: URI = parse_uri(settings.main_registrar)
        self.main_peer = peer_for_uri(
            parse_uri(settings.main_proxy) if settings.main_proxy else self.main_uri
        )
        self._outgoing_floor: dict[str, int] = {}  # AoR → Min-Expires the main registrar insisted on
        self.stats = CoreStats()
        self.expiry = deregister.ExpirySchedule()
        self.gate = gate
        self.limiter = RateLimiter(settings.register_rate_limit) if settings.register_rate_limit else None
        self.credentials = {c.realm: c for c in credentials or []}
        self._pending: dict[int, reg.PendingRegister] = {}
        self._originated: dict[int, tuple[Request, Peer]] = {}
        self._flows: dict[int, float] = {}  # TCP connection id → keep open until
        self._parked: dict[str, list[Callable[[float], None]]] = {}  # store key → work waiting for it
        self._tickets: dict[int, tuple[Callable[[], None], Callable[[float], None] | None]] = {}
        self.draining = False

    def handle(self, event: Event, now: float) -> None:
        """One stack event. Work the store cannot answer yet is parked and runs again on ``store_ready``."""
        try:
            if isinstance(event, IncomingRequest):
                self._request(event, now)
            elif isinstance(event, ProxyFinal):
                self._final(event.ctx, event, now)
            elif isinstance(event, StrayAck):
                self._ack(event.request, now)
            elif isinstance(event, ClientResult):
                self._client_result(event)
        except Pending as wait:
            self.park(wait.key, partial(self.handle, event))
        except StoreUnavailable:
            self._unavailable(event)

    # ------------------------------------------------------------------------------------ store
    # A networked store (etcd) answers later: parked work and ticketed writes resume from its callbacks.

    def park(self, key: str, work: Callable[[float], None]) -> None:
        """Run ``work(now)`` once the store reports ``key`` ready."""
        self._parked.setdefault(key, []).append(work)

    def store_ready(self, key: str, now: float) -> None:
        for work in self._parked.pop(key, []):
            work(now)

    def store_committed(self, ticket: int, ok: bool, now: float) -> None:
        """A ticketed write ended: go on with what it was for, or decide again from fresh state."""
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return
        done, again = entry
        if ok:
            done()
        elif again is not None:
            again(now)

    @property
    def waiting(self) -> int:
        """Pieces of work waiting for the store (parked or behind a write)."""
        return sum(map(len, self._parked.values())) + len(self._tickets)

    def _unavailable(self, event: Event) -> None:
        """The store cannot be reached: 503 with Retry-After, never a guessed answer (DESIGN §5)."""
        self.stats.unavailable += 1
        if isinstance(event, IncomingRequest):
            request, answer = event.request, partial(self.stack.respond, event.txn)
        elif isinstance(event, ProxyFinal):
            self._pending.pop(id(event.ctx), None)
            request, answer = event.ctx.request, partial(self.stack.finish, event.ctx)
        else:
            return
        response = make_response(request, 503)
        response.reason = "Service Unavailable (registration state unreachable)"
        response.headers.add("Retry-After", str(max(1, self.settings.retry_after or 5)))
        answer(response)

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
        """OPTIONS to our own address, or (mode aor) a qualify ping to an aggregated contact (SPEC §9.2)."""
        uri = request.uri
        if not isinstance(uri, SipURI) or not self.stack.is_local_uri(uri):
            return False
        if self.settings.mode is Mode.AOR:
            return True
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
            record = self.store.load(view.aor)  # may raise Pending: handle() parks the event
            if not view.contacts:
                # A binding query is answered here with the current bindings (SPEC §3.1 item 6 [REC]).
                self.stats.registers_answered += 1
                self.stack.respond(event.txn, reg.binding_reply(request, record, now, settings))
                return
            settings = self._settings_for(view.aor)
            pending = reg.plan(view, record, now, settings, self.store.new_contact_id, self.rng)
            if not view.star and not pending.planned:
                # every contact repeats the last CSeq seen: a retransmission, answered from state (§3.4)
                self.stats.registers_answered += 1
                self.stack.respond(event.txn, reg.binding_reply(request, record, now, settings))
                return
            reg.check_max_contacts(pending, record, now, settings)
            decision = self._decide(pending, record, now)
        except RegistrarError as err:
            self.stats.register_errors += 1
            log.debug("REGISTER for %s refused with %s: %s", request.to.uri, err.status, err.text)
            self.stack.respond(event.txn, reg.error_reply(request, err, settings))
            return
        if decision is not None and not decision.relay:
            if not self._gate_passes(event, view, now):
                return
            log.debug("REGISTER for %s absorbed: %s", view.aor, decision.reason)
            absorbed = decision.record

            def answer() -> None:
                self.stats.registers_answered += 1
                paths = view.paths if reg.echo_path(view, settings) else None
                gruu = reg.gruu_context(view, self.stack.local_for(event.peer).hostport, now, settings)
                reply = reg.binding_reply(request, absorbed, now, settings, paths, gruu, self._cap())
                self.stack.respond(event.txn, reply)

            self._commit(view.aor, absorbed, record, answer, partial(self.handle, event))
            return
        log.debug("REGISTER for %s relayed: %s", view.aor, decision.reason if decision else "mirror")
        meta = record.meta if record is not None else None
        if decision is not None and settings.mode is Mode.AOR and meta is not None and record is not None:
            # Mark the aggregated refresh as in flight first: another process (or device) deciding meanwhile
            # absorbs instead of relaying it a second time (T59).
            marked = record.copy()
            marked.meta = replace(meta, relay_until=now + 64 * self.settings.t1)
            held = None if self._holder_gone(meta, now) else meta  # whose aggregated contact to renew
            relay = partial(self._relay, event.txn, pending, settings, held)
            self._commit(view.aor, marked, record, relay, partial(self.handle, event))
            return
        self._relay(event.txn, pending, settings)

    def _relay(
        self,
        txn: ServerTransaction,
        pending: reg.PendingRegister,
        settings: Settings,
        meta: MainMeta | None = None,
    ) -> None:
        local = self.stack.local_for(self.main_peer)
        if settings.mode is Mode.AOR:
            # One aggregated contact per AoR whichever process relays: the one the main registrar holds
            # (``meta``: None when there is none yet, or when the process whose address it carries has left).
            hostport: str | None = None
            owner: str | None = self.store.member_id
            if pending.aggregated is not None:  # sent once already (a 423 retry): the same contact again
                hostport, owner = throttle.hostport_of(pending.aggregated), pending.aggregated_owner
            elif meta is not None:
                hostport, owner = throttle.hostport_of(meta.main_contact), meta.contact_owner
            relayed = throttle.relayed_aor_request(
                pending, self.main_uri, hostport or local.hostport, settings
            )
            pending.aggregated_owner = owner if hostport else self.store.member_id
        else:
            relayed = reg.relayed_request(pending, self.main_uri, local.hostport, settings)
        pending.hop = settings.main_proxy
        ctx = self.stack.proxy(txn, [(relayed, self.main_peer)], hold_final=True)
        self._pending[id(ctx)] = pending
        self.stats.registers_relayed += 1

    def _settings_for(self, aor: str) -> Settings:
        """Settings for one AoR: outgoing_expires raised where the main registrar asked (SPEC §7 [REC])."""
        floor = self._outgoing_floor.get(aor)
        if floor is None or floor <= self.settings.outgoing_expires:
            return self.settings
        return self.settings.model_copy(update={"outgoing_expires": floor})

    def _retry_423(self, ctx: ResponseContext, pending: reg.PendingRegister, response: Response) -> bool:
        """A 423 whose Min-Expires is above what we sent: raise it for this AoR and relay once more."""
        value = response.headers.get("min-expires") or ""
        if not (self.settings.raise_on_423 and value.isdigit()) or pending.retried_423:
            return False
        floor = int(value)
        settings = self._settings_for(pending.view.aor)
        if floor <= settings.outgoing_expires or self.settings.mode is Mode.MIRROR:
            return False
        self._outgoing_floor[pending.view.aor] = floor
        settings = self._settings_for(pending.view.aor)
        planned = [
            replace(pc, life=replace(pc.life, outgoing=floor if pc.life.outgoing else 0))
            for pc in pending.planned
        ]
        retry = reg.PendingRegister(
            pending.view,
            planned,
            retried_423=True,
            aggregated=pending.aggregated,
            aggregated_owner=pending.aggregated_owner,
        )
        log.info("main registrar wants at least %ss for %s: relaying once more", floor, pending.view.aor)
        self._relay(ctx.server, retry, settings)
        return True

    def _decide(
        self, pending: reg.PendingRegister, record: AorRecord | None, now: float
    ) -> throttle.Decision | None:
        mode = self.settings.mode
        if mode is Mode.MIRROR or pending.view.star:
            return None  # mirror relays everything; `Contact: *` is relayed in every mode (§3.1 item 5)
        if mode is Mode.CONTACT:
            # With Path insertion the main registrar keeps the phone's own Contact and reaches it through our
            # Path: a relay from the process now holding the flow repoints that Path in place.
            me = self.store.member_id if self.settings.insertion is Insertion.PATH else None
            return throttle.decide_contact(pending, record, now, me)
        gone = record is not None and self._holder_gone(record.meta, now)
        return throttle.decide_aor(pending, record, now, holder_gone=gone)

    def _holder_gone(self, meta: MainMeta | None, now: float) -> bool:
        """The process whose address the AoR's aggregated contact carries has left: it is no live member, and
        the last relay is older than a member lease. A process registers as a member before it relays, so
        one that relayed within a lease and is missing here is still on its way through the watch (or was
        listed just before it registered), not gone."""
        if meta is None or meta.main_contact is None or meta.contact_owner is None:
            return False  # None: not recorded (memory store, or written before owners were)
        store = self.store
        if meta.contact_owner == store.member_id or store.member_address(meta.contact_owner) is not None:
            return False
        return meta.relayed_at is None or now - meta.relayed_at >= self.settings.member_ttl

    def _gate_passes(self, event: IncomingRequest, view: reg.RegisterView, now: float) -> bool:
        """Local digest check and per-source rate limit in front of absorption (SPEC §11 [REC], T55)."""
        request = event.request
        if self.gate is not None:
            to_user = view.request.to.uri.user if isinstance(view.request.to.uri, SipURI) else None
            if not self.gate.verify(request.headers.get("authorization"), "REGISTER", to_user or "", now):
                response = make_response(request, 401)
                response.headers.add("WWW-Authenticate", self.gate.challenge(now))
                self.stack.respond(event.txn, response)
                return False
        if self.limiter is not None and not self.limiter.allow(event.peer.host, now):
            self.stats.register_errors += 1
            err = RegistrarError(503, "Too many REGISTERs from this source")
            response = reg.error_reply(request, err, self.settings)
            if "retry-after" not in response.headers:
                response.headers.add("Retry-After", str(max(1, self.settings.retry_after or 5)))
            self.stack.respond(event.txn, response)
            return False
        return True

    def _final(self, ctx: ResponseContext, event: ProxyFinal, now: float) -> None:
        pending = self._pending.get(id(ctx))
        response = event.response
        if pending is not None and response.status == 423 and self._retry_423(ctx, pending, response):
            return
        if pending is None or not 200 <= response.status < 300:
            # 401/407/403/423/5xx/408 reach the UA unchanged; nothing local changes (SPEC §7).
            self._pending.pop(id(ctx), None)
            self.stack.finish(ctx, response)
            if pending is not None and self.settings.mode is Mode.AOR:
                self._unmark(pending.view.aor, now)
            return
        aor = pending.view.aor
        record = self.store.load(aor)  # may raise Pending: the event is parked with ``pending`` kept
        del self._pending[id(ctx)]
        superseded: throttle.Withdrawal | None = None
        if self.settings.mode is Mode.AOR:
            updated, evicted = throttle.apply_aor_2xx(pending, record, response, now, self.settings)
            if updated is not None and updated.meta is not None and updated.meta.relay_until is not None:
                updated.meta = replace(updated.meta, relay_until=None)
            superseded = throttle.keep_held_contact(record, updated, now, partial(self._holder_gone, now=now))
        else:
            updated, evicted = reg.apply_2xx(pending, record, response, now, self.settings)

        def finish() -> None:
            if superseded is not None and updated is not None and updated.meta is not None:
                # Main holds two aggregated contacts for this AoR: withdraw the one that must go.
                log.info(
                    "AoR %s: keeping %s at the main registrar, de-registering %s",
                    aor,
                    updated.meta.main_contact,
                    superseded.contact,
                )
                dereg = deregister.deregister_request(
                    updated.meta, superseded.call_id, superseded.cseq, superseded.contact, self._tag()
                )
                self._send_deregister(dereg, deregister.next_hop(updated.meta))
            if self.settings.mode is Mode.CONTACT and updated is not None and updated.meta is not None:
                for binding in evicted:
                    request = deregister.contact_deregister(updated.meta, binding, self._tag())
                    self._send_deregister(request, deregister.next_hop(updated.meta))
            paths = pending.view.paths if reg.echo_path(pending.view, self.settings) else None
            gruu = reg.gruu_context(
                pending.view, self.stack.local_for(ctx.source).hostport, now, self.settings
            )
            reply = reg.rewrite_reply(response, updated, now, self.settings, paths, gruu, self._cap())
            self.stack.finish(ctx, reply)

        def again(later: float) -> None:
            self._pending[id(ctx)] = pending
            self.handle(event, later)

        self._commit(aor, updated, record, finish, again)

    def _unmark(self, aor: str, now: float) -> None:
        """A relay of mode aor ended without a 2xx: clear its in-flight mark (best effort; it also lapses)."""
        try:
            record = self.store.load(aor)
        except (Pending, StoreUnavailable):
            return
        if record is None or record.meta is None or record.meta.relay_until is None:
            return
        cleared = record.copy()
        cleared.meta = replace(record.meta, relay_until=None)
        self._commit(aor, cleared, record)

    def _commit(
        self,
        aor: str,
        record: AorRecord | None,
        old: AorRecord | None,
        then: Callable[[], None] | None = None,
        again: Callable[[float], None] | None = None,
    ) -> None:
        """Store ``record`` in place of ``old`` (the AoR as loaded), then schedule what is new or shortened
        and run ``then``. With a networked store that happens once the write is in; if it lost its
        compare-and-swap, ``again`` decides afresh (DESIGN §5: one transaction per decision)."""
        if record is None or not record.bindings:
            ticket = self.store.delete(aor, old)
        else:
            before = old.bindings if old is not None else {}
            me = self.store.member_id
            for ctid, binding in record.bindings.items():
                if binding.owner != me and binding is not before.get(ctid):
                    record.bindings[ctid] = replace(binding, owner=me)  # this process holds its flow now
            ticket = self.store.commit(record, old)
        done = partial(self._committed, record, old, then)
        if ticket is None:
            done()
        else:
            self._tickets[ticket] = (done, again)

    def _committed(
        self, record: AorRecord | None, old: AorRecord | None, then: Callable[[], None] | None
    ) -> None:
        if record is not None and record.bindings:
            before = old.bindings if old is not None else {}
            for binding in record.bindings.values():
                if not self.store.owns(binding):
                    continue
                self.expiry.schedule(record.aor, binding, before.get(binding.ctid))
                conn = binding.source.conn
                if conn is not None and self._flows.get(conn, 0.0) < binding.expires_at + FLOW_GRACE:
                    self._flows[conn] = binding.expires_at + FLOW_GRACE
        if then is not None:
            then()

    def aor_view(self, aor: str, now: float) -> dict[str, Any] | None:
        """JSON-ready view of one AoR for ``GET /v1/aors/{aor}``: valid bindings, remaining expires, meta."""
        record = self.store.load(aor)
        if record is None:
            return None
        bindings = []
        for b in record.valid_bindings(now):
            bindings.append(
                {
                    "ctid": str(b.ctid),
                    "contact": b.contact,
                    "expires": b.remaining(now),
                    "received": str(b.source),
                    "q": b.q,
                    "call_id": b.call_id,
                    "cseq": b.cseq,
                    "path": b.path,
                    "instance": b.instance,
                    "reg_id": b.reg_id,
                    "user_agent": b.user_agent,
                    "owner": b.owner,
                    "main": {
                        "expires": b.main_expires,
                        "relayed_ago": None if b.relayed_at is None else round(now - b.relayed_at, 3),
                        "contact": b.main_contact,
                    },
                }
            )
        meta = record.meta
        return {
            "aor": record.aor,
            "mode": self.settings.mode.value,
            "bindings": bindings,
            "main": None
            if meta is None
            else {
                "ruri": meta.ruri,
                "from": meta.from_uri,
                "to": meta.to_uri,
                "call_id": meta.call_id,
                "cseq": meta.cseq,
                "expires": meta.main_expires,
                "relayed_ago": None if meta.relayed_at is None else round(now - meta.relayed_at, 3),
                "contact": meta.main_contact,
                "no_deregister": meta.no_dr,
            },
        }

    # ------------------------------------------------------------------------------------ expiry

    def next_deadline(self) -> float | None:
        return self.expiry.next_deadline()

    def keep_flow_until(self, conn: int) -> float:
        """A TCP connection that carries a binding stays open until it expires plus 10 s (SPEC §4.3, T64)."""
        return self._flows.get(conn, 0.0)

    def flow_closed(self, conn: int) -> None:
        self._flows.pop(conn, None)

    def on_timer(self, now: float) -> None:
        """Remove bindings that expired and send the De-REGISTERs they call for (SPEC §5.4, §6.4)."""
        by_aor: dict[str, list[int]] = {}
        for aor, ctid in self.expiry.due(now):
            by_aor.setdefault(aor, []).append(ctid)
        for aor, ctids in by_aor.items():
            self._expire(aor, ctids, now)

    def _expire(self, aor: str, ctids: list[int], now: float) -> None:
        try:
            record = self.store.load(aor)
        except Pending as wait:
            self.park(wait.key, partial(self._expire, aor, ctids))
            return
        except StoreUnavailable:
            for ctid in ctids:
                self.expiry.at(aor, ctid, now + 1.0)  # looked at again until the store is back
            return
        if record is None:
            return
        gone: list[Binding] = []
        for ctid in ctids:
            binding = record.bindings.get(ctid)
            if binding is None or not self.store.owns(binding):
                continue  # gone, or another process holds its flow now (its timer, its De-REGISTER)
            if binding.valid(now):
                self.expiry.schedule(aor, binding)  # refreshed meanwhile: look again later
            else:
                gone.append(binding)
        if not gone:
            return
        left = record.copy()
        for binding in gone:
            del left.bindings[binding.ctid]
        # The write's compare-and-swap makes this process the only sender (T58); on a conflict, look again.
        send = partial(self._expired, record, left, gone, now)
        self._commit(aor, left, record, send, partial(self._expire, aor, [b.ctid for b in gone]))

    def _expired(self, record: AorRecord, left: AorRecord, gone: list[Binding], now: float) -> None:
        self.stats.expired += len(gone)
        meta = record.meta
        if meta is None:
            return
        if self.settings.mode is Mode.CONTACT:
            for binding in gone:
                request = deregister.contact_deregister(meta, binding, self._tag())
                self._send_deregister(request, deregister.next_hop(meta))
        elif self.settings.mode is Mode.AOR and not left.valid_bindings(now):
            self._send_deregister(deregister.aor_deregister(meta, self._tag()), deregister.next_hop(meta))

    def orphans_expired(self, before: AorRecord, gone: list[Binding], now: float) -> None:
        """Bindings of a dead process ran out their lease; this process won the claim to de-register them."""
        left = before.copy()
        for binding in gone:
            left.bindings.pop(binding.ctid, None)
        if self.settings.mode is Mode.AOR:
            try:
                current = self.store.load(before.aor)
            except Pending as wait:
                self.park(wait.key, partial(self.orphans_expired, before, gone))
                return
            except StoreUnavailable:
                current = None
            if current is not None:
                left = current
        log.info("%d binding(s) of %s outlived their process: de-registering", len(gone), before.aor)
        self._expired(before, left, gone, now)

    def _send_deregister(self, request: Request | None, peer: Peer) -> None:
        if request is None:
            return
        original = request.copy()  # before the stack adds its Via: a retry starts from this
        handle = self.stack.send_request(request, peer)
        self._originated[handle] = (original, peer)
        self.stats.deregisters_sent += 1
        log.debug("De-REGISTER sent for %s", request.headers.get("contact"))

    def _client_result(self, event: ClientResult) -> None:
        """A challenged De-REGISTER is sent once more with credentials and CSeq+1 (SPEC T57)."""
        sent = self._originated.pop(event.handle, None)
        status = event.response.status
        if sent is None:
            return
        original, peer = sent
        if status not in (401, 407) or original.headers.get("authorization"):
            if status >= 300:
                log.info("De-REGISTER answered %s %s", status, event.response.reason)
            return
        name = "www-authenticate" if status == 401 else "proxy-authenticate"
        value = event.response.headers.get(name)
        challenge = digest.parse_challenge(value or "")
        creds = self.credentials.get(challenge.get("realm", ""))
        if creds is None:
            log.warning(
                "De-REGISTER challenged by realm %r without configured credentials", challenge.get("realm")
            )
            return
        retry = original.copy()
        retry.headers.set("CSeq", f"{original.cseq.seq + 1} REGISTER")
        answer = digest.authorization(challenge, creds, "REGISTER", str(original.uri), self._tag())
        retry.headers.add("Authorization" if status == 401 else "Proxy-Authorization", answer)
        self._send_deregister(retry, peer)

    def _cap(self) -> int | None:
        """While draining, phones are told to come back within drain_expires (DESIGN §6)."""
        return self.settings.drain_expires if self.draining else None

    def _tag(self) -> str:
        return f"{self.rng.getrandbits(48):012x}"

    # ------------------------------------------------------------------------------------ routing

    def _route(self, event: IncomingRequest, now: float) -> None:
        request = event.request
        handoff = request.headers.get(HANDOFF)
        if handoff is not None and self._handed_over(event, handoff, now):
            return
        routes = request.headers.values("route")
        if routes:
            self._loose_route(event, routes, now)
            return
        if self.settings.mode is Mode.AOR:
            result = lookup_aor(request, self.store, now, self.settings)
        else:
            result = lookup(request.uri, self.store, now, self.settings)
        self.stats.lookups[result.outcome] = self.stats.lookups.get(result.outcome, 0) + 1
        if not result.targets:
            self.stack.respond(event.txn, make_response(request, 404))
            return
        branches: list[tuple[Request | URI | None, Peer]] = [
            b for b in (self._branch_via_owner(request, t) for t in result.targets) if b is not None
        ]
        if not branches:
            self.stack.respond(event.txn, make_response(request, 480))  # only dead TCP flows were left
            return
        self.stack.proxy(event.txn, branches)

    def _branch_via_owner(self, request: Request, target: Target) -> tuple[Request | URI, Peer] | None:
        """A branch over the phone's flow: direct when this process holds it (or a Path leads there), else
        handed to the process that does (DESIGN §6). With that process gone, a UDP phone is reached
        directly at the address it registered from; a TCP flow died with it (None: no branch)."""
        binding = target.binding
        if binding is None or target.routes or binding.owner is None or self.store.owns(binding):
            return _branch(request, target)
        address = self.store.member_address(binding.owner)
        if address is None:
            return None if binding.source.reliable else _branch(request, target)
        hop = Listen.parse(address)
        copy = request.copy()
        copy.uri = target.uri
        copy.headers.add(HANDOFF, f"{self.store.member_id} {binding.ctid}")
        self.stats.handoffs += 1
        return copy, Peer(hop.transport.value, hop.host, hop.port)

    def _handed_over(self, event: IncomingRequest, value: str, now: float) -> bool:
        """A peer process hands us a request for a flow we hold: send it to the phone over that flow. The
        header counts only from a live member's address; from anywhere else it is dropped and ignored."""
        request = event.request
        sender, _, ctid_text = value.partition(" ")
        address = self.store.member_address(sender)
        hop = Listen.parse(address) if address else None
        if (
            hop is None
            or (hop.host, hop.port) != (event.peer.host, event.peer.port)
            or not ctid_text.isdigit()
        ):
            request.headers.remove(HANDOFF)
            return False
        record = self.store.find_ctid(int(ctid_text))  # may raise Pending: re-run with the header kept
        request.headers.remove(HANDOFF)
        binding = record.bindings.get(int(ctid_text)) if record is not None else None
        target = branch_target(binding) if binding is not None and binding.valid(now) else None
        if target is None or (
            binding is not None and not self.store.owns(binding) and binding.source.reliable
        ):
            self.stack.respond(event.txn, make_response(request, 480))
            return True
        self.stack.proxy(event.txn, [_branch(request, target)])
        return True

    def _loose_route(self, event: IncomingRequest, routes: list[str], now: float) -> None:
        """Pre-routed requests: pop our own Route, forward to the next hop (RFC 3261 §16.4). With Path
        insertion, a request from the main registrar to a phone's Contact goes over that phone's flow."""
        request = event.request
        top = parse_address(routes[0], "Route").uri
        if len(routes) == 1 and self.settings.insertion is Insertion.PATH and self.stack.is_local_uri(top):
            target = lookup_by_contact(aor_from_uri(top, self.settings), request.uri, self.store, now)
            if target is not None:
                request.headers.pop_first_value("route")
                self.stack.proxy(event.txn, [_branch(request, target)])
                return
        self.stack.proxy(event.txn, [(None, self._next_hop(request, routes))])

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
        if result.targets:
            target = result.targets[0]
            request.uri = target.uri
            self.stack.forward_stateless(request, target.peer)


def _branch(request: Request, target: Target) -> tuple[Request | URI, Peer]:
    """A branch for the stack: just the new Request-URI, or a copy carrying the Path's Route set."""
    if not target.routes:
        return target.uri, target.peer
    copy = request.copy()
    copy.uri = target.uri
    for route in reversed(target.routes):
        copy.headers.prepend("Route", route)
    return copy, target.peer


def _bad_request(request: Request, reason: str) -> Response:
    response = make_response(request, 400)
    response.reason = f"Bad Request ({reason})"
    return response
