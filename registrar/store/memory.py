"""The embedded in-memory store: one process, no dependencies (DESIGN.md §1)."""

from __future__ import annotations

import random

from registrar.core.records import AorRecord


class MemoryStore:
    """Dict-backed store with a contact-id index. Not shared between processes."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._aors: dict[str, AorRecord] = {}
        self._ctids: dict[int, str] = {}
        self._rng = rng or random.SystemRandom()
        self._revision = 0

    def load(self, aor: str) -> AorRecord | None:
        return self._aors.get(aor)

    def commit(self, record: AorRecord) -> None:
        old = self._aors.get(record.aor)
        if old is not None:
            for ctid in old.bindings.keys() - record.bindings.keys():
                self._ctids.pop(ctid, None)
        if not record.bindings:
            self._aors.pop(record.aor, None)
            return
        self._revision += 1
        record.version = self._revision
        self._aors[record.aor] = record
        for ctid in record.bindings:
            self._ctids[ctid] = record.aor

    def delete(self, aor: str) -> None:
        old = self._aors.pop(aor, None)
        if old is not None:
            for ctid in old.bindings:
                self._ctids.pop(ctid, None)

    def find_ctid(self, ctid: int) -> AorRecord | None:
        aor = self._ctids.get(ctid)
        return None if aor is None else self._aors.get(aor)

    def new_contact_id(self) -> int:
        while True:
            ctid = self._rng.getrandbits(63)
            if ctid and ctid not in self._ctids:
                return ctid

    def purge_expired(self, now: float) -> int:
        gone = 0
        for aor, record in list(self._aors.items()):
            expired = [c for c, b in record.bindings.items() if not b.valid(now)]
            if expired:
                gone += len(expired)
                kept = AorRecord(aor, {c: b for c, b in record.bindings.items() if b.valid(now)})
                self.commit(kept)
        return gone

    def counts(self) -> tuple[int, int]:
        return len(self._aors), sum(len(r.bindings) for r in self._aors.values())
