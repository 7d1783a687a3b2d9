"""The etcd store: many registrar processes, one truth (docs/architecture.md "Shared state in etcd").

The core is synchronous; this store answers it from memory and does its etcd I/O in tasks. It is a
composition of single-job parts:

- registrar/store/etcd_layout.py: the keys and values (read it first);
- registrar/store/cache.py: the fetched AoRs and the contact-id index. ``load``/``find_ctid`` answer from
  there, else schedule a fetch (one transaction: the AoR's head and its bindings at one revision) and raise
  :class:`Pending`; ``store_ready`` follows;
- registrar/store/overlay.py: the write budget. ``commit``/``delete`` compare against what was loaded; a
  change peers need is one transaction comparing the head's ``mod_revision``, reported with
  ``store_committed``; the steady-state refresh of a binding this process owns only changes the overlay;
- registrar/store/members.py: the member registry; registrar/store/orphans.py: bindings whose lease ran out
  (their owner died) turned into exactly one ``orphans_expired`` across all processes.

This class holds what ties them together: the fetches and writes in flight, the watch on the whole prefix
(it invalidates cached AoRs changed elsewhere and feeds the registry and the orphan watch) and the health
loop. Every call has a deadline; on ``EtcdUnavailable`` the store turns unavailable until the health loop
sees etcd again and registers this member again. While unavailable it answers from memory for as long as
this member's lease surely runs in etcd (peers still count the process live, so nothing it holds can have
been taken over): cached AoRs read as before and a change that needs no write (the owner's absorbed
refresh) is made, exactly as at steady state; a fetch, and any change that must be written, raise
``StoreUnavailable`` (503). Past the lease, everything does. The cache outlives the outage: the watch resumes
from its last revision, so the changes made meanwhile drop what they touched (a compacted history drops it
all), and a stall costs no fetch of every AoR afterwards. Reads in flight are bounded (``FETCH_BACKLOG``):
past it a miss is answered 503 at once rather than parked. A write takes the caller's ``now`` (the core's
clock decides what may stay unwritten); reads and the background loops take wall-clock time from ``clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from registrar.config import Settings
from registrar.records import AorRecord, Binding
from registrar.store.base import Pending, StoreListener, StoreUnavailable, aor_key, ctid_key
from registrar.store.cache import AorCache, CachedAor, Item, cached_item
from registrar.store.etcd_client import (
    Compacted,
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    EventType,
    LeaseNotFound,
    LeasePool,
    Op,
    TxnResult,
    Watch,
    WatchEvent,
    absent,
    mod_revision_is,
    op_delete,
    op_get,
    op_put,
)
from registrar.store.etcd_layout import (
    UNDECODABLE,
    EtcdKeys,
    KeyKind,
    decode_binding,
    decode_head_meta,
    decode_index,
    encode_binding,
    encode_claim,
    encode_head,
    encode_index,
)
from registrar.store.etcd_layout import why as _why
from registrar.store.members import MemberRegistry
from registrar.store.orphans import CLAIM_TTL, Orphans, OrphanWatch, race
from registrar.store.overlay import Overlay, WritePlan, plan_commit

log = logging.getLogger(__name__)

WATCH_SETTLE = 2.0  # s after the watch (re)connects during which its member puts may be a replayed backlog
# Memory answers while etcd cannot, until this long before this member's lease may have run out in etcd.
LEASE_MARGIN = 1.0
# AoR and contact-id reads queued or in flight at most (64 of them run at once): past it, an AoR or contact id
# not in memory is answered 503 at once. A read takes ~1-2 ms, so the queue is well under a second long, and a
# burst (every phone of a restarted process) cannot pile up tasks, parked transactions and memory.
FETCH_BACKLOG = 1024

__all__ = ["EtcdStore"]


class EtcdStore:
    """The store shared by every registrar process of one MidRegistrar (see the module docstring).

    ``calls`` counts the etcd requests made for data (fetches, writes, index reads, claims): divide by the
    refreshes handled to get calls per refresh. ``background_calls`` counts health checks, member keepalives
    and registrations; lease grants are ``pool.grants``.
    """

    listener: StoreListener | None

    def __init__(
        self,
        settings: Settings,
        *,
        member_id: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._rng = rng or random.SystemRandom()
        self.member_id = member_id or f"{socket.gethostname()}-{self._rng.getrandbits(32):08x}"
        self.clock = clock
        self.listener = None
        self.released: Callable[[int], None] | None = None
        self.keys = EtcdKeys(settings.etcd_prefix.encode())
        self.client = EtcdClient(
            settings.etcd_endpoints,
            ca_file=settings.etcd_ca_file,
            cert_file=settings.etcd_cert_file,
            key_file=settings.etcd_key_file,
            username=settings.etcd_username,
            password=settings.etcd_password,
            timeout=settings.etcd_timeout,
        )
        self.hold = float(settings.etcd_hold)
        # A binding is written again when its new expiry comes this close to the end of its lease.
        self.margin = max(1.0, self.hold / 10)
        bucket = max(1.0, min(5.0, self.hold / 60))
        # Each binding puts two keys (binding + index) on its lease: 500 bindings → ≤ ~1,000 keys.
        self.pool = LeasePool(self.client, bucket=bucket, max_keys=500, clock=clock, min_ttl=2)
        self.registry = MemberRegistry(self.client, self.keys, self.member_id, settings.member_ttl, clock)
        self.cache = AorCache()
        self.overlay = Overlay()
        self.orphans = OrphanWatch(self._orphans_found)
        self._live_watch: Watch | None = None
        self.available = False
        self._alive_until = 0.0  # monotonic: this member's lease in etcd runs at least until then
        self.fetches_refused = 0  # reads not queued: FETCH_BACKLOG was reached
        self.calls = 0
        self.reads = 0  # of those calls, reads of AoRs and contact ids that memory did not hold
        self.health_checks = 0
        self.health_interval = 1.0
        self.orphan_claims_won = 0
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._ctid_fetching: dict[int, asyncio.Task[None]] = {}
        self._writing: dict[str, int] = {}
        self._tickets = itertools.count(1)
        self._ops: dict[asyncio.Task[None], Callable[[], None]] = {}  # in flight → how to fail it
        # Data calls in flight at once: a burst (every phone re-registering after an outage) queues here
        # instead of starving the client so that calls miss their deadline and the store turns unavailable.
        self._limit = asyncio.Semaphore(64)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.watch_rev = 0  # revision of the last event the watch delivered
        self._closed = False

    @property
    def background_calls(self) -> int:
        return self.health_checks + self.registry.calls

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self, member_address: str) -> None:
        """Connect, register this member, start the watch and the health loop. Loads no bindings: AoRs are
        fetched when first asked for. When etcd is down, the store starts unavailable and recovers alone."""
        self.registry.address = member_address
        await self.client.connect()
        rev = 0
        try:
            rev = await self.registry.list()
            await self._register()
            self.available = True
        except EtcdError as exc:
            log.warning("etcd store starts unavailable: %s", exc)
        self.watch_rev = rev
        self.start_watch(rev + 1 if rev else 0)
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        if not self.available:
            self._notify_availability(False)

    async def close(self, *, revoke: bool = True) -> None:
        """Stop the tasks and revoke the member lease (peers see this member gone at once). With
        ``revoke=False`` the lease is left to run out, as when the process dies (tests)."""
        if self._closed:
            return
        self._closed = True
        self.orphans.cancel()
        tasks = [t for t in (self._watch_task, self._health_task) if t is not None]
        tasks += [*self._tasks, *self._ops]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if revoke and self.registry.lease:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self.registry.lease)
        await self.pool.close()
        await self.client.close()

    async def _register(self) -> None:
        sent = time.monotonic()
        replaced = await self.registry.register()
        self._alive_until = sent + self.settings.member_ttl
        if replaced:
            self._spawn(self._revoke_quietly(replaced))

    async def _revoke_quietly(self, lease: int) -> None:
        with contextlib.suppress(EtcdError):
            await self.client.revoke(lease)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------------------------------ availability

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("etcd unavailable")

    def from_memory(self) -> bool:
        """Whether memory may answer while etcd cannot: this member's lease surely still runs in etcd, so its
        peers count it live (they hand it its phones' calls and claim none of its bindings), and what it
        holds is what it would answer from at steady state."""
        return time.monotonic() < self._alive_until - LEASE_MARGIN

    def _remembered(self, aor: str) -> AorRecord | None:
        """The AoR from memory while etcd is unavailable; ``StoreUnavailable`` when it is not there or memory
        may no longer answer."""
        entry = self.cache.get(aor) if self.from_memory() else None
        if entry is None:
            raise StoreUnavailable("etcd unavailable")
        return entry.record(aor, self.member_id, self.overlay, self.clock())

    def _backlog_full(self) -> bool:
        if len(self._fetching) + len(self._ctid_fetching) < FETCH_BACKLOG:
            return False
        self.fetches_refused += 1
        return True

    def _notify_availability(self, available: bool) -> None:
        if self.listener is not None:
            self.listener.availability_changed(available)

    def _lost(self, exc: BaseException) -> None:
        """etcd did not answer in time: turn unavailable and fail what waits on it."""
        if not self.available or self._closed:
            return
        log.warning("etcd unavailable: %s", exc)
        self.available = False
        self._notify_availability(False)
        failing = list(self._ops.items())
        self._ops.clear()
        current = asyncio.current_task()
        for task, fail in failing:
            if task is not current:
                task.cancel()
            fail()

    async def _healthy(self) -> bool:
        """A linearizable read inside the prefix (an etcd user may be allowed nothing else)."""
        self.health_checks += 1
        return await self.client.health(self.settings.etcd_timeout, key=self.keys.member(self.member_id))

    async def _health_loop(self) -> None:
        ttl = self.settings.member_ttl
        keepalive_every = max(0.5, ttl / 3)
        kept_at = announced_at = time.monotonic()
        announce_after = self.registry.announce_interval()
        backoff = 0.2
        while not self._closed:
            if self.available:
                await asyncio.sleep(min(self.health_interval, keepalive_every))
                if not await self._healthy():
                    self._lost(EtcdUnavailable("health check failed"))
                    continue
                if time.monotonic() - kept_at >= keepalive_every:
                    try:
                        sent = time.monotonic()
                        if await self.registry.keepalive():
                            self._alive_until = sent + ttl
                        else:
                            log.warning("member lease of %s was gone: registering again", self.member_id)
                            await self._register()
                            announced_at, announce_after = time.monotonic(), self.registry.announce_interval()
                        kept_at = time.monotonic()
                    except EtcdUnavailable as exc:
                        self._lost(exc)
                    except EtcdError as exc:
                        log.warning("member keepalive: %s", exc)
                if self.available and time.monotonic() - announced_at >= announce_after:
                    try:
                        await self.registry.announce()
                        announced_at, announce_after = time.monotonic(), self.registry.announce_interval()
                    except EtcdUnavailable as exc:
                        self._lost(exc)
                    except EtcdError as exc:
                        log.warning("member clock announce: %s", exc)
                backoff = 0.2
            else:
                await asyncio.sleep(backoff * (0.5 + self._rng.random() / 2))
                backoff = min(backoff * 2, 2.0)
                if not await self._healthy():
                    continue
                try:
                    listed = await self.registry.list()
                    await self._register()
                except EtcdError as exc:
                    log.info("etcd back but registration failed: %s", exc)
                    continue
                kept_at = announced_at = time.monotonic()
                announce_after = self.registry.announce_interval()
                if not self.watch_rev and self._watch_task is not None:
                    # started while etcd was down: watch from the revision just listed, so no change made
                    # after it can slip between the watch and the fetches to come
                    await self.stop_watch()
                    self.watch_rev = listed
                # The fetched AoRs stay: the watch resumes from its last revision and drops what changed.
                self.cache.ctids = {c: a for c, a in self.cache.ctids.items() if a}
                self.available = True
                log.info("etcd available again: %s registered", self.member_id)
                self._notify_availability(True)
                if self._watch_task is None or self._watch_task.done():
                    self.start_watch(self.watch_rev + 1)

    # ------------------------------------------------------------------------------------------ reads

    def load(self, aor: str) -> AorRecord | None:
        if not self.available:
            return self._remembered(aor)
        if self._writing.get(aor):
            raise Pending(aor_key(aor))
        entry = self.cache.get(aor)
        if entry is None:
            if aor not in self._fetching and self._backlog_full():
                raise StoreUnavailable("too many etcd reads queued")
            self._fetch(aor)
            raise Pending(aor_key(aor))
        return entry.record(aor, self.member_id, self.overlay, self.clock())

    def find_ctid(self, ctid: int) -> AorRecord | None:
        if not self.available:
            aor = self.cache.ctids.get(ctid) if self.from_memory() else None
            if aor is None:
                raise StoreUnavailable("etcd unavailable")
            record = self._remembered(aor) if aor else None
            return record if record is not None and ctid in record.bindings else None
        aor = self.cache.ctids.get(ctid)
        if aor is None:
            self._fetch_ctid(ctid)
            raise Pending(ctid_key(ctid))
        if not aor:
            return None
        if self._writing.get(aor):
            raise Pending(aor_key(aor))
        entry = self.cache.get(aor)
        if entry is None:
            self._fetch_ctid(ctid)
            raise Pending(ctid_key(ctid))
        record = entry.record(aor, self.member_id, self.overlay, self.clock())
        if record is None or ctid not in record.bindings:
            return None
        return record

    def _fetch(self, aor: str) -> asyncio.Task[None]:
        task = self._fetching.get(aor)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run_fetch(aor))
            self._fetching[aor] = task
            self._ops[task] = lambda: self._fetch_done(aor)
        return task

    def _fetch_done(self, aor: str) -> None:
        self._fetching.pop(aor, None)
        if self.listener is not None:
            self.listener.store_ready(aor_key(aor))

    async def _run_fetch(self, aor: str) -> None:
        me = asyncio.current_task()
        self.cache.reading()
        try:
            for _ in range(5):
                self.calls += 1
                self.reads += 1
                async with self._limit:
                    result = await self.client.txn([], self._reads(aor))
                if self._store_fetched(aor, result):
                    break
        except EtcdUnavailable as exc:
            self._lost(exc)
        except EtcdError as exc:
            log.warning("fetch of %s failed: %s", aor, exc)
        finally:
            self.cache.read_done()
            if self._ops.pop(me, None) is not None:  # type: ignore[arg-type]
                self._fetch_done(aor)

    def _reads(self, aor: str) -> list[Op]:
        """The AoR's head and its bindings, read at one revision."""
        return [op_get(self.keys.head(aor)), op_get(self.keys.bindings(aor), prefix=True)]

    def _store_fetched(self, aor: str, result: TxnResult) -> bool:
        """Cache what a fetch (or a lost compare-and-swap) read at ``result.revision``; False when the watch
        has already shown a later change of this AoR (the read is stale: read again)."""
        rev = result.revision
        if self.cache.stale(aor, rev):
            return False
        heads, kvs = result.results[0].kvs, result.results[1].kvs
        meta = None
        if heads:
            try:
                meta = decode_head_meta(heads[0].value)
            except UNDECODABLE as exc:  # another writer's, or corrupted: read as a head without meta
                log.warning("head of %s in etcd not understood (%s): %s", aor, heads[0].key, _why(exc))
        version = heads[0].mod_revision if heads else 0
        items = []
        me = self.member_id
        for kv in kvs:
            try:
                binding, hold = decode_binding(kv.value)
            except UNDECODABLE as exc:  # skipped: the AoR's other bindings still count
                log.warning("binding of %s in etcd not understood, skipped (%s): %s", aor, kv.key, _why(exc))
                continue
            items.append(cached_item(binding, hold, kv.mod_revision))
            if binding.owner != me and binding.ctid in self.overlay:
                self._release(binding.ctid)  # another process holds its flow now
        # No head but bindings (the head's lease ended first, e.g. leases reset unevenly by an etcd restart):
        # version 0, so the next write compares the head absent and puts it back.
        self.cache.put(aor, CachedAor(rev, version, meta, tuple(items)))
        return True

    def _fetch_ctid(self, ctid: int) -> None:
        if ctid in self._ctid_fetching:
            return
        if self._backlog_full():
            raise StoreUnavailable("too many etcd reads queued")
        task = asyncio.get_running_loop().create_task(self._run_fetch_ctid(ctid))
        self._ctid_fetching[ctid] = task
        self._ops[task] = lambda: self._ctid_done(ctid)

    def _ctid_done(self, ctid: int) -> None:
        self._ctid_fetching.pop(ctid, None)
        if self.listener is not None:
            self.listener.store_ready(ctid_key(ctid))

    async def _run_fetch_ctid(self, ctid: int) -> None:
        me = asyncio.current_task()
        try:
            aor = self.cache.ctids.get(ctid)
            if aor is None:
                self.calls += 1
                self.reads += 1
                kv = await self.client.get(self.keys.index(ctid))
                aor = ""
                if kv is not None:
                    try:
                        aor = decode_index(kv.value)
                    except UNDECODABLE as exc:  # read as no such contact id
                        log.warning("contact id %d in etcd not understood: %s", ctid, _why(exc))
                self.cache.index(ctid, aor)
            if aor and aor not in self.cache:
                await asyncio.shield(self._fetch(aor))
        except EtcdUnavailable as exc:
            self._lost(exc)
        except EtcdError as exc:
            log.warning("contact id %d lookup failed: %s", ctid, exc)
        finally:
            if self._ops.pop(me, None) is not None:  # type: ignore[arg-type]
                self._ctid_done(ctid)

    # ------------------------------------------------------------------------------------------ writes

    def commit(self, record: AorRecord, old: AorRecord | None, now: float) -> int | None:
        available = self.available
        if not available and not self.from_memory():
            raise StoreUnavailable("etcd unavailable")
        aor = record.aor
        entry = self.cache.get(aor)
        expected = old.version if old is not None else 0
        if entry is None and old is None:
            entry = CachedAor.absent()  # a create: the head must be absent (compared in the txn)
        if entry is None or entry.version != expected:
            if not available:
                raise StoreUnavailable("etcd unavailable")
            return self._fail_ticket(aor)  # changed (or forgotten) since it was loaded: decide afresh
        plan = plan_commit(
            old, record, entry.held(), self.member_id, margin=self.margin, hold=self.hold, now=now
        )
        if plan.write and not available:
            # A renewal that comes due now can wait for etcd while the lease still covers the new expiry: that
            # is what the margin is for. Anything else must be written.
            plan = plan_commit(
                old, record, entry.held(), self.member_id, margin=LEASE_MARGIN, hold=self.hold, now=now
            )
            if plan.write:
                raise StoreUnavailable("etcd unavailable: the change must be written")
        for binding in plan.changed:
            record.bindings[binding.ctid] = binding
        if not plan.write:
            for binding in plan.changed:
                self.overlay.keep(binding)
            return None
        ticket = next(self._tickets)
        self._start_write(ticket, aor, entry, record, plan, now)
        return ticket

    def delete(self, aor: str, old: AorRecord | None, now: float) -> int | None:
        self._check()
        if old is None:
            entry = self.cache.get(aor)
            if entry is None:
                return self._fail_ticket(aor)
            old = entry.record(aor, self.member_id, self.overlay, now)
            if old is None:
                return None
        if not old.bindings and old.version == 0:
            return None
        return self.commit(AorRecord(aor, {}, old.version, None), old, now)

    def _fail_ticket(self, aor: str) -> int:
        """A write that cannot be right (the cache moved on): reported lost at once, without an etcd call."""
        ticket = next(self._tickets)
        self.cache.drop(aor)

        def fail() -> None:
            if self.listener is not None:
                self.listener.store_committed(ticket, False)
                self.listener.store_ready(aor_key(aor))

        asyncio.get_running_loop().call_soon(fail)
        return ticket

    def _start_write(
        self, ticket: int, aor: str, entry: CachedAor, record: AorRecord, plan: WritePlan, now: float
    ) -> None:
        self._writing[aor] = self._writing.get(aor, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run_write(ticket, aor, entry, record, plan, now))

        def fail() -> None:
            self.cache.drop(aor)
            self._write_done(aor)
            if self.listener is not None:
                self.listener.store_committed(ticket, False)
                self.listener.store_ready(aor_key(aor))

        self._ops[task] = fail

    def _write_done(self, aor: str) -> None:
        left = self._writing.get(aor, 0) - 1
        if left > 0:
            self._writing[aor] = left
        else:
            self._writing.pop(aor, None)

    async def _run_write(
        self, ticket: int, aor: str, entry: CachedAor, record: AorRecord, plan: WritePlan, now: float
    ) -> None:
        me = asyncio.current_task()
        self.cache.reading()
        ok = False
        try:
            ok = await self._write(aor, entry, record, plan, now)
        except EtcdUnavailable as exc:
            self.cache.drop(aor)
            self._lost(exc)
        except EtcdError as exc:
            log.warning("write of %s failed: %s", aor, exc)
            self.cache.drop(aor)
        finally:
            self.cache.read_done()
            if self._ops.pop(me, None) is not None:  # type: ignore[arg-type]
                self._write_done(aor)
                if self.listener is not None:
                    self.listener.store_committed(ticket, ok)
                    self.listener.store_ready(aor_key(aor))

    async def _write(
        self, aor: str, entry: CachedAor, record: AorRecord, plan: WritePlan, now: float
    ) -> bool:
        """One transaction carrying out ``plan``, compared against the head's mod_revision (granting leases
        again when one the pool counted on is gone)."""
        keys = self.keys
        head = keys.head(aor)
        stored = entry.items()
        for attempt in range(3):
            leases: list[int] = []
            try:
                compares: list[Compare] = [mod_revision_is(head, entry.version)]
                ops: list[Op] = []
                if plan.removed:
                    claim_lease = await self.pool.lease_for(now + CLAIM_TTL)
                    leases.append(claim_lease)
                    claim = encode_claim(self.member_id)
                    ops += [op_put(keys.claim(ctid, rev), claim, claim_lease) for ctid, rev in plan.removed]
                    for ctid, _rev in plan.removed:
                        ops.append(op_delete(keys.binding(aor, ctid), prev_kv=False))
                        ops.append(op_delete(keys.index(ctid), prev_kv=False))
                for binding in plan.changed:
                    ctid = binding.ctid
                    hold = plan.holds[ctid]
                    lease = await self.pool.lease_for(hold)
                    leases.append(lease)
                    if ctid not in stored:
                        compares.append(absent(keys.index(ctid)))
                    ops.append(op_put(keys.binding(aor, ctid), encode_binding(binding, hold), lease))
                    ops.append(op_put(keys.index(ctid), encode_index(aor), lease))
                if plan.head_hold is not None:
                    head_lease = await self.pool.lease_for(plan.head_hold)
                    leases.append(head_lease)
                    ops.append(op_put(head, encode_head(aor, record.meta, record.bindings), head_lease))
                else:
                    ops.append(op_delete(head, prev_kv=False))
                self.calls += 1
                async with self._limit:
                    result = await self.client.txn(compares, ops, self._reads(aor))
            except LeaseNotFound:
                for lease in leases:
                    self.pool.forget(lease)
                if attempt == 2:
                    raise
                continue
            break
        if not result.succeeded:
            for lease in leases:
                self._spawn(self.pool.release(lease))
            if not self._store_fetched(aor, result):
                self.cache.drop(aor)
            return False
        rev = result.revision
        for ctid, _rev in plan.removed:
            self._release(ctid)
            self.cache.ctids.pop(ctid, None)
        written = {b.ctid: b for b in plan.changed}
        items: list[Item] = []
        for ctid in record.bindings:
            put = written.get(ctid)
            if put is not None:
                items.append(cached_item(put, plan.holds[ctid], rev))
                self.overlay.keep(put)
                self.cache.ctids[ctid] = aor
            else:
                items.append(stored[ctid])
        version = rev if record.bindings else 0
        if self.cache.stale(aor, rev):
            self.cache.drop(aor)  # already changed again elsewhere: fetch afresh when asked
        else:
            self.cache.put(aor, CachedAor(rev, version, record.meta, tuple(items)))
        record.version = version
        return True

    # ------------------------------------------------------------------------------------------ watch

    def start_watch(self, start: int) -> None:
        """Follow every change under the prefix from revision ``start`` (0: from now) until closed."""
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(start))

    async def stop_watch(self) -> int:
        """Stop following changes; returns the revision to start again from for nothing to be missed."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        return self.watch_rev + 1

    async def _watch(self, start: int) -> None:
        next_rev = start
        while not self._closed:
            watch = self.client.watch_prefix(self.keys.prefix, next_rev)
            self._live_watch = watch
            try:
                async for item in watch:
                    if isinstance(item, Compacted):
                        log.warning("etcd history compacted under the watch: dropping the fetched cache")
                        self.cache.clear()
                        self.orphans.flush()
                        next_rev = 0
                        while not self._closed:
                            try:
                                next_rev = await self.registry.list() + 1
                                break
                            except EtcdError:
                                await asyncio.sleep(1.0)
                        break
                    try:
                        self._on_event(item)
                    except Exception:  # a foreign or malformed key must not stop the watch
                        log.exception("etcd watch event on %r not understood", item.kv.key)
                    next_rev = watch.next_revision
                else:
                    next_rev = watch.next_revision or next_rev
            except EtcdError as exc:
                next_rev = watch.next_revision or next_rev
                log.info("etcd watch ended (%s): starting it again at %d", exc, next_rev)
                await asyncio.sleep(1.0)
            finally:
                await watch.close()

    def _on_event(self, event: WatchEvent) -> None:
        kv = event.kv
        rev = kv.mod_revision
        self.watch_rev = rev
        key = self.keys.parse(kv.key)
        if key is None:
            return
        deleted = event.type is EventType.DELETE
        kind = key.kind
        if kind in (KeyKind.HEAD, KeyKind.BINDING, KeyKind.AOR_OTHER):
            aor = key.aor
            self.cache.changed(aor, rev)
            if kind is KeyKind.HEAD:
                if deleted and event.prev_kv is not None:
                    self.orphans.head_deleted(rev, aor, event.prev_kv)
            elif kind is KeyKind.BINDING:
                if deleted:
                    if event.prev_kv is not None:
                        self.orphans.binding_deleted(rev, aor, key.ctid, event.prev_kv)
                    if key.ctid in self.overlay:
                        self._release(key.ctid)  # deleted by a peer (a De-REGISTER through it) or its lease
                elif key.ctid in self.overlay:
                    try:
                        owner = decode_binding(kv.value)[0].owner
                    except UNDECODABLE as exc:  # not a binding this process could hold any more
                        log.warning("binding %s written in etcd not understood: %s", kv.key, _why(exc))
                        owner = None
                    if owner != self.member_id:
                        self._release(key.ctid)
        elif kind is KeyKind.CLAIM:
            if not deleted and kv.create_revision == rev:
                self.orphans.claim_created(rev, key.ctid, key.mod_revision)
        elif kind is KeyKind.INDEX:
            if deleted or self.cache.ctids.get(key.ctid) == "":
                self.cache.ctids.pop(key.ctid, None)
        elif kind is KeyKind.MEMBER:
            if deleted:
                self.registry.gone(key.member)
            else:
                # A put the watch replays right after (re)connecting may be old: no clock sample from it.
                watch = self._live_watch
                fresh = watch is not None and time.monotonic() - watch.connected_at >= WATCH_SETTLE
                self.registry.put(key.member, kv.value, fresh=fresh)

    def _orphans_found(self, found: list[Orphans]) -> None:
        """Bindings whose lease ran out: drop what this process held of them and race for the claims."""
        for orphans in found:
            for ctid, _kv in orphans.gone:
                self._release(ctid)
        now = self.clock()
        for orphans in found:
            aor = orphans.aor
            entry = self.cache.drop(aor)  # whatever its revision: a binding vanished under it
            meta = entry.meta if entry is not None else None
            known: dict[int, Binding] = {}
            if entry is not None and entry.version:
                record = entry.record(aor, self.member_id, self.overlay, now)
                if record is not None:
                    known = record.bindings
            if orphans.head is not None:
                with contextlib.suppress(*UNDECODABLE):
                    meta = decode_head_meta(orphans.head.value) or meta
            version = entry.version if entry is not None else 0
            before = AorRecord(aor, known, version, meta)
            self._spawn(self._claim(orphans, before, orphans.head is None and meta is None))

    async def _claim(self, orphans: Orphans, before: AorRecord, read_head: bool) -> None:
        """Race for the claims; the winner tells the listener, with the AoR as it was (``before``, its head
        read first when the watch did not show it)."""
        aor = orphans.aor
        try:
            gone = [(decode_binding(kv.value)[0], kv.mod_revision) for _ctid, kv in orphans.gone]
        except UNDECODABLE as exc:
            log.warning("orphaned binding of %s not understood: %s", aor, exc)
            return
        try:
            self.calls += 1
            if not await race(self.client, self.keys, self.pool, self.member_id, gone, self.clock()):
                return
            self.orphan_claims_won += 1
            for binding, _rev in gone:
                self.cache.ctids.pop(binding.ctid, None)
            if read_head:
                self.calls += 1
                head = await self.client.get(self.keys.head(aor))
                if head is not None:
                    before.version = head.mod_revision
                    before.meta = decode_head_meta(head.value)
        except EtcdUnavailable as exc:
            self._lost(exc)
            return
        except EtcdError as exc:
            log.warning("orphan claim for %s failed: %s", aor, exc)
            return
        for binding, _rev in gone:
            before.bindings[binding.ctid] = binding
        if self.listener is not None:
            self.listener.orphans_expired(before, [b for b, _rev in gone])

    def _release(self, ctid: int) -> None:
        """This process holds binding ``ctid`` no longer (it was removed, or another process holds its flow):
        out of the overlay, and ``released`` told (the core drops what it kept for it)."""
        self.overlay.drop(ctid)
        if self.released is not None:
            self.released(ctid)

    # ------------------------------------------------------------------------------------------ the rest

    def new_contact_id(self) -> int:
        while True:
            ctid = self._rng.getrandbits(63)
            if ctid and ctid not in self.overlay and ctid not in self.cache.ctids:
                return ctid

    def owns(self, binding: Binding) -> bool:
        return binding.owner == self.member_id

    def member_address(self, member: str) -> str | None:
        return self.registry.address_of(member)

    def clock_offset(self, member: str) -> float:
        return self.registry.offset(member)

    @property
    def members(self) -> dict[str, str]:
        """Live members (id → internal SIP address) as the watch last showed them."""
        return self.registry.live()

    def counts(self) -> tuple[int, int]:
        """(AoRs in the fetched cache, bindings this process owns)."""
        return len(self.cache), len(self.overlay)
