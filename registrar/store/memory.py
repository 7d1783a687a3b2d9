"""The embedded in-memory store: one process, no dependencies (docs/architecture.md).

Records are held marshalled, one bytes object per AoR (~400 bytes with one contact) instead of the ~15
objects of a live record (~2 KB with object headers, GC links and allocator rounding): issue 3 asks for
≤ 1 KB per contact at 100,000 contacts. Bytes are also invisible to the cyclic GC, so a full collection no
longer walks every binding. ``load`` decodes into a fresh record (~3.5 µs), which callers may change.
"""

from __future__ import annotations

import marshal
import random
from collections.abc import Callable

from registrar.records import AorRecord, Binding


class MemoryStore:
    """Dict-backed store with a contact-id index. Not shared between processes: it owns every binding, and
    every change is done when ``commit`` returns."""

    member_id = "local"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._aors: dict[str, bytes] = {}
        self._ctids: dict[int, str] = {}
        self._rng = rng or random.SystemRandom()
        self._revision = 0
        self._bindings = 0
        # The value load() decoded last and its contact ids: a commit right after a load (every REGISTER)
        # then knows which ids the stored value holds without decoding it a second time.
        self._loaded: tuple[bytes, list[int]] | None = None
        self.released: Callable[[int], None] | None = None

    def load(self, aor: str) -> AorRecord | None:
        data = self._aors.get(aor)
        if data is None:
            return None
        record = AorRecord.from_tuple(aor, marshal.loads(data))
        self._loaded = (data, list(record.bindings))
        # Hand out the AoR text the index holds, so that what callers keep of it (the expiry schedule)
        # shares one copy. Every stored AoR has a binding, and the index maps it to this AoR.
        held = self._ctids.get(next(iter(record.bindings)))
        if held == aor:
            record.aor = held
        return record

    def commit(self, record: AorRecord, old: AorRecord | None, now: float) -> None:
        aor = record.aor
        held = self._held_ctids(aor)
        if held:
            aor = self._ctids.get(held[0], aor)  # the text the index holds (see load)
            self._bindings -= len(held)
            for ctid in held:
                if ctid not in record.bindings:
                    self._release(ctid)
        if not record.bindings:
            self._aors.pop(aor, None)
            return
        self._revision += 1
        record.version = self._revision
        self._aors[aor] = marshal.dumps(record.to_tuple())
        self._bindings += len(record.bindings)
        for ctid in record.bindings:
            self._ctids[ctid] = aor
        return None

    def delete(self, aor: str, old: AorRecord | None, now: float) -> None:
        held = self._held_ctids(aor)
        if held:
            del self._aors[aor]
            self._bindings -= len(held)
            for ctid in held:
                self._release(ctid)

    def _release(self, ctid: int) -> None:
        """Binding ``ctid`` was removed: out of the index, and ``released`` told."""
        self._ctids.pop(ctid, None)
        if self.released is not None:
            self.released(ctid)

    def _held_ctids(self, aor: str) -> list[int]:
        data = self._aors.get(aor)
        if data is None:
            return []
        loaded = self._loaded
        if loaded is not None and loaded[0] is data:
            return loaded[1]
        return AorRecord.tuple_ctids(marshal.loads(data))

    def find_ctid(self, ctid: int) -> AorRecord | None:
        aor = self._ctids.get(ctid)
        return None if aor is None else self.load(aor)

    def owns(self, binding: Binding) -> bool:
        return True

    def member_address(self, member: str) -> str | None:
        return None

    def clock_offset(self, member: str) -> float:
        return 0.0

    def new_contact_id(self) -> int:
        while True:
            ctid = self._rng.getrandbits(63)
            if ctid and ctid not in self._ctids:
                return ctid

    def counts(self) -> tuple[int, int]:
        return len(self._aors), self._bindings
