"""The REGISTER pipeline (behaviour §3–§7): validate, decide to absorb or relay, relay to the main
registrar, and on its final answer commit the bindings and answer the phone.

The rules are pure functions: :mod:`registrar.core.register` (validation, planning, the relayed request,
the 2xx), :mod:`registrar.core.reply` (what the phone is answered), :mod:`registrar.core.throttle`
(absorb or relay in modes contact and aor, the aggregated contact) and :mod:`registrar.core.gate` (what
an absorbed REGISTER must pass). This module applies them to the stack's events and the store.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from registrar.config import Insertion, Mode, Settings
from registrar.core import deregister, reply, throttle
from registrar.core import register as reg
from registrar.core.expiry import Expiry
from registrar.core.gate import Gate
from registrar.core.policy import RegistrarError, escape_aor
from registrar.core.refresh import RefreshTemplates
from registrar.core.state import CoreState
from registrar.records import AorRecord, MainMeta
from registrar.sip.headers import is_digits
from registrar.sip.message import Response
from registrar.sip.proxy import ResponseContext
from registrar.sip.stack import Event, IncomingRequest, ProxyFinal
from registrar.sip.transaction import ServerTransaction
from registrar.store.base import Pending, StoreUnavailable

log = logging.getLogger("midregistrar.core")


class Registration:
    """REGISTERs from phones and the main registrar's final answers to the ones relayed.

    ``redo`` runs a stack event again from the start (the dispatcher's ``handle``): a decision whose write
    lost its compare-and-swap is taken afresh from the state that won."""

    def __init__(
        self,
        state: CoreState,
        expiry: Expiry,
        redo: Callable[[Event, float], None],
        gate: Gate | None,
        templates: RefreshTemplates | None = None,
    ) -> None:
        self.state = state
        self.expiry = expiry
        self.redo = redo
        self.gate = gate
        self.templates = templates
        self.relays: dict[int, reg.PendingRegister] = {}  # id(ResponseContext) → what its 2xx changes
        self._floors: dict[str, int] = {}  # AoR → Min-Expires the main registrar insisted on

    def register(self, event: IncomingRequest, now: float) -> None:
        """A REGISTER from a phone: answer a query or a retransmission, absorb a refresh, or relay."""
        state = self.state
        settings = state.settings
        request = event.request
        try:
            view = reg.inspect(request, event.peer, settings)
            if settings.mode is Mode.AOR and not view.aor.isascii():
                escape_aor(view.aor, settings)  # refused now (RegistrarError), not once relaying has begun
            record = state.store.load(view.aor)  # may raise Pending: the event is parked
            if not view.contacts:
                # A binding query is answered here with the current bindings (behaviour §3.1 item 6 [REC]).
                state.stats.registers_answered += 1
                state.stack.respond(event.txn, reply.binding_reply(request, record, now, settings))
                return
            settings = self._settings_for(view.aor)
            pending = reg.plan(view, record, now, settings, state.store.new_contact_id, state.rng)
            if not view.star and not pending.planned:
                # every contact repeats the last CSeq seen: a retransmission, answered from state (§3.4)
                state.stats.registers_answered += 1
                ok = reply.binding_reply(request, record, now, settings)
                state.stack.respond(event.txn, reply.with_outbound(ok, view))
                return
            reg.check_max_contacts(pending, record, now, settings)
            decision = self._decide(pending, record, now)
        except RegistrarError as err:
            state.stats.register_errors += 1
            log.debug("REGISTER for %s refused with %s: %s", request.to.uri, err.status, err.text)
            state.stack.respond(event.txn, reply.error_reply(request, err, settings))
            return
        if decision is not None and not decision.relay:
            gate = self.gate
            if gate is not None:
                refusal = gate.refusal(request, event.peer.host, now, state.settings)
                if refusal is not None:
                    if refusal.status != 401:  # a challenge is authentication, not a refusal
                        state.stats.register_errors += 1
                    state.stack.respond(event.txn, refusal)
                    return
            log.debug("REGISTER for %s absorbed: %s", view.aor, decision.reason)
            absorbed = decision.record

            def answer() -> None:
                state.stats.registers_answered += 1
                paths = view.paths if reply.echo_path(view, settings) else None
                gruu = reply.gruu_context(view, state.stack.local_for(event.peer).hostport, now, settings)
                ok = reply.binding_reply(request, absorbed, now, settings, paths, gruu, state.cap())
                reply.with_outbound(ok, view)
                state.stack.respond(event.txn, ok)
                if self.templates is not None and gruu is None and absorbed is not None:
                    self.templates.learn(
                        event, pending, absorbed, ok
                    )  # the next identical refresh skips all this

            state.commit(view.aor, absorbed, record, now, answer, partial(self.redo, event))
            return
        log.debug("REGISTER for %s relayed: %s", view.aor, decision.reason if decision else "mirror")
        meta = record.meta if record is not None else None
        if decision is not None and settings.mode is Mode.AOR and meta is not None and record is not None:
            # Mark the aggregated refresh as in flight first: another process (or device) deciding meanwhile
            # absorbs instead of relaying it a second time (T59).
            marked = record.copy()
            marked.meta = replace(meta, relay_until=now + 64 * state.settings.t1)
            held = None if self._holder_gone(meta, now) else meta  # whose aggregated contact to renew
            relay = partial(self._relay, event.txn, pending, settings, held)
            state.commit(view.aor, marked, record, now, relay, partial(self.redo, event))
            return
        self._relay(event.txn, pending, settings)

    def final(self, event: ProxyFinal, now: float) -> None:
        """The final answer to a relayed REGISTER: a 2xx is committed and rewritten for the phone; anything
        else goes to the phone unchanged (behaviour §7), a 423 after one retry with a longer lifetime."""
        state = self.state
        ctx = event.ctx
        pending = self.relays.get(id(ctx))
        response = event.response
        if pending is not None and response.status == 423 and self._retry_423(ctx, pending, response):
            return
        if pending is None or not 200 <= response.status < 300:
            # 401/407/403/423/5xx/408 reach the UA unchanged; nothing local changes (behaviour §7).
            self.relays.pop(id(ctx), None)
            state.stack.finish(ctx, response)
            if pending is not None and state.settings.mode is Mode.AOR:
                self._unmark(pending.view.aor, now)
            return
        aor = pending.view.aor
        record = state.store.load(aor)  # may raise Pending: the event is parked with ``pending`` kept
        del self.relays[id(ctx)]
        superseded: throttle.Withdrawal | None = None
        settings = state.settings
        if settings.mode is Mode.AOR:
            updated, evicted = throttle.apply_aor_2xx(pending, record, response, now, settings)
            if updated is not None and updated.meta is not None and updated.meta.relay_until is not None:
                updated.meta = replace(updated.meta, relay_until=None)
            superseded = throttle.keep_held_contact(record, updated, now, partial(self._holder_gone, now=now))
        else:
            updated, evicted = reg.apply_2xx(pending, record, response, now, settings)

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
                    updated.meta, superseded.call_id, superseded.cseq, superseded.contact, state.tag()
                )
                self.expiry.send(dereg, deregister.next_hop(updated.meta))
            if settings.mode is Mode.CONTACT and updated is not None and updated.meta is not None:
                self.expiry.withdraw_contacts(updated.meta, evicted)
            paths = pending.view.paths if reply.echo_path(pending.view, settings) else None
            gruu = reply.gruu_context(pending.view, state.stack.local_for(ctx.source).hostport, now, settings)
            rewritten = reply.rewrite_reply(response, updated, now, settings, paths, gruu, state.cap())
            reply.with_outbound(rewritten, pending.view)
            state.stack.finish(ctx, rewritten)

        def again(later: float) -> None:
            self.relays[id(ctx)] = pending
            self.redo(event, later)

        state.commit(aor, updated, record, now, finish, again)

    def _relay(
        self,
        txn: ServerTransaction,
        pending: reg.PendingRegister,
        settings: Settings,
        meta: MainMeta | None = None,
    ) -> None:
        state = self.state
        local = state.stack.local_for(state.main_peer)
        if settings.mode is Mode.AOR:
            # One aggregated contact per AoR whichever process relays: the one the main registrar holds
            # (``meta``: None when there is none yet, or when the process whose address it carries has left).
            hostport: str | None = None
            owner: str | None = state.store.member_id
            if pending.aggregated is not None:  # sent once already (a 423 retry): the same contact again
                hostport, owner = throttle.hostport_of(pending.aggregated), pending.aggregated_owner
            elif meta is not None:
                hostport, owner = throttle.hostport_of(meta.main_contact), meta.contact_owner
            relayed = throttle.relayed_aor_request(
                pending, state.main_uri, hostport or local.hostport, settings
            )
            pending.aggregated_owner = owner if hostport else state.store.member_id
        else:
            relayed = reg.relayed_request(pending, state.main_uri, local.hostport, settings)
        state.stack.pop_own_routes(relayed)  # the phone's outbound-proxy Route names us: not main's business
        pending.hop = settings.main_proxy
        ctx = state.stack.proxy(txn, [(relayed, state.main_peer)], hold_final=True)
        self.relays[id(ctx)] = pending
        state.stats.registers_relayed += 1

    def _settings_for(self, aor: str) -> Settings:
        """Settings for one AoR: outgoing_expires raised where the main registrar asked (behaviour §7
        [REC])."""
        settings = self.state.settings
        floor = self._floors.get(aor)
        if floor is None or floor <= settings.outgoing_expires:
            return settings
        return settings.model_copy(update={"outgoing_expires": floor})

    def _retry_423(self, ctx: ResponseContext, pending: reg.PendingRegister, response: Response) -> bool:
        """A 423 whose Min-Expires is above what we sent: raise it for this AoR and relay once more."""
        configured = self.state.settings
        value = response.headers.get("min-expires") or ""
        if not (configured.raise_on_423 and is_digits(value)) or pending.retried_423:
            return False
        floor = int(value)
        settings = self._settings_for(pending.view.aor)
        if floor <= settings.outgoing_expires or configured.mode is Mode.MIRROR:
            return False
        self._floors[pending.view.aor] = floor
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
        """Absorb or relay (behaviour §5.2, §6.2, §11); None in mode mirror and for ``Contact: *``."""
        settings = self.state.settings
        mode = settings.mode
        if mode is Mode.MIRROR or pending.view.star:
            return None  # mirror relays everything; `Contact: *` is relayed in every mode (§3.1 item 5)
        if mode is Mode.CONTACT:
            # With Path insertion the main registrar keeps the phone's own Contact and reaches it through our
            # Path: a relay from the process now holding the flow repoints that Path in place.
            me = self.state.store.member_id if settings.insertion is Insertion.PATH else None
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
        store = self.state.store
        if meta.contact_owner == store.member_id or store.member_address(meta.contact_owner) is not None:
            return False
        return meta.relayed_at is None or now - meta.relayed_at >= self.state.settings.member_ttl

    def _unmark(self, aor: str, now: float) -> None:
        """A relay of mode aor ended without a 2xx: clear its in-flight mark (best effort; it also lapses)."""
        try:
            record = self.state.store.load(aor)
        except (Pending, StoreUnavailable):
            return
        if record is None or record.meta is None or record.meta.relay_until is None:
            return
        cleared = record.copy()
        cleared.meta = replace(record.meta, relay_until=None)
        with contextlib.suppress(StoreUnavailable):  # the answer went out already; the mark lapses alone
            self.state.commit(aor, cleared, record, now)
