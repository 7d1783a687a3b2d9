"""The core over a store that answers later (the etcd store's contract, registrar/store/base.py): parked work,
ticketed writes, compare-and-swap conflicts, an unreachable store, flow owners and the internal hand-off.

``SlowStore`` is the memory store with the networked store's timing made explicit, so that every ordering
is reproducible without etcd; the real backend is exercised in tests/integration/test_etcd_store.py and
test_cluster_etcd.py.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from registrar.core.service import MidRegistrar
from registrar.records import AorRecord, Binding
from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from registrar.store.base import Pending, StoreUnavailable, aor_key
from registrar.store.memory import MemoryStore
from tests.unit.corekit import PHONE, Core, ctid_of, main_ok, register
from tests.unit.stackkit import MAIN, request_bytes

CONTACT = "<sip:alice@192.0.2.10:5062>"
AOR = "alice@example.com"
PEER_B = Peer("udp", "10.0.0.7", 5060)


class SlowStore(MemoryStore):
    """Loads of ``cold`` AoRs wait for a fetch; with ``defer`` every write waits for ``settle``."""

    def __init__(self, member_id: str = "me") -> None:
        super().__init__(random.Random(7))
        self.member_id = member_id
        self.cold: set[str] = set()
        self.fetches: list[str] = []
        self.defer = False
        self.down = False
        self.members: dict[str, str] = {}
        self.writes: dict[int, tuple[AorRecord | None, str]] = {}
        self._ticket = 0

    def load(self, aor: str) -> AorRecord | None:
        if self.down:
            raise StoreUnavailable()
        if aor in self.cold or any(aor == r for r, _ in self.writes.values() if r is None) or self._busy(aor):
            self.fetches.append(aor)
            raise Pending(aor_key(aor))
        return super().load(aor)

    def _busy(self, aor: str) -> bool:
        return any(name == aor for _, name in self.writes.values())

    def commit(self, record: AorRecord, old: AorRecord | None, now: float) -> int | None:  # type: ignore[override]
        if self.down:
            raise StoreUnavailable()
        if not self.defer:
            return super().commit(record, old, now)
        self._ticket += 1
        self.writes[self._ticket] = (record, record.aor)
        return self._ticket

    def settle(self, ticket: int, ok: bool) -> str:
        record, aor = self.writes.pop(ticket)
        if ok and record is not None:
            super().commit(record, None, 0.0)
        return aor

    def owns(self, binding: Binding) -> bool:
        return binding.owner == self.member_id

    def member_address(self, member: str) -> str | None:
        return self.members.get(member)


def _core(mode: str = "contact", **settings: Any) -> tuple[Core, SlowStore]:
    m = Core(mode=mode, outgoing_expires=3600, **settings)
    store = SlowStore()
    m.store = store
    m.core = MidRegistrar(m.settings, m.rig.stack, store, random.Random(1))
    return m, store


def _registered(m: Core, store: SlowStore, expires: int = 60) -> Request:
    m.feed(register(CONTACT, expires=expires, cseq=10), PHONE)
    relayed = m.to_main()
    m.feed(main_ok(relayed, expires=3600, header=3600), MAIN)
    assert m.to_phone().status == 200
    return relayed


def _ready(m: Core, key: str) -> None:
    m.core.store_ready(key, m.now)
    m.rig.drain()


def _settled(m: Core, store: SlowStore, ticket: int, ok: bool) -> None:
    aor = store.settle(ticket, ok)
    m.core.store_committed(ticket, ok, m.now)
    m.rig.drain()
    _ready(m, aor_key(aor))


def _refresh(m: Core, cseq: int) -> None:
    m.feed(register(CONTACT, expires=60, cseq=cseq, branch=f"z9hG4bK-r{cseq}"), PHONE)


def test_register_waits_for_the_fetch_then_goes_on() -> None:
    m, store = _core()
    store.cold.add(AOR)
    m.feed(register(CONTACT, expires=60, cseq=10), PHONE)
    assert m.take() == [] and store.fetches == [AOR]
    assert m.core.waiting == 1
    store.cold.clear()
    _ready(m, aor_key(AOR))
    assert m.to_main().method == "REGISTER"
    assert m.core.waiting == 0


def test_absorbed_refresh_is_answered_once_its_write_is_in() -> None:
    m, store = _core()
    _registered(m, store)
    store.defer = True
    m.advance(30)
    _refresh(m, 11)
    assert m.take() == [], "no 200 before the write is in"
    (ticket,) = store.writes
    _settled(m, store, ticket, True)
    reply = m.to_phone()
    assert reply.status == 200 and "expires=60" in (reply.headers.get("contact") or "")


def test_lost_compare_and_swap_decides_again_from_fresh_state() -> None:
    m, store = _core()
    _registered(m, store)
    store.defer = True
    m.advance(30)
    _refresh(m, 11)
    (ticket,) = store.writes
    _settled(m, store, ticket, False)  # another process won: the refresh is decided once more
    assert m.take() == []
    (again,) = store.writes
    assert again != ticket
    _settled(m, store, again, True)
    assert m.to_phone().status == 200


def test_unreachable_store_answers_503_with_retry_after() -> None:
    m, store = _core()
    store.down = True
    m.feed(register(CONTACT, expires=60, cseq=10), PHONE)
    reply = m.to_phone()
    assert reply.status == 503 and reply.headers.get("retry-after")
    assert m.core.stats.unavailable == 1
    store.down = False
    m.feed(register(CONTACT, expires=60, cseq=11, branch="z9hG4bK-b"), PHONE)
    assert m.to_main().method == "REGISTER", "back to normal without a restart"


def test_expiry_is_timed_by_the_owner_only() -> None:
    m, store = _core()
    _registered(m, store, expires=60)
    record = store.load(AOR)
    assert record is not None
    (binding,) = record.bindings.values()
    assert binding.owner == "me", "the process that took the REGISTER holds the flow"
    taken = record.copy()
    taken.bindings[binding.ctid] = replace(binding, owner="other")
    store.commit(taken, None, 0.0)
    m.advance(61)
    assert [x for x, p in m.take() if isinstance(x, Request)] == [], "the owner sends the De-REGISTER, not us"


def test_a_binding_taken_over_by_a_refresh_expires_at_its_new_owner() -> None:
    """The phone's refreshes went to another process for a while (it held the binding and its expiry), then
    one lands here: this process holds the flow now and must remove the binding, and De-REGISTER it, when
    it expires, not leave it to its lease (the orphan claim, up to --etcd-hold later)."""
    m, store = _core()
    _registered(m, store, expires=60)  # t0: this process's timer looks at it at t0 + 60
    record = store.load(AOR)
    assert record is not None
    (binding,) = record.bindings.values()
    elsewhere = record.copy()  # t0 + 30: refreshed through another process, which holds it now
    elsewhere.bindings[binding.ctid] = replace(binding, owner="other", cseq=11, expires_at=m.now + 90)
    store.commit(elsewhere, None, 0.0)
    m.advance(80)  # t0 + 60 passed: not ours, nothing done
    m.feed(register(CONTACT, expires=60, cseq=12, branch="z9hG4bK-back"), PHONE)  # t0 + 80: back here
    assert m.to_phone().status == 200
    taken = store.load(AOR)
    assert taken is not None and [b.owner for b in taken.bindings.values()] == ["me"]
    m.advance(61)  # silent since: expired at t0 + 140
    sent = [x for x, p in m.take() if isinstance(x, Request) and p == MAIN]  # with its retransmissions
    assert sent and len({r.vias[0].branch for r in sent}) == 1, sent
    assert "expires=0" in (sent[0].headers.get("contact") or "")
    assert store.load(AOR) is None


def test_orphans_are_deregistered_by_the_claim_winner() -> None:
    m, store = _core()
    _registered(m, store, expires=60)
    record = store.load(AOR)
    assert record is not None
    m.core.orphans_expired(record, list(record.bindings.values()), m.now + 600)
    m.rig.drain()
    sent = [x for x, p in m.take() if isinstance(x, Request) and p == MAIN]
    assert len(sent) == 1 and "expires=0" in (sent[0].headers.get("contact") or "")


def _invite_to(relayed: Request) -> bytes:
    uri = f"sip:alice@10.0.0.2:5060;ctid={ctid_of(relayed)}"
    return request_bytes("INVITE", uri, branch="z9hG4bK-inv1")


def _owned_by(store: SlowStore, owner: str, transport: str = "udp") -> None:
    record = store.load(AOR)
    assert record is not None
    moved = record.copy()
    for ctid, b in record.bindings.items():
        moved.bindings[ctid] = replace(
            b, owner=owner, source=replace(b.source, transport=transport, conn=None)
        )
    store.commit(moved, None, 0.0)


def test_request_for_another_process_flow_is_handed_to_it() -> None:
    m, store = _core()
    relayed = _registered(m, store)
    _owned_by(store, "b")
    store.members["b"] = "udp:10.0.0.7:5060"
    m.feed(_invite_to(relayed), MAIN)
    sent = [(x, p) for x, p in m.take() if isinstance(x, Request)]
    assert len(sent) == 1
    request, peer = sent[0]
    assert (peer.host, peer.port) == ("10.0.0.7", 5060)
    assert request.headers.get("x-midreg-flow") == f"me {ctid_of(relayed)}"
    assert str(request.uri) == "sip:alice@192.0.2.10:5062"


def test_owner_gone_udp_goes_direct_tcp_gets_480() -> None:
    m, store = _core()
    relayed = _registered(m, store)
    _owned_by(store, "gone")
    m.feed(_invite_to(relayed), MAIN)
    sent = [(x, p) for x, p in m.take() if isinstance(x, Request)]
    assert [(p.host, p.port) for _, p in sent] == [("192.0.2.10", 5062)]
    assert sent[0][0].headers.get("x-midreg-flow") is None
    _owned_by(store, "gone", transport="tcp")
    m.feed(_invite_to(relayed).replace(b"z9hG4bK-inv1", b"z9hG4bK-inv2"), MAIN)
    replies = [x for x, p in m.take() if isinstance(x, Response)]
    assert [r.status for r in replies if r.status >= 200] == [480]


def test_handed_over_request_goes_out_over_the_flow_we_hold() -> None:
    m, store = _core()
    relayed = _registered(m, store)
    store.members["b"] = "udp:10.0.0.7:5060"
    ctid = ctid_of(relayed)
    data = request_bytes(
        "INVITE", "sip:alice@192.0.2.10:5062", branch="z9hG4bK-h1", extra=f"X-Midreg-Flow: b {ctid}"
    )
    m.feed(data, PEER_B)
    sent = [(x, p) for x, p in m.take() if isinstance(x, Request)]
    assert [(p.host, p.port) for _, p in sent] == [(PHONE.host, PHONE.port)]
    assert sent[0][0].headers.get("x-midreg-flow") is None


def test_hand_off_header_from_a_stranger_is_ignored() -> None:
    m, store = _core()
    relayed = _registered(m, store)
    store.members["b"] = "udp:10.0.0.7:5060"
    ctid = ctid_of(relayed)
    stranger = Peer("udp", "198.51.100.9", 5060)
    data = request_bytes(
        "INVITE", "sip:alice@192.0.2.10:5062", branch="z9hG4bK-s1", extra=f"X-Midreg-Flow: b {ctid}"
    )
    m.feed(data, stranger)
    sent = m.take()
    assert not any(isinstance(x, Request) and p == PHONE for x, p in sent), "a forged hand-off reaches nobody"
