"""The etcd store's in-memory parts without etcd: how a cached AoR reads for its owner and for a peer
(registrar/store/cache.py), and which deletes the orphan watch turns into claims (registrar/store/orphans.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from registrar.records import Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.cache import ABSENT_LIMIT, ABSENT_TTL, CACHE_LIMIT, AorCache, CachedAor, cached_item
from registrar.store.etcd_client import KeyValue
from registrar.store.orphans import Orphans, OrphanWatch
from registrar.store.overlay import Held, Overlay

NOW = 1_000_000.0
META = MainMeta("sip:a@x", "sip:a@x", "sip:main")


def binding(ctid: int, owner: str, expires_at: float = NOW + 60, conn: int | None = 4) -> Binding:
    return Binding(
        ctid=ctid,
        contact=f"sip:{ctid}@192.0.2.1",
        expires_at=expires_at,
        source=Peer("tcp", "192.0.2.1", 5062, conn, 1),
        call_id="c1",
        cseq=3,
        local_expires=60,
        owner=owner,
    )


def test_owner_reads_its_overlay_a_peer_the_vouched_expiry_without_the_connection() -> None:
    mine, theirs = binding(1, "me"), binding(2, "them", expires_at=NOW - 100)
    entry = CachedAor(40, 38, META, (cached_item(mine, NOW + 660, 38), cached_item(theirs, NOW + 500, 30)))
    assert entry.held() == {1: Held("me", NOW + 660, 38), 2: Held("them", NOW + 500, 30)}
    overlay = Overlay()
    newer = replace(mine, expires_at=NOW + 120, cseq=4)
    overlay.keep(newer)
    record = entry.record("a@x", "me", overlay, NOW)
    assert record is not None and record.version == 38 and record.meta == META
    assert record.bindings[1] == newer  # the owner's truth, connection included
    peer_view = record.bindings[2]
    assert peer_view.expires_at == NOW + 60  # written expiry past: one lifetime from now, within the hold
    assert peer_view.source == Peer("tcp", "192.0.2.1", 5062, None, 1)
    # the same entry for the other member: 1 is foreign (as written), 2 is its own but not in its overlay
    theirs_view = entry.record("a@x", "them", Overlay(), NOW)
    assert theirs_view is not None and theirs_view.bindings[1].expires_at == NOW + 60
    assert theirs_view.bindings[1].source.conn is None


def test_absent_aor_reads_as_none() -> None:
    assert CachedAor.absent().record("a@x", "me", Overlay(), NOW) is None
    assert (
        CachedAor(3, 0, None, (cached_item(binding(1, "me"), NOW + 660, 2),)).record(
            "a@x", "me", Overlay(), NOW
        )
        is not None
    )  # bindings without a head still read


def held(rev: int = 10) -> CachedAor:
    return CachedAor(rev, rev, META, (cached_item(binding(1, "me"), NOW + 660, rev),))


def test_cache_is_bounded_oldest_first() -> None:
    cache = AorCache()
    entry = held()
    for i in range(CACHE_LIMIT):
        cache.put(f"{i}@x", entry)
    cache.put("new@x", entry)
    assert "0@x" not in cache and "new@x" in cache and len(cache) < CACHE_LIMIT
    cache.index(1, "a@x")
    cache.clear()
    assert len(cache) == 0 and cache.ctids == {1: "a@x"}


def test_watch_change_drops_older_copies_and_marks_reads_in_flight_stale() -> None:
    cache = AorCache()
    cache.put("a@x", CachedAor(10, 8, None, ()))
    cache.changed("a@x", 10)  # the change the copy already holds
    assert "a@x" in cache
    cache.changed("a@x", 11)
    assert "a@x" not in cache
    assert not cache.stale("a@x", 5)  # no read was in flight: nothing remembered
    cache.reading()
    cache.changed("a@x", 12)
    assert cache.stale("a@x", 11) and not cache.stale("a@x", 12) and not cache.stale("b@x", 1)
    cache.read_done()
    assert not cache.stale("a@x", 11)  # forgotten once no read is in flight


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_what_etcd_does_not_hold_is_answered_for_a_while_and_not_counted() -> None:
    """An AoR without bindings (its last one deleted, or never registered: a call to an unknown user) is not
    kept like a fetched AoR: it reads as absent for ABSENT_TTL seconds, so the work its fetch was for runs
    again without another fetch, then it is gone (soak, issue 15 item 6)."""
    clock = Clock()
    cache = AorCache(clock)
    cache.put("a@x", held())
    cache.put("a@x", CachedAor(12, 0, None, ()))  # its last binding deleted at revision 12
    cache.put("nobody@x", CachedAor(12, 0, None, ()))  # fetched: nothing there
    assert len(cache) == 0  # AoRs held: none
    for aor in ("a@x", "nobody@x"):
        entry = cache.get(aor)
        assert entry is not None and entry.record(aor, "me", Overlay(), NOW) is None and aor in cache
    cache.changed("a@x", 12)  # the watch's event of that delete: nothing new
    cache.changed("nobody@x", 13)  # written since: read it again
    entry = cache.get("a@x")
    assert entry is not None and entry.rev == 12 and entry.version == 0 and cache.get("nobody@x") is None
    clock.now = ABSENT_TTL + 1
    assert cache.get("a@x") is None and "a@x" not in cache
    cache.put("b@x", held(14))  # a head without bindings, or bindings: held as before
    assert len(cache) == 1 and cache.get("b@x") is not None


def test_absent_aors_and_contact_ids_are_bounded_and_expire() -> None:
    clock = Clock()
    cache = AorCache(clock)
    cache.index(7, "a@x")
    cache.index(8, "")  # no such contact id
    assert cache.ctids == {7: "a@x", 8: ""}
    for i in range(ABSENT_LIMIT):  # the limit reached: the oldest absence goes first
        cache.put(f"{i}@x", CachedAor.absent())
    assert 8 not in cache.ctids and cache.get("0@x") is not None
    cache.put("new@x", CachedAor.absent())
    assert cache.get("0@x") is None and cache.get(f"{ABSENT_LIMIT - 1}@x") is not None
    cache.index(9, "")
    clock.now = ABSENT_TTL + 1
    cache.index(10, "")  # each new absence forgets the expired ones first
    assert cache.ctids == {7: "a@x", 10: ""}
    assert cache.get(f"{ABSENT_LIMIT - 1}@x") is None


def kv(ctid: int, mod_revision: int) -> KeyValue:
    return KeyValue(b"/p/aor/a@x/ct/%d" % ctid, b"{}", mod_revision, 1, 1, 0)


def test_orphan_watch_groups_unclaimed_deletes_once_the_response_is_over() -> None:
    found: list[list[Orphans]] = []

    async def main() -> None:
        watch = OrphanWatch(found.append)
        watch.binding_deleted(50, "a@x", 1, kv(1, 10))  # lease ran out
        watch.binding_deleted(50, "a@x", 2, kv(2, 11))
        watch.binding_deleted(51, "b@x", 3, kv(3, 12))  # deleted by its owner, who claimed it
        watch.claim_created(51, 3, 12)
        head = kv(0, 9)
        watch.head_deleted(50, "a@x", head)
        assert found == []  # not before the rest of the watch response
        await asyncio.sleep(0)
        assert found == [[Orphans(50, "a@x", [(1, kv(1, 10)), (2, kv(2, 11))], head)]]
        watch.binding_deleted(52, "c@x", 4, kv(4, 13))
        watch.cancel()
        await asyncio.sleep(0)
        assert len(found) == 1  # cancelled: nothing handed over

    asyncio.run(main())
