"""Expiry and generated De-REGISTERs (behaviour §5.4, §6.4, T57, T58): bindings this process owns are
removed at their exact expiry, and the main registrar is told with a De-REGISTER built by
:mod:`registrar.core.deregister`; one challenged with 401/407 is sent once more with credentials.

The REGISTER pipeline sends its De-REGISTERs (contacts evicted by max_contacts, a second aggregated
contact withdrawn) through :meth:`Expiry.send` too, so every one of them gets the same challenge retry.
"""

from __future__ import annotations

import logging
from functools import partial

from registrar.config import Mode
from registrar.core import deregister, digest
from registrar.core.state import CoreState
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.message import Request
from registrar.sip.stack import ClientResult
from registrar.sip.transport import Peer
from registrar.store.base import Pending, StoreUnavailable

log = logging.getLogger("midregistrar.core")


class Expiry:
    """The expiry timer's work and the De-REGISTERs in flight."""

    def __init__(self, state: CoreState, credentials: list[digest.Credentials]) -> None:
        self.state = state
        self.credentials = {c.realm: c for c in credentials}
        self._originated: dict[int, tuple[Request, Peer]] = {}  # stack handle → (as first built, next hop)

    def on_timer(self, now: float) -> None:
        """Remove bindings that expired and send the De-REGISTERs they call for (behaviour §5.4, §6.4)."""
        by_aor: dict[str, list[int]] = {}
        for aor, ctid in self.state.schedule.due(now):
            by_aor.setdefault(aor, []).append(ctid)
        for aor, ctids in by_aor.items():
            self._expire(aor, ctids, now)

    def _expire(self, aor: str, ctids: list[int], now: float) -> None:
        state = self.state
        try:
            record = state.store.load(aor)
        except Pending as wait:
            state.park(wait.key, partial(self._expire, aor, ctids))
            return
        except StoreUnavailable:
            self._later(aor, ctids, now)
            return
        if record is None:
            return
        gone: list[Binding] = []
        for ctid in ctids:
            binding = record.bindings.get(ctid)
            if binding is None or not state.store.owns(binding):
                continue  # gone, or another process holds its flow now (its timer, its De-REGISTER)
            if binding.valid(now):
                state.schedule.schedule(aor, binding)  # refreshed meanwhile: look again later
            else:
                gone.append(binding)
        if not gone:
            return
        left = record.copy()
        for binding in gone:
            del left.bindings[binding.ctid]
        # The write's compare-and-swap makes this process the only sender (T58); on a conflict, look again.
        send = partial(self._expired, record, left, gone, now)
        ctids = [b.ctid for b in gone]
        try:
            state.commit(aor, left, record, now, send, partial(self._expire, aor, ctids))
        except StoreUnavailable:  # read from memory while etcd is away, but a removal must be written
            self._later(aor, ctids, now)

    def _later(self, aor: str, ctids: list[int], now: float) -> None:
        """Look at these bindings again in a second, until the store can take their removal."""
        for ctid in ctids:
            self.state.schedule.at(aor, ctid, now + 1.0)

    def _expired(self, record: AorRecord, left: AorRecord, gone: list[Binding], now: float) -> None:
        state = self.state
        state.stats.expired += len(gone)
        meta = record.meta
        if meta is None:
            return
        if state.settings.mode is Mode.CONTACT:
            self.withdraw_contacts(meta, gone)
        elif state.settings.mode is Mode.AOR and not left.valid_bindings(now):
            self.send(deregister.aor_deregister(meta, state.tag()), deregister.next_hop(meta))

    def orphans_expired(self, before: AorRecord, gone: list[Binding], now: float) -> None:
        """Bindings of a dead process ran out their lease; this process won the claim to de-register them."""
        state = self.state
        left = before.copy()
        for binding in gone:
            left.bindings.pop(binding.ctid, None)
        if state.settings.mode is Mode.AOR:
            try:
                current = state.store.load(before.aor)
            except Pending as wait:
                state.park(wait.key, partial(self.orphans_expired, before, gone))
                return
            except StoreUnavailable:
                current = None
            if current is not None:
                left = current
        log.info("%d binding(s) of %s outlived their process: de-registering", len(gone), before.aor)
        self._expired(before, left, gone, now)

    def withdraw_contacts(self, meta: MainMeta, bindings: list[Binding]) -> None:
        """Mode contact: one De-REGISTER per binding the main registrar still holds (behaviour §5.4)."""
        for binding in bindings:
            request = deregister.contact_deregister(meta, binding, self.state.tag())
            self.send(request, deregister.next_hop(meta))

    def send(self, request: Request | None, peer: Peer) -> None:
        """Send a generated De-REGISTER (None: there was nothing to withdraw) and remember it for a retry."""
        if request is None:
            return
        original = request.copy()  # before the stack adds its Via: a retry starts from this
        handle = self.state.stack.send_request(request, peer)
        self._originated[handle] = (original, peer)
        self.state.stats.deregisters_sent += 1
        log.debug("De-REGISTER sent for %s", request.headers.get("contact"))

    def client_result(self, event: ClientResult) -> None:
        """A challenged De-REGISTER is sent once more with credentials and CSeq+1 (T57)."""
        sent = self._originated.pop(event.handle, None)
        status = event.response.status
        if sent is None:
            return
        answers = self.state.stats.deregister_answers
        answers[status] = answers.get(status, 0) + 1
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
        answer = digest.authorization(challenge, creds, "REGISTER", str(original.uri), self.state.tag())
        retry.headers.add("Authorization" if status == 401 else "Proxy-Authorization", answer)
        self.send(retry, peer)
