"""Orphan claims: taking over the contacts of a process that died.

A binding key goes in one of two ways: its owner deletes it, writing a claim key
``claims/<ctid>/<mod_revision>`` in the same transaction (the owner sends any De-REGISTER itself), or its
lease runs out because its owner is gone. Every process watches the deletes; one without a claim key at the
same revision is an orphan, and every process races to create that claim key: the one transaction that
creates it wins, so exactly one process sends the De-REGISTERs.

:class:`OrphanWatch` collects the watch's deletes until the end of the watch response (the events of one
revision come in one response) and groups the unclaimed ones by (revision, AoR); :func:`race` is the
create-only claim.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from registrar.records import Binding
from registrar.store.etcd_client import EtcdClient, KeyValue, LeasePool, absent, op_put
from registrar.store.etcd_layout import EtcdKeys, encode_claim

CLAIM_TTL = 300.0  # claim keys outlive any watcher that could still see the delete they guard


@dataclass(slots=True)
class Orphans:
    """Bindings of one AoR whose lease ran out at revision ``rev`` (``gone``: contact id and the key's last
    value), and the AoR's head when it went at the same revision."""

    rev: int
    aor: str
    gone: list[tuple[int, KeyValue]]
    head: KeyValue | None


class OrphanWatch:
    """Deletes and claim keys seen by the watch, handed to ``found`` grouped once the response is over."""

    def __init__(self, found: Callable[[list[Orphans]], None]) -> None:
        self._found = found
        self._deleted: list[tuple[int, str, int, KeyValue]] = []  # (revision, aor, ctid, prev_kv)
        self._heads: dict[tuple[int, str], KeyValue] = {}
        self._claimed: set[tuple[int, int, int]] = set()  # (revision, ctid, binding mod_revision)
        self._flush: asyncio.Handle | None = None

    def binding_deleted(self, rev: int, aor: str, ctid: int, prev: KeyValue) -> None:
        self._deleted.append((rev, aor, ctid, prev))
        self._schedule()

    def head_deleted(self, rev: int, aor: str, prev: KeyValue) -> None:
        self._heads[(rev, aor)] = prev
        self._schedule()

    def claim_created(self, rev: int, ctid: int, mod_revision: int) -> None:
        self._claimed.add((rev, ctid, mod_revision))

    def _schedule(self) -> None:
        if self._flush is None:
            # After the rest of this watch response: the events of one revision come in one response.
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand over the bindings deleted without a claim key written at the same revision."""
        self._flush = None
        deleted, self._deleted = self._deleted, []
        heads, self._heads = self._heads, {}
        claimed, self._claimed = self._claimed, set()
        groups: dict[tuple[int, str], list[tuple[int, KeyValue]]] = {}
        for rev, aor, ctid, prev in deleted:
            if (rev, ctid, prev.mod_revision) in claimed:
                continue  # deleted by a write that claimed it (its writer sends any De-REGISTER)
            groups.setdefault((rev, aor), []).append((ctid, prev))
        if groups:
            self._found(
                [Orphans(rev, aor, gone, heads.get((rev, aor))) for (rev, aor), gone in groups.items()]
            )

    def cancel(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


async def race(
    client: EtcdClient,
    keys: EtcdKeys,
    pool: LeasePool,
    member: str,
    gone: list[tuple[Binding, int]],
    now: float,
) -> bool:
    """Create the claim keys of ``gone`` (binding, mod_revision of its deleted key) in one create-only
    transaction: True when this member won them."""
    claims = [keys.claim(b.ctid, mod_revision) for b, mod_revision in gone]
    lease = await pool.lease_for(now + CLAIM_TTL)
    value = encode_claim(member)
    result = await client.txn([absent(k) for k in claims], [op_put(k, value, lease) for k in claims])
    return result.succeeded
