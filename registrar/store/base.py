"""The store interface every backend implements (docs/architecture.md "Store seam").

The core is synchronous and never awaits: it reads and writes through this interface, and a backend that
needs the network (etcd) answers from its own memory when it can and otherwise tells the core to wait:

- ``load``/``find_ctid`` raise :class:`Pending` when the data is not in memory yet (or a write of that AoR
  is in flight). The core parks its work under ``Pending.key`` and runs it again when the backend calls
  :meth:`StoreListener.store_ready` with that key.
- ``commit``/``delete`` return ``None`` when the change is done (the memory store; the etcd store when
  nothing other processes need has changed), else a ticket. The core keeps what it must do after the write
  (reply, relay, send a De-REGISTER) under that ticket, and the backend reports the compare-and-swap outcome
  with :meth:`StoreListener.store_committed`. On a conflict the backend has already dropped its stale copy:
  the core decides again from scratch.
- Any of them raise :class:`StoreUnavailable` while the backend cannot reach its data: the core answers
  503 with Retry-After and never guesses. A backend may answer reads from memory while it cannot write
  (etcd during an outage), so ``commit``/``delete`` may raise it after ``load`` answered.

Records are :class:`AorRecord` values; a commit replaces the whole AoR (``old`` is the record as loaded,
whose ``version`` is the revision the write compares against).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from registrar.records import AorRecord, Binding


class Pending(Exception):
    """Not in memory yet: park under ``key`` and retry on ``store_ready(key)``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class StoreUnavailable(Exception):
    """The backend cannot reach its data (etcd down): answer 503, never guess."""


def aor_key(aor: str) -> str:
    """The ``Pending`` key of an AoR."""
    return "aor:" + aor


def ctid_key(ctid: int) -> str:
    """The ``Pending`` key of a contact-id lookup."""
    return f"ctid:{ctid}"


class StoreListener(Protocol):
    """What a backend with asynchronous I/O reports to the core (called on the event loop, outside any core
    call; the shell drains the SIP stack afterwards)."""

    def store_ready(self, key: str) -> None:
        """Work parked under ``key`` can run again (data fetched, write finished, or failed)."""

    def store_committed(self, ticket: int, ok: bool) -> None:
        """A ticketed write succeeded (``ok``) or lost its compare-and-swap / could not be done."""

    def orphans_expired(self, before: AorRecord, gone: list[Binding]) -> None:
        """Bindings whose owner process is gone reached their lease's end and were deleted; this process won
        the create-only claim, so it alone sends their De-REGISTERs. ``before`` is the AoR as it was."""

    def availability_changed(self, available: bool) -> None:
        """The backend lost or regained its data source (readiness follows it)."""


class Store(Protocol):
    member_id: str  # this process's id; bindings this process holds the flow of carry it as ``owner``
    # Called with the contact id of each binding this process stops holding: removed (by this process or
    # another), or now held by another process. Set by the core: its refresh templates stand for such
    # bindings, and a phone that has left never sends again to drop its own.
    released: Callable[[int], None] | None

    def load(self, aor: str) -> AorRecord | None:
        """The AoR with its bindings (expired ones included: callers filter on ``now``)."""

    def commit(self, record: AorRecord, old: AorRecord | None, now: float) -> int | None:
        """Replace the AoR (``old`` as loaded), keeping the contact-id index in step; ``now`` is the
        caller's clock (what a networked store may keep unwritten depends on it)."""

    def delete(self, aor: str, old: AorRecord | None, now: float) -> int | None: ...

    def find_ctid(self, ctid: int) -> AorRecord | None:
        """The AoR holding a contact id, without scanning (mode mirror/contact lookup)."""

    def new_contact_id(self) -> int:
        """A fresh decimal contact id, unique in this store (≤ 20 digits)."""

    def owns(self, binding: Binding) -> bool:
        """Whether this process holds the binding's flow (and so its expiry timer and De-REGISTER)."""

    def member_address(self, member: str) -> str | None:
        """The internal SIP address (``transport:host:port``) of a live member, None when it is gone."""

    def clock_offset(self, member: str) -> float:
        """Seconds a live member's wall clock is ahead of ours, as measured (0 when unknown)."""

    def counts(self) -> tuple[int, int]:
        """(AoRs, bindings) held."""
