"""The memory store's packed records and the expiry schedule's wheel (issue 3: memory per contact)."""

from __future__ import annotations

import marshal
import random
from dataclasses import replace

from registrar.core.deregister import ExpirySchedule
from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.memory import MemoryStore


def _binding(ctid: int, expires_at: float = 100.0, **more: object) -> Binding:
    return Binding(
        ctid=ctid,
        contact=f"sip:{ctid}@192.0.2.1",
        expires_at=expires_at,
        source=Peer("tcp", "192.0.2.1", 5062, 7, 1),
        call_id="c1",
        cseq=3,
        **more,  # type: ignore[arg-type]
    )


def _record() -> AorRecord:
    a = _binding(
        1, q=0.5, path=["<sip:edge;lr>"], methods=["INVITE", "BYE"], user_agent="UA/1", instance="<u>"
    )
    b = _binding(
        2, 200.5, main_expires=3600, relayed_at=1.5, main_contact="sip:x;ctid=2", relayed_call_id="c1"
    )
    meta = MainMeta("sip:a@x", "sip:a@x", "sip:main", hop="sip:hop", call_id="m", cseq=4, no_dr=True)
    return AorRecord("a@x", {1: a, 2: b}, meta=meta)


def test_tuple_form_survives_marshal() -> None:
    record = _record()
    back = AorRecord.from_tuple("a@x", marshal.loads(marshal.dumps(record.to_tuple())))
    assert back == record
    assert AorRecord.tuple_ctids(record.to_tuple()) == [1, 2]


def test_store_hands_out_copies_with_the_committed_values() -> None:
    store = MemoryStore(random.Random(1))
    record = _record()
    store.commit(record, None, 0.0)
    loaded = store.load("a@x")
    assert loaded == record and loaded is not record and record.version == loaded.version == 1
    loaded.bindings.clear()
    assert store.load("a@x") == record
    assert store.counts() == (1, 2)
    found = store.find_ctid(2)
    assert found is not None and found.aor == "a@x"


def test_store_keeps_the_contact_id_index_in_step() -> None:
    store = MemoryStore(random.Random(1))
    store.commit(_record(), None, 0.0)
    kept = store.load("a@x")
    assert kept is not None
    del kept.bindings[1]
    kept.bindings[3] = _binding(3)
    store.commit(kept, None, 0.0)
    assert store.find_ctid(1) is None and store.find_ctid(3) is not None and store.counts() == (1, 2)
    store.delete("a@x", None, 0.0)
    assert store.find_ctid(2) is None and store.load("a@x") is None and store.counts() == (0, 0)


def test_expiry_wheel_fires_at_the_exact_time() -> None:
    expiry = ExpirySchedule()
    expiry.schedule("a", _binding(1, 10.7))
    expiry.schedule("b", _binding(2, 10.2))
    expiry.schedule("c", _binding(3, 12.0))
    assert expiry.next_deadline() == 10.2
    assert expiry.due(10.19) == []
    assert expiry.due(10.2) == [("b", 2)]
    expiry.schedule("d", _binding(4, 10.5))  # into the slot already opened
    assert expiry.next_deadline() == 10.5
    assert expiry.due(11.0) == [("d", 4), ("a", 1)]
    assert expiry.next_deadline() == 12.0 and len(expiry) == 1


def test_expiry_extension_adds_nothing_shortening_adds_an_entry() -> None:
    expiry = ExpirySchedule()
    first = _binding(1, 50.0)
    expiry.schedule("a", first)
    longer = replace(first, expires_at=80.0)
    expiry.schedule("a", longer, first)
    assert len(expiry) == 1 and expiry.next_deadline() == 50.0
    shorter = replace(longer, expires_at=20.0)
    expiry.schedule("a", shorter, longer)
    assert len(expiry) == 2 and expiry.next_deadline() == 20.0
    assert expiry.due(20.0) == [("a", 1)]
    expiry.schedule("a", replace(shorter, expires_at=50.0))  # the caller moves a refreshed binding on
    assert expiry.due(50.0) == [("a", 1)]  # two entries, one answer
    assert expiry.next_deadline() is None and len(expiry) == 0
