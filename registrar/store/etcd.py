"""The etcd store: many registrar processes, one truth.

DESIGN.md §5; docs/architecture.md "Shared state in etcd" explains the choices and the staleness bound.

The core is synchronous; this store answers it from memory and does its etcd I/O in tasks:

- ``load``/``find_ctid`` answer from the fetched cache, else schedule a fetch (one transaction: the AoR's head
  and its bindings at one revision) and raise :class:`Pending`; ``store_ready`` follows.
- ``commit``/``delete`` compare against what was loaded. A change peers need (bindings added or removed,
  meta, anything but CSeq/expiry/update time, a new owner, or a lease that would lapse before the new expiry)
  is one transaction comparing the head's ``mod_revision``, reported with ``store_committed``; anything else
  (the steady-state refresh of a binding this process owns) only changes the owner's in-memory overlay and
  costs no etcd call.
- A watch on the whole prefix invalidates cached AoRs changed elsewhere, keeps the member registry, and turns
  bindings whose lease ran out (their owner died) into exactly one ``orphans_expired`` across all processes
  (create-only claim keys).
- Every call has a deadline; on ``EtcdUnavailable`` the store turns unavailable (``StoreUnavailable``) until
  a health loop sees etcd again, then drops its cache and re-registers.

Key layout under ``P = settings.etcd_prefix`` (the AoR is written with ``%`` and ``/`` escaped):

- ``P aor/<aor>``: head, ``{"v":1,"aor","meta","ctids"}``, on the lease of its largest binding hold;
- ``P aor/<aor>/ct/<ctid>``: binding, ``Binding.to_dict()`` + ``"v"`` + ``"hold"``, on the bucket lease of
  ``hold``; ``P ctid/<ctid>`` → the AoR, on the same bucket;
- ``P claims/<ctid>/<mod_revision of the deleted binding>``: written with every delete of a binding key
  (and by the winner of an orphan claim);
- ``P members/<member id>``: ``{"sip": address}`` on the member's liveness lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import marshal
import random
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import fields, replace
from typing import Any

from registrar.config import Settings
from registrar.records import (
    RECORD_VERSION,
    AorRecord,
    Binding,
    MainMeta,
    _binding_from_values,
    _binding_values,
)
from registrar.store.base import Pending, StoreListener, StoreUnavailable, aor_key, ctid_key
from registrar.store.etcd_client import (
    Compacted,
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    EventType,
    KeyValue,
    LeaseNotFound,
    LeasePool,
    Op,
    TxnResult,
    WatchEvent,
    absent,
    mod_revision_is,
    op_delete,
    op_get,
    op_put,
)

log = logging.getLogger(__name__)

__all__ = ["EtcdStore"]

_FIELDS = [f.name for f in fields(Binding)]
_OWNER = _FIELDS.index("owner")
_EXPIRES = _FIELDS.index("expires_at")
_LIFETIME = _FIELDS.index("local_expires")
_SOURCE = _FIELDS.index("source")
# Fields a steady-state refresh changes: the owner keeps them in memory only.
_VOLATILE = frozenset(_FIELDS.index(n) for n in ("cseq", "expires_at", "updated_at", "owner", "relayed_cseq"))
_CONN = 3  # index of Peer.conn in the source tuple

_EMPTY = marshal.dumps(())
CLAIM_TTL = 300.0  # claim keys outlive any watcher that could still see the delete they guard
CACHE_LIMIT = 200_000  # fetched AoRs kept; the oldest go first


def _escape(aor: str) -> bytes:
    return aor.replace("%", "%25").replace("/", "%2F").encode()


def _unescape(text: bytes) -> str:
    return text.decode().replace("%2F", "/").replace("%25", "%")


def _stable(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A binding's values without the ones a refresh changes (what peers need to see unchanged)."""
    return tuple(v for i, v in enumerate(values) if i not in _VOLATILE)


