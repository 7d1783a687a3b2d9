"""What the parts of one process's mid-registrar share: the stack, the store, the clocks of its bindings.

One :class:`CoreState` per process, handed to :mod:`~registrar.core.registration`,
:mod:`~registrar.core.routing` and :mod:`~registrar.core.expiry`. It lives in this process's memory only;
the registration state shared with other processes is the store's (architecture "Shared state in etcd").
Besides the fields it does the two things every part does with the store: park work until a key is ready,
and commit one decision.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from registrar.config import Settings
from registrar.core.deregister import ExpirySchedule
from registrar.core.handoff import HandoffKeys
from registrar.records import AorRecord
from registrar.sip.stack import Stack
from registrar.sip.transport import Peer
from registrar.sip.uri import URI
from registrar.store.base import Store

FLOW_GRACE = 10.0  # a TCP flow outlives the last binding it carries by this much (behaviour §4.3, T64)


@dataclass
class CoreStats:
    registers_relayed: int = 0
    registers_answered: int = 0
    template_answers: int = 0  # of those, answered from a refresh template (registrar.core.refresh)
    register_errors: int = 0
    deregisters_sent: int = 0
    deregister_answers: dict[int, int] = field(default_factory=dict)  # final status (408: none came) → count
    expired: int = 0
    unavailable: int = 0  # requests answered 503 because the store could not be reached
    handoffs: int = 0  # requests handed to the process holding the phone's flow
    handoffs_refused: int = 0  # hand-off headers not trusted (bad MAC, stale, unknown sender): ignored
    lookups: dict[str, int] = field(default_factory=dict)
    auth_failures: int = 0  # wrong answers to the local digest challenge (registrar.core.gate)
    auth_refused: dict[str, int] = field(default_factory=dict)  # "source"/"user" in back-off → refused


@dataclass(eq=False)
class CoreState:
    """The per-process state of the core; see the module docstring."""

    settings: Settings
    stack: Stack
    store: Store
    rng: random.Random
    main_uri: URI  # the main registrar's URI: a relayed REGISTER's Request-URI
    main_peer: Peer  # where relayed REGISTERs go: the outbound proxy, else the main registrar
    stats: CoreStats = field(default_factory=CoreStats)
    schedule: ExpirySchedule = field(default_factory=ExpirySchedule)  # bindings this process owns
    flows: dict[int, float] = field(default_factory=dict)  # TCP connection id → keep open until
    parked: dict[str, list[Callable[[float], None]]] = field(default_factory=dict)  # key → work waiting
    tickets: dict[int, tuple[Callable[[], None], Callable[[float], None] | None]] = field(
        default_factory=dict
    )  # write in flight → (what it was for, what to do if it lost)
    draining: bool = False  # the process is shutting down: phones are sent elsewhere
    handoff_keys: HandoffKeys | None = None  # sign and verify hand-offs (None: trust members' addresses)

    def park(self, key: str, work: Callable[[float], None]) -> None:
        """Run ``work(now)`` once the store reports ``key`` ready."""
        self.parked.setdefault(key, []).append(work)

    def commit(
        self,
        aor: str,
        record: AorRecord | None,
        old: AorRecord | None,
        now: float,
        then: Callable[[], None] | None = None,
        again: Callable[[float], None] | None = None,
    ) -> None:
        """Store ``record`` in place of ``old`` (the AoR as loaded), then schedule what is new or shortened
        and run ``then``. With a networked store that happens once the write is in; if it lost its
        compare-and-swap, ``again`` decides afresh (architecture "Shared state in etcd": one transaction
        per decision)."""
        store = self.store
        if record is None or not record.bindings:
            ticket = store.delete(aor, old, now)
        else:
            before = old.bindings if old is not None else {}
            me = store.member_id
            for ctid, binding in record.bindings.items():
                if binding.owner != me and binding is not before.get(ctid):
                    record.bindings[ctid] = replace(binding, owner=me)  # this process holds its flow now
            ticket = store.commit(record, old, now)
        if ticket is None:
            self._committed(record, old, then)
        else:
            self.tickets[ticket] = (partial(self._committed, record, old, then), again)

    def _committed(
        self, record: AorRecord | None, old: AorRecord | None, then: Callable[[], None] | None
    ) -> None:
        """The write is in: look at this process's bindings when they expire and keep their flows open."""
        if record is not None and record.bindings:
            before = old.bindings if old is not None else {}
            flows = self.flows
            for binding in record.bindings.values():
                if not self.store.owns(binding):
                    continue
                previous = before.get(binding.ctid)
                if previous is not None and previous.owner != binding.owner:
                    previous = None  # taken over from another process: nothing here looks at it yet
                self.schedule.schedule(record.aor, binding, previous)
                conn = binding.source.conn
                if conn is not None and flows.get(conn, 0.0) < binding.expires_at + FLOW_GRACE:
                    flows[conn] = binding.expires_at + FLOW_GRACE
        if then is not None:
            then()

    def cap(self) -> int | None:
        """While draining, phones are told to come back within drain_expires (architecture "Networking and
        flow ownership")."""
        return self.settings.drain_expires if self.draining else None

    def tag(self) -> str:
        """A From tag (or cnonce) for a request this process originates."""
        return f"{self.rng.getrandbits(48):012x}"
