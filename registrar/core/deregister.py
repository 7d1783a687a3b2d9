"""Generated De-REGISTERs (SPEC §5.4 per contact, §6.4 per AoR) and their expiry schedule.

A De-REGISTER is a fresh out-of-dialog REGISTER built from what was stored when the REGISTER was last
relayed: its R-URI, From/To, Call-ID and a CSeq above anything the main registrar has seen for that
Call-ID ([REC] T60), with our contact as the main registrar echoed it and ``expires=0``.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from registrar.core.records import Binding, MainMeta
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
    """The stored next hop, else the stored R-URI (SPEC §5.4, T31)."""
    return peer_for_uri(parse_uri(meta.hop or meta.ruri))


def contact_deregister(meta: MainMeta, binding: Binding, tag: str) -> Request | None:
    """Mode contact: one De-REGISTER for a contact the main registrar still holds (SPEC §5.4)."""
    if binding.main_contact is None or binding.relayed_call_id is None:
        return None
    cseq = binding.relayed_cseq + 1
    return deregister_request(meta, binding.relayed_call_id, cseq, binding.main_contact, tag)


def aor_deregister(meta: MainMeta, tag: str) -> Request | None:
    """Mode aor: one De-REGISTER for the aggregated contact once the AoR is empty (SPEC §6.4)."""
    if meta.no_dr or meta.main_contact is None or meta.call_id is None:
        return None
    return deregister_request(meta, meta.call_id, meta.cseq + 1, meta.main_contact, tag)


@dataclass
class ExpirySchedule:
    """When each binding expires: at most one heap entry per binding, so the heap stays the size of the
    table. A refresh that extends a binding costs nothing here; the entry is moved when it comes due."""

    _heap: list[tuple[float, int, str, int]] = field(default_factory=list)
    _at: dict[int, float] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def schedule(self, aor: str, binding: Binding) -> None:
        current = self._at.get(binding.ctid)
        if current is not None and current <= binding.expires_at:
            return  # the entry comes due first and is moved on then
        self._at[binding.ctid] = binding.expires_at
        heapq.heappush(self._heap, (binding.expires_at, next(self._seq), aor, binding.ctid))

    def next_deadline(self) -> float | None:
        while self._heap:
            at, _, _, ctid = self._heap[0]
            if self._at.get(ctid) == at:
                return at
            heapq.heappop(self._heap)
        return None

    def due(self, now: float) -> list[tuple[str, int]]:
        """(AoR, contact id) of every entry whose time has come; the caller checks the binding itself."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            at, _, aor, ctid = heapq.heappop(self._heap)
            if self._at.get(ctid) == at:
                del self._at[ctid]
                out.append((aor, ctid))
        return out

    def __len__(self) -> int:
        return len(self._at)
