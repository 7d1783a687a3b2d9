"""Generated De-REGISTERs (behaviour §5.4 per contact, §6.4 per AoR) and their expiry schedule.

A De-REGISTER is a fresh out-of-dialog REGISTER built from what was stored when the REGISTER was last
relayed: its R-URI, From/To, Call-ID and a CSeq above anything the main registrar has seen for that
Call-ID ([REC] T60), with our contact as the main registrar echoed it and ``expires=0``.
"""

from __future__ import annotations

import heapq
import math
from array import array

from registrar.records import Binding, MainMeta
from registrar.sip.message import Header, Headers, Request
from registrar.sip.transport import Peer, peer_for_uri
from registrar.sip.uri import parse_uri


def deregister_request(meta: MainMeta, call_id: str, cseq: int, contact: str, tag: str) -> Request:
    items = [
        Header("From", f"<{meta.from_uri}>;tag={tag}"),
        Header("To", f"<{meta.to_uri}>"),
        Header("Call-ID", call_id),
        Header("CSeq", f"{cseq} REGISTER"),
        Header("Contact", f"<{contact}>;expires=0"),
        Header("Content-Length", "0"),
    ]
    return Request("REGISTER", meta.ruri, Headers(items))


def next_hop(meta: MainMeta) -> Peer:
    """The stored next hop, else the stored R-URI (behaviour §5.4, T31)."""
    return peer_for_uri(parse_uri(meta.hop or meta.ruri))


def contact_deregister(meta: MainMeta, binding: Binding, tag: str) -> Request | None:
    """Mode contact: one De-REGISTER for a contact the main registrar still holds (behaviour §5.4)."""
    if binding.main_contact is None or binding.relayed_call_id is None:
        return None
    cseq = binding.relayed_cseq + 1
    return deregister_request(meta, binding.relayed_call_id, cseq, binding.main_contact, tag)


def aor_deregister(meta: MainMeta, tag: str) -> Request | None:
    """Mode aor: one De-REGISTER for the aggregated contact once the AoR is empty (behaviour §6.4)."""
    if meta.no_dr or meta.main_contact is None or meta.call_id is None:
        return None
    return deregister_request(meta, meta.call_id, meta.cseq + 1, meta.main_contact, tag)


class ExpirySchedule:
    """When each binding expires: a wheel of one-second slots holding (time, AoR, contact id) entries in
    flat arrays, 24 bytes each (the AoR text is the store's), and a heap for the slots that have come due.

    A binding always has an entry at or before its expiry: committing a binding that expires no earlier
    than the one it replaces adds nothing (the old entry comes due first and is moved on by the caller);
    only a new or shortened binding adds one, leaving a stale entry that finds nothing to do. Entries for
    a binding that coincide come out of :meth:`due` once.
    """

    def __init__(self) -> None:
        self._slots: dict[int, tuple[array[float], list[str], array[int]]] = {}
        self._seconds: list[int] = []  # heap of the slots' seconds
        self._due: list[tuple[float, str, int]] = []  # heap of the entries of opened slots
        self._opened = -math.inf  # slots below this second have been opened: entries go to _due
        self._size = 0

    def schedule(self, aor: str, binding: Binding, previous: Binding | None = None) -> None:
        """Make sure ``binding`` is looked at when it expires; ``previous`` is the binding it replaces."""
        if previous is not None and previous.expires_at <= binding.expires_at:
            return
        self.at(aor, binding.ctid, binding.expires_at)

    def at(self, aor: str, ctid: int, at: float) -> None:
        """Look at a contact id at ``at`` (a retry when its AoR could not be read)."""
        second = math.floor(at)
        self._size += 1
        if second < self._opened:
            heapq.heappush(self._due, (at, aor, ctid))
            return
        slot = self._slots.get(second)
        if slot is None:
            slot = self._slots[second] = (array("d"), [], array("Q"))
            heapq.heappush(self._seconds, second)
        slot[0].append(at)
        slot[1].append(aor)
        slot[2].append(ctid)

    def next_deadline(self) -> float | None:
        if not self._due and self._seconds:
            self._open()
        return self._due[0][0] if self._due else None

    def due(self, now: float) -> list[tuple[str, int]]:
        """(AoR, contact id) of every entry whose time has come; the caller checks the binding itself."""
        while self._seconds and self._seconds[0] <= now:
            self._open()
        out: dict[tuple[str, int], None] = {}
        while self._due and self._due[0][0] <= now:
            _, aor, ctid = heapq.heappop(self._due)
            out[aor, ctid] = None
            self._size -= 1
        return list(out)

    def _open(self) -> None:
        second = heapq.heappop(self._seconds)
        self._due.extend(zip(*self._slots.pop(second), strict=True))
        heapq.heapify(self._due)
        self._opened = second + 1

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return self._size
