"""The owner's write budget (registrar/store/overlay.py) on a virtual clock: which commits write to etcd and
with which holds, which stay in the owner's memory, and how a peer shows what the owner did not write."""

from __future__ import annotations

from dataclasses import replace

import pytest

from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.overlay import Held, Overlay, foreign_expiry, plan_commit, renewal_hold

NOW = 1_000_000.0
HOLD = 600.0
MARGIN = 60.0
ME = "me"
META = MainMeta("sip:a@x", "sip:a@x", "sip:main")


def binding(ctid: int, expires_at: float = NOW + 60, owner: str | None = ME, **more: object) -> Binding:
    return Binding(
        ctid=ctid,
        contact=f"sip:{ctid}@192.0.2.1",
        expires_at=expires_at,
        source=Peer("tcp", "192.0.2.1", 5062, 7),
        call_id="c1",
        cseq=3,
        owner=owner,
        **more,  # type: ignore[arg-type]
    )


def loaded(*bindings: Binding, meta: MainMeta | None = META) -> AorRecord:
    return AorRecord("a@x", {b.ctid: b for b in bindings}, version=5, meta=meta)


def held(*bindings: Binding, hold: float = NOW + 60 + HOLD, owner: str = ME) -> dict[int, Held]:
    return {b.ctid: Held(owner, hold, 100 + b.ctid) for b in bindings}


def plan(old: AorRecord | None, new: AorRecord, stored: dict[int, Held], now: float = NOW):  # type: ignore[no-untyped-def]
    return plan_commit(old, new, stored, ME, margin=MARGIN, hold=HOLD, now=now)


def hold_of(ctid: int, base: float) -> float:
    return renewal_hold(ctid, base, hold=HOLD, margin=MARGIN)


def refreshed(record: AorRecord, ctid: int, **changes: object) -> AorRecord:
    new = record.copy()
    cur = new.bindings[ctid]
    new.bindings[ctid] = replace(cur, cseq=cur.cseq + 1, updated_at=NOW, **changes)  # type: ignore[arg-type]
    return new


def test_create_writes_every_binding_with_its_hold_and_the_head_on_the_largest() -> None:
    new = AorRecord("a@x", {1: binding(1, NOW + 60), 2: binding(2, NOW + 3600)}, meta=META)
    p = plan(None, new, {})
    assert p.write and [b.ctid for b in p.changed] == [1, 2]
    assert p.holds == {1: hold_of(1, NOW + 60), 2: hold_of(2, NOW + 3600)}
    assert p.head_hold == hold_of(2, NOW + 3600) and p.removed == []


def test_steady_refresh_of_an_owned_binding_stays_in_memory() -> None:
    old = loaded(binding(1))
    new = refreshed(old, 1, expires_at=NOW + 120)
    p = plan(old, new, held(old.bindings[1]))
    assert not p.write and p.changed == [new.bindings[1]] and p.holds == {} and p.head_hold is None


def test_refresh_that_would_outrun_the_lease_writes_and_moves_the_hold() -> None:
    old = loaded(binding(1))
    stored = held(old.bindings[1])  # hold NOW + 660
    last_absorbed = refreshed(old, 1, expires_at=NOW + 660 - MARGIN)
    assert not plan(old, last_absorbed, stored).write
    too_far = refreshed(old, 1, expires_at=NOW + 660 - MARGIN + 0.5)
    p = plan(old, too_far, stored)
    assert p.write and p.holds == {1: hold_of(1, NOW + 660 - MARGIN + 0.5)}


@pytest.mark.parametrize(
    "change",
    [
        {"contact": "sip:moved@192.0.2.9"},
        {"source": Peer("tcp", "192.0.2.1", 5062, 8)},
        {"path": ["<sip:e;lr>"]},
    ],
)
def test_a_change_peers_need_writes(change: dict[str, object]) -> None:
    old = loaded(binding(1))
    p = plan(old, refreshed(old, 1, **change), held(old.bindings[1]))
    assert p.write and p.holds == {1: hold_of(1, NOW + 60)}


