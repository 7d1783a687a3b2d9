"""What one registrar process last read from etcd: fetched AoRs and the contact-id index.

The core is synchronous and the etcd store answers it from here; the watch drops what changed elsewhere.
Only AoRs that have bindings (or a head) are kept until the watch or the size limit drops them: what etcd
was found not to hold (an AoR whose last binding was deleted, a user nobody registered, an unknown contact id)
is remembered for :data:`ABSENT_TTL` seconds only, so that the work a fetch was for, run again at once, finds
the answer, while departed phones and calls to unknown users leave nothing behind (soak, issue 15 item 6).
An AoR is held packed (one ``marshal`` blob of plain values) as etcd held it at one revision, and decoded
per load: for its owner a binding reads as the owner's overlay holds it, for a peer with the expiry the
owner vouches for (:func:`~registrar.store.overlay.foreign_expiry`) and without the owner's connection.
"""

from __future__ import annotations

import itertools
import marshal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from registrar.records import AorRecord, Binding, MainMeta
from registrar.store.overlay import Held, Overlay, foreign_expiry

CACHE_LIMIT = 200_000  # fetched AoRs (and contact ids) kept; the oldest go first
# How long "etcd holds no such AoR / contact id" is used: a transaction's life (64·T1), so that the parked
# work a fetch was for, and the 2xx of a first REGISTER relayed meanwhile, find it; one fetch per call to an
# unknown user at most. At most ABSENT_LIMIT of them (the oldest go first): ~100 bytes each.
ABSENT_TTL = 32.0
ABSENT_LIMIT = 20_000
_NO_ITEMS = marshal.dumps(())

# One binding as cached: (ctid, owner, hold, mod_revision, Binding.to_tuple()).
Item = tuple[int, str | None, float, int, tuple[Any, ...]]


def cached_item(binding: Binding, hold: float, mod_revision: int) -> Item:
    return (binding.ctid, binding.owner, hold, mod_revision, binding.to_tuple())


class CachedAor:
    """A fetched AoR: ``rev`` is the revision it is known at (events up to it are in), ``version`` the head's
    mod_revision (0: no head), ``data`` its bindings (:data:`Item`), packed."""

    __slots__ = ("data", "meta", "rev", "version")

    def __init__(self, rev: int, version: int, meta: MainMeta | None, items: tuple[Item, ...]) -> None:
        self.rev = rev
        self.version = version
        self.meta = meta
        self.data = marshal.dumps(items)

    @classmethod
    def absent(cls) -> CachedAor:
        """An AoR never written: a create compares its head absent."""
        return cls(0, 0, None, ())

    @property
    def empty(self) -> bool:
        """etcd holds nothing of this AoR: no head, no binding."""
        return not self.version and self.data == _NO_ITEMS

    def items(self) -> dict[int, Item]:
        return {item[0]: item for item in marshal.loads(self.data)}

    def held(self) -> dict[int, Held]:
        return {i[0]: Held(i[1], i[2], i[3]) for i in marshal.loads(self.data)}

    def record(self, aor: str, member: str, overlay: Overlay, now: float) -> AorRecord | None:
        """The AoR as ``member`` sees it at ``now``; None when etcd holds nothing of it."""
        items: tuple[Item, ...] = marshal.loads(self.data)
        if not self.version and not items:
            return None
        bindings: dict[int, Binding] = {}
        for ctid, owner, hold, _rev, values in items:
            own = overlay.get(ctid) if owner == member else None
            if own is not None:
                bindings[ctid] = own
                continue
            binding = Binding.from_tuple(values)  # a fresh object: set before anyone shares it
            binding.expires_at = foreign_expiry(binding.expires_at, binding.local_expires, hold, now)
            if binding.source.conn is not None:
                binding.source = replace(binding.source, conn=None)  # a connection of the owner process
            bindings[ctid] = binding
        return AorRecord(aor, bindings, self.version, self.meta)


