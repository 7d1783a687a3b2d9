"""The owner's overlay: which changes the process holding a phone's flow keeps in its own memory instead of
writing them to etcd (the write budget), and how its peers read what it did not write.

A phone refreshes every minute or so; writing each refresh would cost one etcd transaction per REGISTER.
The owner instead writes a binding with a ``hold`` (at most ``etcd_hold`` past its expiry) on a lease
ending then, and answers later refreshes from memory while nothing its peers need has changed and the lease
would not lapse before the new expiry. docs/architecture.md "Shared state in etcd" gives the staleness bound.

:func:`plan_commit` is that rule as a pure function of the AoR before and after, what etcd holds, this
member, the margin and the clock (no I/O, no time read), so that every branch is tested on plain numbers;
:func:`renewal_hold` spreads the rewrites over time; :func:`foreign_expiry` is its reading side;
:class:`Overlay` keeps what the owner did not write.
"""

from __future__ import annotations

import marshal
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from operator import attrgetter
from typing import NamedTuple

from registrar.records import AorRecord, Binding

# What a steady-state refresh changes: the owner keeps these in memory only. Anything else is what peers need.
REFRESHED = frozenset({"cseq", "expires_at", "updated_at", "owner", "relayed_cseq"})
_peers_need = attrgetter(*(f.name for f in fields(Binding) if f.name not in REFRESHED))


class Held(NamedTuple):
    """What etcd holds of one binding: its owner, when its lease ends, and its key's mod_revision."""

    owner: str | None
    hold: float
    mod_revision: int


@dataclass(slots=True)
class WritePlan:
    """What a commit does. ``changed``: the bindings that differ from the AoR as loaded, now owned by this
    member (the caller puts them into its record). Without ``write`` they only go to the overlay; with it,
    one transaction puts each of them with its ``holds`` entry, deletes ``removed`` (ctid, mod_revision)
    with their claim keys, and puts the head on a lease ending at ``head_hold`` (deletes it when None)."""

    write: bool
    changed: list[Binding]
    holds: dict[int, float]
    removed: list[tuple[int, int]]
    head_hold: float | None


def plan_commit(
    old: AorRecord | None,
    new: AorRecord,
    stored: Mapping[int, Held],
    member: str,
    *,
    margin: float,
    hold: float,
    now: float,
) -> WritePlan:
    """Decide a commit of ``new`` in place of ``old`` (the AoR as loaded; None: a create). It writes when a
    binding was added or removed, the meta changed, or a changed binding is new to etcd, owned there by
    another member, differs in anything but :data:`REFRESHED`, or would expire later than ``margin``
    before its lease ends; a written binding's hold is :func:`renewal_hold` of its expiry (of ``now`` when
    expired). ``old`` and ``new`` are left as they are."""
    before = old.bindings if old is not None else {}
    write = new.meta != (old.meta if old is not None else None) or any(c not in new.bindings for c in before)
    changed: list[Binding] = []
    for ctid, binding in new.bindings.items():
        prev = before.get(ctid)
        if prev is not None and binding == prev:
            continue
        if binding.owner != member:
            binding = replace(binding, owner=member)
        changed.append(binding)
        if write:
            continue
        held = stored.get(ctid)
        write = (
            prev is None
            or held is None
            or held.owner != member
            or _peers_need(binding) != _peers_need(prev)
            or binding.expires_at + margin > held.hold
        )
    if not write:
        return WritePlan(False, changed, {}, [], None)
    holds = {b.ctid: renewal_hold(b.ctid, max(b.expires_at, now), hold=hold, margin=margin) for b in changed}
    removed = [(c, held.mod_revision) for c, held in stored.items() if c not in new.bindings]
    kept = [holds[c] if c in holds else stored[c].hold for c in new.bindings]
    return WritePlan(True, changed, holds, removed, max(kept) if kept else None)


_PHASE_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: neighbouring contact ids land far apart on the grid


def renewal_hold(ctid: int, base: float, *, hold: float, margin: float) -> float:
    """The hold to write for binding ``ctid`` expiring at ``base``: the latest point on the binding's own
    grid (period ``hold - margin``, phase drawn from the contact id) that is at most ``hold`` after ``base``,
    so always more than ``margin`` after it.

    A binding is rewritten when its expiry comes within ``margin`` of its hold. Were the hold simply
    ``base + hold``, phones that registered together (after an outage, a restart of the SBC in front) would
    renew together every ``hold - margin`` seconds for as long as they stay: one etcd write per phone within
    a few seconds, every nine minutes. On the grid, each binding is rewritten every ``hold - margin``
    seconds at its own phase, so renewals spread evenly over the period from the first one on, whenever
    the phones came; a process that takes a binding over keeps its phase. The cost: a binding's first
    renewal comes on average half a period early."""
    period = hold - margin
    top = base + hold
    if period <= 0:
        return top
    phase = ((ctid * _PHASE_MIX) & 0xFFFFFFFFFFFFFFFF) / 2**64 * period
    return top - (top - phase) % period


def foreign_expiry(written: float, lifetime: int, hold: float, now: float) -> float:
    """When a binding that another process owns expires, as this one shows it (200 OKs, /v1/aors, lookups).

    The owner answers the phone's refreshes without writing them until the lease would lapse, so the written
    expiry can be long past while the phone is registered: the owner vouches for the binding until ``hold``,
    and it must stay valid (routable) until then. The lifetime shown must still be one the phone's siblings
    can believe: the written expiry while it lies ahead, then one granted lifetime from now (the phone
    refreshes within it), never beyond the hold."""
    if written > now:
        return min(written, hold)
    if lifetime > 0:
        return min(now + lifetime, hold)
    return hold


class Overlay:
    """The bindings this process owns in a newer state than etcd holds, packed (``marshal`` of the
    positional form: bytes are small and invisible to the cyclic GC), by contact id."""

    __slots__ = ("_packed",)

    def __init__(self) -> None:
        self._packed: dict[int, bytes] = {}

    def keep(self, binding: Binding) -> None:
        self._packed[binding.ctid] = marshal.dumps(binding.to_tuple())

    def get(self, ctid: int) -> Binding | None:
        packed = self._packed.get(ctid)
        return None if packed is None else Binding.from_tuple(marshal.loads(packed))

    def drop(self, ctid: int) -> None:
        self._packed.pop(ctid, None)

    def clear(self) -> None:
        self._packed.clear()

    def __contains__(self, ctid: int) -> bool:
        return ctid in self._packed

    def __len__(self) -> int:
        return len(self._packed)