class _Entry:
    """A fetched AoR: ``rev`` is the revision it is known at (events up to it are in), ``version`` the head's
    mod_revision (0: no head), ``data`` the marshalled bindings ``((values, hold, mod_revision, lease), ...)``
    exactly as etcd holds them."""

    __slots__ = ("data", "meta", "rev", "version")

    def __init__(self, rev: int, version: int, meta: MainMeta | None, data: bytes) -> None:
        self.rev = rev
        self.version = version
        self.meta = meta
        self.data = data

    def stored(self) -> dict[int, tuple[tuple[Any, ...], float, int, int]]:
        return {item[0][0]: item for item in marshal.loads(self.data)}


class EtcdStore:
    """The store shared by every registrar process of one MidRegistrar (see the module docstring).

    ``calls`` counts the etcd requests made for data (fetches, writes, index reads, claims): divide by the
    refreshes handled to get calls per refresh. ``background_calls`` counts health checks, member keepalives
    and registrations; lease grants are ``pool.grants``.
    """

    listener: StoreListener | None

    def __init__(
        self, settings: Settings, *, member_id: str | None = None, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self._rng = rng or random.SystemRandom()
        self.member_id = member_id or f"{socket.gethostname()}-{self._rng.getrandbits(32):08x}"
        self.listener = None
        self.prefix = settings.etcd_prefix.encode()
        self.client = EtcdClient(
            settings.etcd_endpoints,
            ca_file=settings.etcd_ca_file,
            cert_file=settings.etcd_cert_file,
            key_file=settings.etcd_key_file,
            username=settings.etcd_username,
            password=settings.etcd_password,
            timeout=settings.etcd_timeout,
        )
        hold = float(settings.etcd_hold)
        self.hold = hold
        self.margin = max(1.0, hold / 10)  # rewrite when the new expiry comes this close to the lease's end
        bucket = max(1.0, min(5.0, hold / 60))
        # Each binding puts two keys (binding + index) on its lease: 500 bindings → ≤ ~1,000 keys.
        self.pool = LeasePool(self.client, bucket=bucket, max_keys=500, min_ttl=2)
        self.available = False
        self.calls = 0
        self.background_calls = 0
        self.health_interval = 1.0
        self.address = ""
        self._members: dict[str, str] = {}
        self._member_lease = 0
        self._cache: dict[str, _Entry] = {}
        self._overlay: dict[int, bytes] = {}  # ctid → marshal((binding values, hold, aor)), owner == me
        self._ctids: dict[int, str] = {}  # ctid → AoR ("" = no such ctid, until the index appears)
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._ctid_fetching: dict[int, asyncio.Task[None]] = {}
        self._writing: dict[str, int] = {}
        self._tickets = itertools.count(1)
        self._ops: dict[asyncio.Task[None], Callable[[], None]] = {}  # in flight → how to fail it
        self._inflight = 0
        # Data calls in flight at once: a burst (every phone re-registering after an outage) queues here
        # instead of starving the client so that calls miss their deadline and the store turns unavailable.
        self._limit = asyncio.Semaphore(64)
        self._recent: dict[str, int] = {}  # AoR → last event revision, while something is in flight
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._watch_rev = 0
        self._closed = False
        # Orphan detection: events of the revisions seen since the last flush.
        self._deleted: list[tuple[int, str, int, KeyValue]] = []  # (revision, aor, ctid, prev_kv)
        self._heads_deleted: dict[tuple[int, str], KeyValue] = {}
        self._claimed: set[tuple[int, int, int]] = set()  # (revision, ctid, binding mod_revision)
        self._flush_handle: asyncio.Handle | None = None
        self.orphan_claims_won = 0

    # ------------------------------------------------------------------------------------------ keys

    def _head_key(self, aor: str) -> bytes:
        return self.prefix + b"aor/" + _escape(aor)

    def _binding_key(self, aor: str, ctid: int) -> bytes:
        return self._head_key(aor) + b"/ct/%d" % ctid

    def _index_key(self, ctid: int) -> bytes:
        return self.prefix + b"ctid/%d" % ctid

    def _claim_key(self, ctid: int, mod_revision: int) -> bytes:
        return self.prefix + b"claims/%d/%d" % (ctid, mod_revision)

    def _member_key(self, member: str) -> bytes:
        return self.prefix + b"members/" + member.encode()

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self, member_address: str) -> None:
        """Connect, register this member, start the watch and the health loop. Loads no bindings: AoRs are
        fetched when first asked for. When etcd is down, the store starts unavailable and recovers alone."""
        self.address = member_address
        await self.client.connect()
        rev = 0
        try:
            rev = await self._list_members()
            await self._register()
            self.available = True
        except EtcdError as exc:
            log.warning("etcd store starts unavailable: %s", exc)
        self._watch_rev = rev
        loop = asyncio.get_running_loop()
        self._watch_task = loop.create_task(self._watch_loop(rev + 1 if rev else 0))
        self._health_task = loop.create_task(self._health_loop())
        if not self.available:
            self._notify_availability(False)

    async def close(self, *, revoke: bool = True) -> None:
        """Stop the tasks and revoke the member lease (peers see this member gone at once). With
        ``revoke=False`` the lease is left to run out, as when the process dies (tests)."""
        if self._closed:
            return
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        tasks = [t for t in (self._watch_task, self._health_task) if t is not None]
        tasks += [*self._tasks, *self._ops]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if revoke and self._member_lease:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self._member_lease)
        await self.pool.close()
        await self.client.close()

    async def _list_members(self) -> int:
        self.background_calls += 1
        page = await self.client.get_prefix(self.prefix + b"members/")
        members: dict[str, str] = {}
        for kv in page.kvs:
            member = kv.key[len(self.prefix) + len(b"members/") :].decode()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                members[member] = json.loads(kv.value)["sip"]
        self._members = members
        return page.revision

    async def _register(self) -> None:
        """Put this member's key on a fresh liveness lease (same member id after an outage)."""
        self.background_calls += 2
        lease = await self.client.grant(self.settings.member_ttl)
        value = json.dumps({"sip": self.address}).encode()
        await self.client.put(self._member_key(self.member_id), value, lease=lease)
        old, self._member_lease = self._member_lease, lease
        self._members[self.member_id] = self.address
        if old and old != lease:
            self._spawn(self._revoke_quietly(old))

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
        return await self.client.health(self.settings.etcd_timeout, key=self._member_key(self.member_id))

    async def _health_loop(self) -> None:
        ttl = self.settings.member_ttl
        keepalive_every = max(0.5, ttl / 3)
        kept_at = time.monotonic()
        backoff = 0.2
        while not self._closed:
            if self.available:
                await asyncio.sleep(min(self.health_interval, keepalive_every))
                self.background_calls += 1
                if not await self._healthy():
                    self._lost(EtcdUnavailable("health check failed"))
                    continue
                if time.monotonic() - kept_at >= keepalive_every:
                    try:
                        self.background_calls += 1
                        left = await self.client.keepalive_once(self._member_lease)
                        if left <= 0:
                            log.warning("member lease of %s was gone: registering again", self.member_id)
                            await self._register()
                        kept_at = time.monotonic()
                    except EtcdUnavailable as exc:
                        self._lost(exc)
                    except EtcdError as exc:
                        log.warning("member keepalive: %s", exc)
                backoff = 0.2
            else:
                await asyncio.sleep(backoff * (0.5 + self._rng.random() / 2))
                backoff = min(backoff * 2, 2.0)
                self.background_calls += 1
                if not await self._healthy():
                    continue
                try:
                    listed = await self._list_members()
                    await self._register()
                except EtcdError as exc:
                    log.info("etcd back but registration failed: %s", exc)
                    continue
                kept_at = time.monotonic()
                if not self._watch_rev and self._watch_task is not None:
                    # started while etcd was down: watch from the revision just listed, so no change made
                    # after it can slip between the watch and the fetches to come
                    self._watch_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._watch_task
                    self._watch_task = None
                    self._watch_rev = listed
                self._cache.clear()
                self._ctids = {c: a for c, a in self._ctids.items() if a}
                self.available = True
                log.info("etcd available again: %s registered", self.member_id)
                self._notify_availability(True)
                if self._watch_task is None or self._watch_task.done():
                    self._watch_task = asyncio.get_running_loop().create_task(
                        self._watch_loop(self._watch_rev + 1)
                    )

    # ------------------------------------------------------------------------------------------ reads

    def load(self, aor: str) -> AorRecord | None:
        self._check()
        if self._writing.get(aor):
            raise Pending(aor_key(aor))
        entry = self._cache.get(aor)
        if entry is None:
            self._fetch(aor)
            raise Pending(aor_key(aor))
        return self._decode(aor, entry)

    def find_ctid(self, ctid: int) -> AorRecord | None:
        self._check()
        aor = self._ctids.get(ctid)
        if aor is None:
            self._fetch_ctid(ctid)
            raise Pending(ctid_key(ctid))
        if not aor:
            return None
        if self._writing.get(aor):
            raise Pending(aor_key(aor))
        entry = self._cache.get(aor)
        if entry is None:
            self._fetch_ctid(ctid)
            raise Pending(ctid_key(ctid))
        record = self._decode(aor, entry)
        if record is None or ctid not in record.bindings:
            return None
        return record

    def _decode(self, aor: str, entry: _Entry) -> AorRecord | None:
        if not entry.version and entry.data == _EMPTY:
            return None
        me = self.member_id
        bindings: dict[int, Binding] = {}
        overlay = self._overlay
        now = time.time()
        for values, hold, _rev, _lease in marshal.loads(entry.data):
            ctid = values[0]
            mine = values[_OWNER] == me and ctid in overlay
            if mine:
                binding = _binding_from_values(marshal.loads(overlay[ctid])[0])
            else:
                args = list(values)
                args[_EXPIRES] = foreign_expiry(values[_EXPIRES], values[_LIFETIME], hold, now)
                source = args[_SOURCE]
                if source[_CONN] is not None:
                    args[_SOURCE] = (*source[:_CONN], None, *source[_CONN + 1 :])
                binding = _binding_from_values(tuple(args))
            bindings[ctid] = binding
        return AorRecord(aor, bindings, entry.version, entry.meta)

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
        self._inflight += 1
        try:
            for _ in range(5):
                self.calls += 1
                head = self._head_key(aor)
                async with self._limit:
                    result = await self.client.txn([], [op_get(head), op_get(head + b"/ct/", prefix=True)])
                if self._store_fetched(aor, result):
                    break
        except EtcdUnavailable as exc:
            self._lost(exc)
        except EtcdError as exc:
            log.warning("fetch of %s failed: %s", aor, exc)
        finally:
            self._done_inflight()
            if self._ops.pop(me, None) is not None:  # type: ignore[arg-type]
                self._fetch_done(aor)

    def _store_fetched(self, aor: str, result: TxnResult) -> bool:
        """Cache what a fetch (or a lost compare-and-swap) read at ``result.revision``; False when the watch
        has already shown a later change of this AoR (the read is stale: read again)."""
        rev = result.revision
        if self._recent.get(aor, 0) > rev:
            return False
        heads, bindings = result.results[0].kvs, result.results[1].kvs
        meta: MainMeta | None = None
        version = 0
        if heads:
            version = heads[0].mod_revision
            data = json.loads(heads[0].value)
            if data.get("meta"):
                meta = MainMeta.from_dict(data["meta"])
        stored = []
        me = self.member_id
        for kv in bindings:
            binding, hold = _decode_binding(kv.value)
            values = _binding_values(binding)
            stored.append((values, hold, kv.mod_revision, kv.lease))
            if binding.owner != me:
                self._overlay.pop(binding.ctid, None)  # another process holds its flow now
        # No head but bindings (the head's lease ended first, e.g. leases reset unevenly by an etcd restart):
        # version 0, so the next write compares the head absent and puts it back.
        self._put_cache(aor, _Entry(rev, version, meta, marshal.dumps(tuple(stored))))
        return True

    def _put_cache(self, aor: str, entry: _Entry) -> None:
        cache = self._cache
        cache.pop(aor, None)
        if len(cache) >= CACHE_LIMIT:
            for old in list(itertools.islice(cache, len(cache) // 10 + 1)):
                del cache[old]
        cache[aor] = entry

    def _fetch_ctid(self, ctid: int) -> None:
        if ctid in self._ctid_fetching:
            return
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
            aor = self._ctids.get(ctid)
            if aor is None:
                self.calls += 1
                kv = await self.client.get(self._index_key(ctid))
                aor = kv.value.decode() if kv is not None else ""
                if len(self._ctids) >= CACHE_LIMIT:
                    self._ctids.clear()
                self._ctids[ctid] = aor
            if aor and aor not in self._cache:
                await asyncio.shield(self._fetch(aor))
        except EtcdUnavailable as exc:
            self._lost(exc)
        except EtcdError as exc:
            log.warning("contact id %d lookup failed: %s", ctid, exc)
        finally:
            if self._ops.pop(me, None) is not None:  # type: ignore[arg-type]
                self._ctid_done(ctid)

    def _done_inflight(self) -> None:
        self._inflight -= 1
        if self._inflight <= 0:
            self._inflight = 0
            self._recent.clear()

    # ------------------------------------------------------------------------------------------ writes

    def commit(self, record: AorRecord, old: AorRecord | None = None) -> int | None:
        self._check()
        now = time.time()
        aor = record.aor
        me = self.member_id
        before = old.bindings if old is not None else {}
        entry = self._cache.get(aor)
        expected = old.version if old is not None else 0
        if entry is None and old is None:
            entry = _Entry(0, 0, None, _EMPTY)  # a create: the head must be absent (compared in the txn)
        if entry is None or entry.version != expected:
            return self._fail_ticket(aor)  # changed (or forgotten) since it was loaded: decide afresh
        stored = entry.stored()
        write = record.meta != (old.meta if old is not None else None) or any(
            c not in record.bindings for c in before
        )
        changed: list[tuple[Binding, tuple[Any, ...]]] = []
        memory_only: list[tuple[Binding, tuple[Any, ...], float]] = []
        for ctid, binding in list(record.bindings.items()):
            prev = before.get(ctid)
            if prev is not None and binding == prev:
                continue
            values = _binding_values(binding)
            if binding.owner != me:
                binding = replace(binding, owner=me)
                record.bindings[ctid] = binding
                values = _binding_values(binding)
            changed.append((binding, values))
            held = stored.get(ctid)
            if (
                prev is None
                or held is None
                or held[0][_OWNER] != me
                or _stable(values) != _stable(_binding_values(prev))
                or binding.expires_at + self.margin > held[1]
            ):
                write = True
            else:
                memory_only.append((binding, values, held[1]))
        if not write:
            overlay = self._overlay
            for binding, values, hold in memory_only:
                overlay[binding.ctid] = marshal.dumps((values, hold, aor))
            return None
        ticket = next(self._tickets)
        removed = [(c, stored[c][2]) for c in stored if c not in record.bindings]
        self._start_write(ticket, aor, entry, record, changed, removed, now)
        return ticket

    def delete(self, aor: str, old: AorRecord | None = None) -> int | None:
        self._check()
        if old is None:
            entry = self._cache.get(aor)
            if entry is None:
                return self._fail_ticket(aor)
            old = self._decode(aor, entry)
            if old is None:
                return None
        if not old.bindings and old.version == 0:
            return None
        return self.commit(AorRecord(aor, {}, old.version, None), old)

    def _fail_ticket(self, aor: str) -> int:
        """A write that cannot be right (the cache moved on): reported lost at once, without an etcd call."""
        ticket = next(self._tickets)
        self._cache.pop(aor, None)

        def fail() -> None:
            if self.listener is not None:
                self.listener.store_committed(ticket, False)
                self.listener.store_ready(aor_key(aor))

        asyncio.get_running_loop().call_soon(fail)
        return ticket

    def _start_write(
        self,
        ticket: int,
        aor: str,
        entry: _Entry,
        record: AorRecord,
        changed: list[tuple[Binding, tuple[Any, ...]]],
        removed: list[tuple[int, int]],
        now: float,
    ) -> None:
        self._writing[aor] = self._writing.get(aor, 0) + 1
        task = asyncio.get_running_loop().create_task(
            self._run_write(ticket, aor, entry, record, changed, removed, now)
        )

        def fail() -> None:
            self._cache.pop(aor, None)
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
        self,
        ticket: int,
        aor: str,
        entry: _Entry,
        record: AorRecord,
        changed: list[tuple[Binding, tuple[Any, ...]]],
        removed: list[tuple[int, int]],
        now: float,
    ) -> None:
        me = asyncio.current_task()
        self._inflight += 1
        ok = False
        try:
            ok = await self._write(aor, entry, record, changed, removed, now)
        except EtcdUnavailable as exc:
            self._cache.pop(aor, None)
            self._lost(exc)
        except EtcdError as exc:
            log.warning("write of %s failed: %s", aor, exc)
            self._cache.pop(aor, None)
        finally:
            self._done_inflight()
            if self._ops.pop(me, None) is not None:  # type: ignore[arg-type]
                self._write_done(aor)
                if self.listener is not None:
                    self.listener.store_committed(ticket, ok)
                    self.listener.store_ready(aor_key(aor))

    async def _write(
        self,
        aor: str,
        entry: _Entry,
        record: AorRecord,
        changed: list[tuple[Binding, tuple[Any, ...]]],
        removed: list[tuple[int, int]],
        now: float,
    ) -> bool:
        head = self._head_key(aor)
        stored = entry.stored()
        for attempt in range(3):
            leases: list[int] = []
            try:
                compares: list[Compare] = [mod_revision_is(head, entry.version)]
                ops: list[Op] = []
                written: dict[int, tuple[tuple[Any, ...], float, int]] = {}
                if removed:
                    claim_lease = await self.pool.lease_for(now + CLAIM_TTL)
                    leases.append(claim_lease)
                    for ctid, rev in removed:
                        ops.append(op_put(self._claim_key(ctid, rev), self.member_id.encode(), claim_lease))
                    for ctid, _rev in removed:
                        ops.append(op_delete(self._binding_key(aor, ctid), prev_kv=False))
                        ops.append(op_delete(self._index_key(ctid), prev_kv=False))
                for binding, values in changed:
                    ctid = binding.ctid
                    hold = max(binding.expires_at, now) + self.hold
                    lease = await self.pool.lease_for(hold)
                    leases.append(lease)
                    written[ctid] = (values, hold, lease)
                    if ctid not in stored:
                        compares.append(absent(self._index_key(ctid)))
                    ops.append(op_put(self._binding_key(aor, ctid), _encode_binding(binding, hold), lease))
                    ops.append(op_put(self._index_key(ctid), aor.encode(), lease))
                holds = [written[c][1] if c in written else stored[c][1] for c in record.bindings]
                if holds:
                    head_lease = await self.pool.lease_for(max(holds))
                    leases.append(head_lease)
                    value = {
                        "v": RECORD_VERSION,
                        "aor": aor,
                        "meta": record.meta.to_dict() if record.meta is not None else None,
                        "ctids": [str(c) for c in record.bindings],
                    }
                    ops.append(op_put(head, json.dumps(value, separators=(",", ":")).encode(), head_lease))
                else:
                    ops.append(op_delete(head, prev_kv=False))
                self.calls += 1
                async with self._limit:
                    result = await self.client.txn(
                        compares, ops, [op_get(head), op_get(head + b"/ct/", prefix=True)]
                    )
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
                self._cache.pop(aor, None)
            return False
        rev = result.revision
        overlay = self._overlay
        for ctid, _rev in removed:
            overlay.pop(ctid, None)
            self._ctids.pop(ctid, None)
        items = []
        for ctid in record.bindings:
            if ctid in written:
                values, hold, lease = written[ctid]
                items.append((values, hold, rev, lease))
                overlay[ctid] = marshal.dumps((values, hold, aor))
                self._ctids[ctid] = aor
            else:
                items.append(stored[ctid])
        version = rev if record.bindings else 0
        if self._recent.get(aor, 0) > rev:
            self._cache.pop(aor, None)  # already changed again elsewhere: fetch afresh when asked
        else:
            self._put_cache(aor, _Entry(rev, version, record.meta, marshal.dumps(tuple(items))))
        record.version = version
        return True

    # ------------------------------------------------------------------------------------------ watch

    async def _watch_loop(self, start: int) -> None:
        next_rev = start
        while not self._closed:
            watch = self.client.watch_prefix(self.prefix, next_rev)
            try:
                async for item in watch:
                    if isinstance(item, Compacted):
                        log.warning("etcd history compacted under the watch: dropping the fetched cache")
                        self._cache.clear()
                        self._flush_orphans()
                        next_rev = 0
                        while not self._closed:
                            try:
                                next_rev = await self._list_members() + 1
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
        self._watch_rev = rev
        key = kv.key[len(self.prefix) :]
        kind, _, rest = key.partition(b"/")
        if kind == b"aor":
            esc, sep, tail = rest.partition(b"/")
            aor = _unescape(esc)
            if self._inflight:
                self._recent[aor] = max(self._recent.get(aor, 0), rev)
            entry = self._cache.get(aor)
            if entry is not None and rev > entry.rev:
                del self._cache[aor]
            if not sep:
                if event.type is EventType.DELETE and event.prev_kv is not None:
                    self._heads_deleted[(rev, aor)] = event.prev_kv
                    self._schedule_flush()
                return
            if not tail.startswith(b"ct/"):
                return
            ctid = int(tail[3:])
            if event.type is EventType.DELETE:
                if event.prev_kv is not None:
                    self._deleted.append((rev, aor, ctid, event.prev_kv))
                    self._schedule_flush()
            elif ctid in self._overlay:
                binding, _hold = _decode_binding(kv.value)
                if binding.owner != self.member_id:
                    del self._overlay[ctid]
        elif kind == b"claims":
            ctid_text, _, mod_text = rest.partition(b"/")
            if event.type is EventType.PUT and kv.create_revision == rev:
                with contextlib.suppress(ValueError):
                    self._claimed.add((rev, int(ctid_text), int(mod_text)))
        elif kind == b"ctid":
            with contextlib.suppress(ValueError):
                ctid = int(rest)
                if event.type is EventType.DELETE or self._ctids.get(ctid) == "":
                    self._ctids.pop(ctid, None)
        elif kind == b"members":
            member = rest.decode()
            if event.type is EventType.DELETE:
                self._members.pop(member, None)
            else:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._members[member] = json.loads(kv.value)["sip"]

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            # After the rest of this watch response: the events of one revision come in one response.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_orphans)

    def _flush_orphans(self) -> None:
        """Bindings deleted without a claim key written at the same revision ran out their lease: group them
        by (revision, AoR) and race every process for the claim."""
        self._flush_handle = None
        deleted, self._deleted = self._deleted, []
        heads, self._heads_deleted = self._heads_deleted, {}
        claimed, self._claimed = self._claimed, set()
        groups: dict[tuple[int, str], list[KeyValue]] = {}
        for rev, aor, ctid, prev in deleted:
            if (rev, ctid, prev.mod_revision) in claimed:
                continue  # deleted by a write that claimed it (its writer sends any De-REGISTER)
            groups.setdefault((rev, aor), []).append(prev)
            self._overlay.pop(ctid, None)
        for (rev, aor), prevs in groups.items():
            entry = self._cache.pop(aor, None)  # whatever its revision: a binding vanished under it
            meta: MainMeta | None = entry.meta if entry is not None else None
            known: dict[int, Binding] = {}
            if entry is not None and entry.version:
                decoded = self._decode(aor, entry)
                if decoded is not None:
                    known = decoded.bindings
            head = heads.get((rev, aor))
            if head is not None:
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    data = json.loads(head.value)
                    if data.get("meta"):
                        meta = MainMeta.from_dict(data["meta"])
            version = entry.version if entry is not None else 0
            self._spawn(self._claim_orphans(aor, prevs, known, meta, version, head is None and meta is None))

    async def _claim_orphans(
        self,
        aor: str,
        prevs: list[KeyValue],
        known: dict[int, Binding],
        meta: MainMeta | None,
        version: int,
        read_head: bool,
    ) -> None:
        try:
            gone = [_decode_binding(kv.value)[0] for kv in prevs]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("orphaned binding of %s not understood: %s", aor, exc)
            return
        keys = [self._claim_key(b.ctid, kv.mod_revision) for b, kv in zip(gone, prevs, strict=True)]
        try:
            lease = await self.pool.lease_for(time.time() + CLAIM_TTL)
            self.calls += 1
            result = await self.client.txn(
                [absent(k) for k in keys], [op_put(k, self.member_id.encode(), lease) for k in keys]
            )
            if not result.succeeded:
                return
            self.orphan_claims_won += 1
            for binding in gone:
                self._ctids.pop(binding.ctid, None)
            if read_head:
                self.calls += 1
                head = await self.client.get(self._head_key(aor))
                if head is not None:
                    version = head.mod_revision
                    data = json.loads(head.value)
                    if data.get("meta"):
                        meta = MainMeta.from_dict(data["meta"])
        except EtcdUnavailable as exc:
            self._lost(exc)
            return
        except EtcdError as exc:
            log.warning("orphan claim for %s failed: %s", aor, exc)
            return
        bindings = dict(known)
        for binding in gone:
            bindings[binding.ctid] = binding
        before = AorRecord(aor, bindings, version, meta)
        if self.listener is not None:
            self.listener.orphans_expired(before, gone)

    # ------------------------------------------------------------------------------------------ the rest

    def new_contact_id(self) -> int:
        while True:
            ctid = self._rng.getrandbits(63)
            if ctid and ctid not in self._overlay and ctid not in self._ctids:
                return ctid

    def owns(self, binding: Binding) -> bool:
        return binding.owner == self.member_id

    def member_address(self, member: str) -> str | None:
        return self._members.get(member)

    @property
    def members(self) -> dict[str, str]:
        """Live members (id → internal SIP address) as the watch last showed them."""
        return dict(self._members)

    def purge_expired(self, now: float) -> int:
        """Forget owned bindings whose expiry has passed (their keys go with the owner's delete or lease)."""
        gone = [c for c, data in self._overlay.items() if marshal.loads(data)[0][_EXPIRES] <= now]
        for ctid in gone:
            del self._overlay[ctid]
        return len(gone)

    def counts(self) -> tuple[int, int]:
        """(AoRs in the fetched cache, bindings this process owns)."""
        return len(self._cache), len(self._overlay)


def foreign_expiry(written: float, lifetime: int, hold: float, now: float) -> float:
    """When a binding that another process owns expires, as this one shows it (200 OKs, /v1/aors, lookups).

    The owner answers the phone's refreshes without writing them until the lease would lapse, so the written
    expiry can be long past while the phone is registered: the owner vouches for the binding until ``hold``,
    and it must stay valid (routable) until then. The lifetime shown must still be one the phone's siblings
    can believe: the written expiry while it lies ahead, then one granted lifetime from now (the phone
    refreshes within it), never beyond the hold."""
    if written > now:
        return min(written, hold)
    if lifetime > 0:
        return min(now + lifetime, hold)
    return hold


def _encode_binding(binding: Binding, hold: float) -> bytes:
    data = binding.to_dict()
    data["v"] = RECORD_VERSION
    data["hold"] = hold
    return json.dumps(data, separators=(",", ":")).encode()


def _decode_binding(value: bytes) -> tuple[Binding, float]:
    data = json.loads(value)
    data.pop("v", None)
    hold = float(data.pop("hold", data.get("expires_at", 0.0)))
    return Binding.from_dict(data), hold