class AorCache:
    """Fetched AoRs by name (bounded, oldest first out) and the contact-id index ``ctids`` (ctid → AoR, ""
    while etcd has no such contact id).

    What etcd was found not to hold, an AoR or a contact id, is kept apart in ``_absent`` (key → until when,
    by ``clock``, and the revision it was read at) and answered for :data:`ABSENT_TTL` seconds: the watch
    drops it sooner when the AoR is written. ``len()`` counts the AoRs held, not those.

    A read (fetch, or a compare-and-swap that returns the AoR) answers at some revision while the watch
    goes on: ``changed`` drops a copy older than a change the watch showed and, while reads are in flight,
    remembers the change's revision, so that a read that started before it is known ``stale``."""

    __slots__ = ("_absent", "_aors", "_clock", "_reads", "_recent", "ctids")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._aors: dict[str, CachedAor] = {}
        self.ctids: dict[int, str] = {}
        self._absent: dict[str | int, tuple[float, int]] = {}  # AoR or ctid etcd lacks → (until, revision)
        self._clock = clock
        self._reads = 0
        self._recent: dict[str, int] = {}  # AoR → last revision the watch showed, while reads are in flight

    def get(self, aor: str) -> CachedAor | None:
        entry = self._aors.get(aor)
        if entry is None:
            absent = self._absent.get(aor)
            if absent is not None:
                if absent[0] > self._clock():
                    return CachedAor(absent[1], 0, None, ())
                self._expire()
        return entry

    def put(self, aor: str, entry: CachedAor) -> None:
        aors = self._aors
        aors.pop(aor, None)
        if entry.empty:
            self._put_absent(aor, entry.rev)
            return
        self._absent.pop(aor, None)
        if len(aors) >= CACHE_LIMIT:
            for old in list(itertools.islice(aors, len(aors) // 10 + 1)):
                del aors[old]
        aors[aor] = entry

    def drop(self, aor: str) -> CachedAor | None:
        self._absent.pop(aor, None)
        return self._aors.pop(aor, None)

    def clear(self) -> None:
        """Forget every fetched AoR (the contact-id index stays: it only names AoRs)."""
        self._aors.clear()
        self._absent = {k: v for k, v in self._absent.items() if isinstance(k, int)}

    def changed(self, aor: str, rev: int) -> None:
        """The watch showed a change of ``aor`` at ``rev``."""
        if self._reads:
            self._recent[aor] = max(self._recent.get(aor, 0), rev)
        entry = self._aors.get(aor)
        if entry is not None and rev > entry.rev:
            del self._aors[aor]
        absent = self._absent.get(aor)
        if absent is not None and rev > absent[1]:
            del self._absent[aor]

    def reading(self) -> None:
        """A read of etcd starts."""
        self._reads += 1

    def read_done(self) -> None:
        self._reads -= 1
        if self._reads <= 0:
            self._reads = 0
            self._recent.clear()

    def stale(self, aor: str, rev: int) -> bool:
        """Whether a read at ``rev`` is older than a change of ``aor`` the watch has already shown."""
        return self._recent.get(aor, 0) > rev

    def index(self, ctid: int, aor: str) -> None:
        """``aor`` holds ``ctid`` ("": etcd has no such contact id, an answer kept :data:`ABSENT_TTL` s)."""
        if len(self.ctids) >= CACHE_LIMIT:
            self.ctids.clear()
        self.ctids[ctid] = aor
        if not aor:
            self._put_absent(ctid, 0)  # the watch's put of its index key drops it (EtcdStore._on_event)

    def _put_absent(self, key: str | int, rev: int) -> None:
        absent = self._absent
        absent.pop(key, None)
        self._expire()
        if len(absent) >= ABSENT_LIMIT:
            self._forget(next(iter(absent)))
        absent[key] = (self._clock() + ABSENT_TTL, rev)

    def _expire(self) -> None:
        """Forget the absences past their time (oldest first: each is put at the end)."""
        now = self._clock()
        absent = self._absent
        while absent:
            key = next(iter(absent))
            if absent[key][0] > now:
                return
            self._forget(key)

    def _forget(self, key: str | int) -> None:
        del self._absent[key]
        if isinstance(key, int) and self.ctids.get(key) == "":
            del self.ctids[key]

    def __contains__(self, aor: str) -> bool:
        return self.get(aor) is not None

    def __len__(self) -> int:
        """AoRs held (what etcd was found not to hold is not counted)."""
        return len(self._aors)