def test_refresh_of_a_binding_another_member_owns_in_etcd_writes_and_takes_it() -> None:
    theirs = binding(1, owner="them")
    old = loaded(theirs)
    new = refreshed(old, 1, expires_at=NOW + 120)
    p = plan(old, new, held(theirs, owner="them"))
    assert p.write and p.changed[0].owner == ME
    assert new.bindings[1].owner == "them"  # the caller's record is left as it was


def test_binding_not_in_etcd_yet_writes() -> None:
    old = loaded(binding(1))
    assert plan(old, refreshed(old, 1), {}).write


def test_added_binding_writes_only_what_changed_and_keeps_the_others_holds() -> None:
    old = loaded(binding(1, NOW + 3000))
    new = old.copy()
    new.bindings[2] = binding(2, NOW + 60)
    p = plan(old, new, held(old.bindings[1], hold=NOW + 3600))
    assert p.write and [b.ctid for b in p.changed] == [2] and p.holds == {2: hold_of(2, NOW + 60)}
    assert p.head_hold == NOW + 3600  # the unchanged binding's lease is the longest


def test_removed_binding_writes_its_claim_revision() -> None:
    old = loaded(binding(1), binding(2))
    new = old.copy()
    del new.bindings[2]
    p = plan(old, new, held(*old.bindings.values()))
    assert p.write and p.changed == [] and p.removed == [(2, 102)] and p.head_hold == NOW + 60 + HOLD


def test_delete_of_the_whole_aor_deletes_the_head() -> None:
    old = loaded(binding(1), binding(2))
    p = plan(old, AorRecord("a@x", {}, old.version, None), held(*old.bindings.values()))
    assert p.write and sorted(p.removed) == [(1, 101), (2, 102)] and p.head_hold is None


def test_meta_change_writes_even_with_bindings_unchanged() -> None:
    old = loaded(binding(1))
    new = old.copy()
    new.meta = replace(META, cseq=7)
    p = plan(old, new, held(old.bindings[1]))
    assert p.write and p.changed == [] and p.head_hold == NOW + 60 + HOLD


def test_nothing_changed_writes_nothing() -> None:
    old = loaded(binding(1))
    p = plan(old, old.copy(), held(old.bindings[1]))
    assert not p.write and p.changed == []


def test_expired_binding_is_held_from_now() -> None:
    new = AorRecord("a@x", {1: binding(1, NOW - 30)}, meta=META)
    assert plan(None, new, {}, now=NOW).holds == {1: hold_of(1, NOW)}
    assert plan(None, new, {}, now=NOW + 100).holds == {1: hold_of(1, NOW + 100)}


def test_one_write_takes_every_changed_binding_along() -> None:
    old = loaded(binding(1), binding(2))
    new = refreshed(refreshed(old, 1, expires_at=NOW + 120), 2, contact="sip:moved@192.0.2.9")
    p = plan(old, new, held(*old.bindings.values()))
    assert p.write and sorted(p.holds) == [1, 2] and p.holds[1] == hold_of(1, NOW + 120)


@pytest.mark.parametrize("base", [NOW, NOW + 0.25, NOW + 3600.7, 1_800_000_123.5])
def test_renewal_hold_lies_between_margin_and_hold_on_the_bindings_own_grid(base: float) -> None:
    period = HOLD - MARGIN
    for ctid in (0, 1, 2, 3, 2**62 + 17, 2**63 - 1):
        h = renewal_hold(ctid, base, hold=HOLD, margin=MARGIN)
        assert base + MARGIN < h <= base + HOLD
        # the same phase whatever the expiry: a later write (or another owner's) lands on the same grid
        later = renewal_hold(ctid, base + 1234.5, hold=HOLD, margin=MARGIN)
        steps = (later - h) / period
        assert steps == pytest.approx(round(steps), abs=1e-6)
    assert renewal_hold(1, NOW, hold=5.0, margin=5.0) == NOW + 5.0  # no room for a grid: the plain hold


