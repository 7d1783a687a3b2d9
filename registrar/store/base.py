"""The store interface every backend implements (DESIGN.md §5).

Reads and writes are synchronous: the in-memory store is the embedded default, and the etcd backend keeps
the bindings its process owns in memory too (an absorbed refresh costs no etcd call), committing through
its own asynchronous writer. Records are :class:`AorRecord` values; a commit replaces the whole AoR.
"""

from __future__ import annotations

from typing import Protocol

from registrar.core.records import AorRecord


class Store(Protocol):
    def load(self, aor: str) -> AorRecord | None:
        """The AoR with its bindings (expired ones included: callers filter on ``now``)."""

    def commit(self, record: AorRecord) -> None:
        """Replace the AoR, keeping the contact-id index in step."""

    def delete(self, aor: str) -> None: ...

    def find_ctid(self, ctid: int) -> AorRecord | None:
        """The AoR holding a contact id, without scanning (mode mirror/contact lookup)."""

    def new_contact_id(self) -> int:
        """A fresh decimal contact id, unique in this store (≤ 20 digits)."""

    def purge_expired(self, now: float) -> int:
        """Drop bindings (and empty AoRs) whose expiry has passed; returns how many bindings went."""

    def counts(self) -> tuple[int, int]:
        """(AoRs, bindings) held."""