def test_phones_that_registered_together_renew_spread_over_the_period() -> None:
    """1,000 phones register within 25 s and refresh every 60 s (expiry 300) for two hours, through
    plan_commit as the owner sees it. With holds at ``expiry + hold`` they were all rewritten together every
    ~540 s (1,000 writes in one minute); on the grid, from the first renewal on, no minute holds more than
    twice its share, and each phone is rewritten once per period."""
    import random

    rng = random.Random(7)
    period = HOLD - MARGIN
    phones = []
    for _ in range(1000):
        ctid = rng.getrandbits(63)
        t = NOW + rng.uniform(0, 25)
        record = AorRecord("a@x", {ctid: binding(ctid, t + 300)}, meta=META)
        p = plan(None, record, {}, now=t)
        phones.append((t, record, {ctid: Held(ME, p.holds[ctid], 1)}))
    writes: dict[int, int] = {}
    per_phone = []
    for start, record, stored in phones:
        (ctid,) = record.bindings
        count = 0
        t = start + 60
        while t < NOW + 7200:
            new = refreshed(record, ctid, expires_at=t + 300)
            p = plan(record, new, stored, now=t)
            if p.write:
                stored = {ctid: Held(ME, p.holds[ctid], 1)}
                window = int((t - NOW) // 60)
                writes[window] = writes.get(window, 0) + 1
                if t > NOW + period + 60:
                    count += 1
            record = new
            t += 60
        per_phone.append(count)
    share = 1000 * 60 / period  # an even spread: ~111 writes a minute
    after_first = [writes.get(w, 0) for w in range(int((period + 60) // 60), 7200 // 60 - 1)]
    assert max(after_first) <= 2 * share, max(after_first)
    span = 7200 - period - 90
    assert all(int(span // period) - 1 <= c <= int(span // period) + 1 for c in per_phone)


def test_overlay_keeps_the_latest_owned_state() -> None:
    overlay = Overlay()
    b = binding(1, q=0.5, methods=["INVITE"])
    overlay.keep(b)
    assert 1 in overlay and len(overlay) == 1 and overlay.get(1) == b and overlay.get(2) is None
    overlay.keep(replace(b, cseq=9))
    got = overlay.get(1)
    assert got is not None and got.cseq == 9
    overlay.drop(1)
    assert 1 not in overlay and len(overlay) == 0


# ---------------------------------------------------------------------------------------------- reading side


def test_written_expiry_ahead_is_shown_as_written() -> None:
    assert foreign_expiry(NOW + 40, 60, NOW + 640, NOW) == NOW + 40


def test_written_expiry_past_but_vouched_shows_one_lifetime_not_the_hold() -> None:
    # the owner absorbed the phone's refreshes without writing them; its lease runs for 9 more minutes
    assert foreign_expiry(NOW - 200, 60, NOW + 540, NOW) == NOW + 60


def test_never_beyond_the_hold() -> None:
    assert foreign_expiry(NOW - 5, 60, NOW + 20, NOW) == NOW + 20
    assert foreign_expiry(NOW + 90, 60, NOW + 30, NOW) == NOW + 30


@pytest.mark.parametrize("written", [NOW - 100, NOW + 10])
@pytest.mark.parametrize("lifetime", [0, 60, 3600])
def test_valid_exactly_while_the_owner_vouches(written: float, lifetime: int) -> None:
    hold = NOW + 300
    assert foreign_expiry(written, lifetime, hold, NOW) > NOW
    assert foreign_expiry(written, lifetime, NOW, NOW) <= NOW  # lease over: expired


def test_no_lifetime_known_falls_back_to_the_hold() -> None:
    assert foreign_expiry(NOW - 1, 0, NOW + 300, NOW) == NOW + 300
