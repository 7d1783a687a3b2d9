"""A small asyncio etcd v3 layer for the etcd store (docs/architecture.md "Shared state in etcd", "etcd client
choice").

Built on etcd3aio (the only gRPC etcd client this process imports: two of them clash on proto symbols). It
adds what the registrar needs and the library leaves to its caller:

- one exception for "cannot reach etcd" (:class:`EtcdUnavailable`: answer 503, turn ``/readyz`` false) and
  one for everything else (:class:`EtcdError`), with a deadline on every call (a cut etcd never hangs a
  REGISTER);
- transactions that are never retried by the library (a retried compare-and-swap whose first attempt
  landed would report a conflict it caused itself), with helpers for ``mod_revision == N`` and create-only;
- :class:`LeasePool`: shared, bucketed leases, so 100,000 bindings need a few hundred leases at most;
- :meth:`EtcdClient.watch_prefix`: a watch that resumes from the revision after its last event when etcd
  restarts or the connection drops, and reports :class:`Compacted` when that revision is gone.

Keys and values are bytes: the store owns the key layout and the JSON records.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from etcd3aio import (
    EtcdConnectionError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)
from etcd3aio import EtcdError as _LibError
from etcd3aio._protobuf import (
    Compare as _PbCompare,
)
from etcd3aio._protobuf import (
    DeleteRangeRequest,
    PutRequest,
    RangeRequest,
    RequestOp,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService

from registrar.store.etcd_layout import prefix_range_end

log = logging.getLogger(__name__)

__all__ = [
    "Compacted",
    "Compare",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdUnavailable",
    "EventType",
    "KeyValue",
    "LeaseNotFound",
    "LeasePool",
    "Op",
    "OpResult",
    "RangeResult",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "absent",
    "mod_revision_is",
    "op_delete",
    "op_get",
    "op_put",
    "value_is",
]


# ---------------------------------------------------------------------------------------------------- errors


class EtcdError(Exception):
    """etcd answered, but not with success (bad request, permission, lease gone, ...)."""


class EtcdUnavailable(EtcdError):
    """etcd cannot be reached or has no quorum: state must not be guessed.

    A write that raised this has an unknown outcome: it may never apply, or apply later, even after a
    write sent once etcd came back (seen in the network-cut test). Guard writes with a compare."""


class LeaseNotFound(EtcdError):
    """A put named a lease etcd no longer has (expired or revoked): grant another and write again."""


class EtcdCompacted(EtcdError):
    """A read or watch asked for a revision etcd has compacted away: re-list at the current revision."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _never_sent(exc: BaseException) -> bool:
    """gRPC could not connect to the endpoint at all: the request never reached etcd (safe to send again)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        text = f"{exc.code().name} {exc.details() or ''}".lower()
    else:
        text = str(exc).lower()
    return "unavailable" in text and (
        "failed to connect" in text or "connections to all backends failing" in text
    )


def _map_error(exc: BaseException, what: str) -> EtcdError:
    """Sort a library/gRPC error into unavailable vs other, keeping the original as ``__cause__``."""
    if isinstance(exc, EtcdError):
        return exc
    if isinstance(exc, EtcdConnectionError | EtcdTransientError | TimeoutError):
        return EtcdUnavailable(f"{what}: {exc or type(exc).__name__}")
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        if exc.code() in _UNAVAILABLE_CODES:
            return EtcdUnavailable(f"{what}: {exc.code().name} {details}")
        if "lease not found" in details:
            return LeaseNotFound(f"{what}: {details}")
        if "compacted" in details:
            return EtcdCompacted(0)
        return EtcdError(f"{what}: {exc.code().name} {details}")
    if isinstance(exc, grpc.aio.UsageError):
        return EtcdUnavailable(f"{what}: client closed")
    return EtcdError(f"{what}: {exc}")


# ---------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as etcd holds it. ``mod_revision`` is what a compare-and-swap compares against."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int

    @classmethod
    def _from_pb(cls, kv: Any) -> KeyValue:
        return cls(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class RangeResult:
    """One page of a range read, taken at ``revision`` (watch from ``revision + 1`` to miss nothing)."""

    kvs: list[KeyValue]
    revision: int
    more: bool
    count: int


class _Target(enum.IntEnum):
    VERSION = 0
    CREATE = 1
    MOD = 2
    VALUE = 3


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: :func:`mod_revision_is`, :func:`absent` or :func:`value_is`."""

    key: bytes
    target: _Target
    revision: int = 0
    value: bytes = b""

    def _to_pb(self) -> Any:
        if self.target is _Target.MOD:
            return _PbCompare(
                result=_PbCompare.EQUAL, target=_PbCompare.MOD, key=self.key, mod_revision=self.revision
            )
        if self.target is _Target.CREATE:
            return _PbCompare(
                result=_PbCompare.EQUAL, target=_PbCompare.CREATE, key=self.key, create_revision=self.revision
            )
        if self.target is _Target.VERSION:
            return _PbCompare(
                result=_PbCompare.EQUAL, target=_PbCompare.VERSION, key=self.key, version=self.revision
            )
        return _PbCompare(result=_PbCompare.EQUAL, target=_PbCompare.VALUE, key=self.key, value=self.value)


def mod_revision_is(key: bytes, revision: int) -> Compare:
    """True when the key was last written at ``revision`` (0: the key is absent): optimistic concurrency."""
    return Compare(key, _Target.MOD, revision)


def absent(key: bytes) -> Compare:
    """True when the key does not exist: a create-only claim (exactly one of N racing claimers wins)."""
    return Compare(key, _Target.CREATE, 0)


def value_is(key: bytes, value: bytes) -> Compare:
    return Compare(key, _Target.VALUE, value=value)


class _OpKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"
    GET = "get"


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a transaction branch: :func:`op_put`, :func:`op_delete` or :func:`op_get`."""

    kind: _OpKind
    key: bytes
    value: bytes = b""
    lease: int = 0
    prev_kv: bool = False
    prefix: bool = False

    def _to_pb(self) -> Any:
        end = prefix_range_end(self.key) if self.prefix else b""
        if self.kind is _OpKind.PUT:
            return RequestOp(request_put=PutRequest(key=self.key, value=self.value, lease=self.lease))
        if self.kind is _OpKind.DELETE:
            return RequestOp(
                request_delete_range=DeleteRangeRequest(key=self.key, range_end=end, prev_kv=self.prev_kv)
            )
        return RequestOp(request_range=RangeRequest(key=self.key, range_end=end))


def op_put(key: bytes, value: bytes, lease: int = 0) -> Op:
    return Op(_OpKind.PUT, key, value, lease=lease)


def op_delete(key: bytes, prev_kv: bool = True, prefix: bool = False) -> Op:
    """Delete a key (or every key under ``key`` with ``prefix``), returning what was deleted."""
    return Op(_OpKind.DELETE, key, prev_kv=prev_kv, prefix=prefix)


def op_get(key: bytes, prefix: bool = False) -> Op:
    """Read inside the transaction: the failure branch of a CAS reads the current record in the same trip."""
    return Op(_OpKind.GET, key, prefix=prefix)


@dataclass(frozen=True, slots=True)
class OpResult:
    """What one op of the branch that ran returned: ``kvs`` (get), ``prev_kvs`` + ``deleted`` (delete)."""

    kvs: list[KeyValue] = field(default_factory=list)
    prev_kvs: list[KeyValue] = field(default_factory=list)
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded``: every compare held and the success branch ran. ``revision``: the store's after it."""

    succeeded: bool
    revision: int
    results: list[OpResult]


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under the watched prefix. A DELETE carries ``prev_kv``: the record that went (De-REGISTER)."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class Compacted:
    """The watch's next revision was compacted: events were lost. Re-list, then watch from the list's
    ``revision + 1``. The iterator ends after yielding this."""

    compact_revision: int


# ---------------------------------------------------------------------------------------------------- client


def _targets(endpoints: Sequence[str]) -> tuple[list[str], bool]:
    """(one gRPC target per endpoint, TLS implied by an https:// endpoint)."""
    tls = False
    hosts: list[str] = []
    for ep in endpoints:
        if ep.startswith("https://"):
            tls, ep = True, ep[len("https://") :]
        elif ep.startswith("http://"):
            ep = ep[len("http://") :]
        hosts.append(ep.rstrip("/").replace("localhost", "127.0.0.1"))
    if not hosts:
        raise ValueError("no etcd endpoint")
    return hosts, tls


@dataclass
class _Endpoint:
    """The channel to one endpoint and the services over it."""

    target: str
    channel: grpc.aio.Channel
    kv: KVService
    lease: LeaseService
    maint: MaintenanceService
    auth: AuthService
    watch: WatchStub


class EtcdClient:
    """A gRPC channel to etcd with the calls the etcd store makes.

    Calls go to one endpoint at a time (a random one first, so processes spread). When a call to it runs out
    of time or finds it unavailable, the following calls go to the next endpoint and open watches resume
    there: a member that hangs (stopped, cut off, without a leader) costs one deadline, not the seconds gRPC's
    keepalive takes to give up on its connection (a load balancer over all endpoints kept sending a share of
    the calls to it until then). One endpoint that is a DNS name is balanced over its addresses by gRPC.

    Every call has a deadline (``timeout``) and raises :class:`EtcdUnavailable` when etcd cannot answer in
    time, :class:`EtcdError` for the rest. Reads, puts and lease calls are retried by the library on
    UNAVAILABLE (a few times, < 0.2 s); transactions and deletes are sent once (their outcome would be
    ambiguous on retry). The channel reconnects by itself with a backoff capped at ``reconnect_backoff_max``
    (gRPC's own default grows to 120 s, far too long to come back after an etcd restart).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 2.0,
        keepalive_time: float = 5.0,
        keepalive_timeout: float = 3.0,
        reconnect_backoff_max: float = 1.0,
        token_refresh: float = 240.0,
    ) -> None:
        """``endpoints``: ``host:port`` or ``http(s)://host:port``. TLS when ``ca_file`` is given or an
        endpoint is https (system roots then); mutual TLS with ``cert_file``/``key_file``. ``username`` and
        ``password`` log in to etcd's auth (token renewed every ``token_refresh`` s and on rejection).
        ``keepalive_time`` + ``keepalive_timeout`` bound how long a cut connection goes unnoticed (etcd
        refuses pings more often than every 5 s)."""
        if (username is None) != (password is None):
            raise ValueError("etcd username and password go together")
        if (cert_file is None) != (key_file is None):
            raise ValueError("etcd client cert and key go together")
        self.endpoints = list(endpoints)
        self._targets, tls = _targets(self.endpoints)
        self._current = random.randrange(len(self._targets))
        self._open: dict[int, _Endpoint] = {}
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self.failovers = 0
        self._tls = tls or ca_file is not None or cert_file is not None
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._server_name = server_name
        self._username, self._password = username, password
        self.timeout = timeout
        self._options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(reconnect_backoff_max * 1000)),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.enable_retries", 0),
        ]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._token_refresh = token_refresh
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._maint: MaintenanceService | None = None
        self._auth: AuthService | None = None
        self._watch_stub: WatchStub | None = None
        self._token: str | None = None
        self._token_at = 0.0
        self._auth_lock = asyncio.Lock()

    # -- lifecycle

    async def connect(self) -> None:
        """Open the channel (lazy: etcd need not be up yet) and log in when credentials are set.

        Raises :class:`EtcdUnavailable` only when credentials are set and etcd cannot be reached to log in.
        """
        if self._channel is not None:
            return
        self._use(self._current)
        if self._username is not None:
            await self._login()

    def _endpoint(self, index: int) -> _Endpoint:
        """The channel to endpoint ``index`` (opened once, lazily: etcd need not be up yet)."""
        ep = self._open.get(index)
        if ep is not None:
            return ep
        target = self._targets[index]
        if self._tls:

            def read(p: str | Path | None) -> bytes | None:
                return Path(p).read_bytes() if p is not None else None

            creds = grpc.ssl_channel_credentials(
                root_certificates=read(self._ca_file),
                private_key=read(self._key_file),
                certificate_chain=read(self._cert_file),
            )
            channel = grpc.aio.secure_channel(target, creds, options=self._options)
        else:
            channel = grpc.aio.insecure_channel(target, options=self._options)
        ep = _Endpoint(
            target,
            channel,
            KVService(channel),
            LeaseService(channel),
            MaintenanceService(channel, max_attempts=1),
            AuthService(channel),
            WatchStub(channel),
        )
        if self._token:
            for svc in (ep.kv, ep.lease, ep.maint):
                svc.set_token(self._token)
        self._open[index] = ep
        return ep

    def _use(self, index: int) -> None:
        ep = self._endpoint(index)
        self._current = index
        self._channel, self._kv, self._lease, self._maint = ep.channel, ep.kv, ep.lease, ep.maint
        self._auth, self._watch_stub = ep.auth, ep.watch

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self._targets[self._current]

    def _fail_over(self, used: int, why: EtcdError) -> None:
        """A call to endpoint ``used`` found it unavailable: move to the next one (once per failure, however
        many calls in flight failed with it) and have the watches resume there."""
        if len(self._targets) < 2 or used != self._current or self._channel is None:
            return
        nxt = (used + 1) % len(self._targets)
        log.warning(
            "etcd endpoint %s failed (%s): switching to %s", self._targets[used], why, self._targets[nxt]
        )
        self.failovers += 1
        self._use(nxt)
        for watch in list(self._watches):
            watch.restart()

    async def close(self) -> None:
        """Close the channels; open watches end with :class:`EtcdUnavailable`."""
        if self._channel is not None:
            self._channel = None
            opened, self._open = list(self._open.values()), {}
            for ep in opened:
                await ep.channel.close()

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- auth

    async def _login(self) -> None:
        assert self._auth is not None and self._username is not None and self._password is not None
        async with self._auth_lock:
            try:
                resp = await self._auth.authenticate(self._username, self._password, timeout=self.timeout)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise _map_error(exc, "authenticate") from exc
            self._token, self._token_at = str(resp.token), time.monotonic()
            for ep in self._open.values():
                for svc in (ep.kv, ep.lease, ep.maint):
                    svc.set_token(self._token)

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    @property
    def _watch_metadata(self) -> tuple[tuple[str, str], ...]:
        """A watch requires a leader (etcd's "hasleader"): a member cut from its cluster ends the stream,
        which then resumes elsewhere, instead of keeping it open with no events."""
        return (("hasleader", "true"), *(self._metadata or ()))

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]], *, reads: bool = False) -> Any:
        """Run one library call with the error mapping, re-logging in once on an expired token.

        When the endpoint fails and the client moves to the next one, the call is sent there once more if
        that cannot do harm: it only ``reads``, or it never left (no connection to the endpoint). An etcd
        member stopped for an upgrade then costs no call at all."""
        if self._channel is None:
            raise EtcdUnavailable(f"{what}: not connected")
        if self._username is not None and time.monotonic() - self._token_at > self._token_refresh:
            await self._login()
        moved = False
        for attempt in (1, 2, 3):
            used = self._current
            try:
                return await fn()
            except EtcdUnauthenticatedError as exc:
                if self._username is None or attempt == 2:
                    raise EtcdError(f"{what}: {exc}") from exc
                await self._login()
            except EtcdPermissionDeniedError as exc:
                raise EtcdError(f"{what}: {exc}") from exc
            except (_LibError, grpc.aio.AioRpcError, grpc.aio.UsageError, TimeoutError) as exc:
                err = _map_error(exc, what)
                if isinstance(err, EtcdUnavailable):
                    self._fail_over(used, err)
                    if not moved and self._current != used and (reads or _never_sent(exc)):
                        moved = True
                        continue
                raise err from exc
        raise AssertionError("unreachable")

    @property
    def kv(self) -> KVService:
        if self._kv is None:
            raise EtcdUnavailable("not connected")
        return self._kv

    @property
    def lease_service(self) -> LeaseService:
        if self._lease is None:
            raise EtcdUnavailable("not connected")
        return self._lease

    # -- KV

    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or None when absent (linearizable: sees every write acknowledged before it)."""
        resp = await self._call("get", lambda: self.kv.get(key, timeout=self.timeout), reads=True)
        return KeyValue._from_pb(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(
        self,
        prefix: bytes,
        *,
        limit: int = 0,
        start_after: bytes | None = None,
        revision: int = 0,
        keys_only: bool = False,
    ) -> RangeResult:
        """One page of the keys under ``prefix`` in key order: at most ``limit`` (0 = all) keys greater than
        ``start_after``, read at ``revision`` (0 = now). Pass the first page's ``revision`` to the next pages
        for a consistent snapshot; :class:`EtcdCompacted` when it was compacted meanwhile."""
        start = prefix if start_after is None else start_after + b"\0"
        end = prefix_range_end(prefix)

        def call() -> Any:
            return self.kv.get(
                start,
                range_end=end,
                revision=revision,
                limit=limit,
                keys_only=keys_only,
                timeout=self.timeout,
            )

        resp = await self._call("range", call, reads=True)
        return RangeResult(
            [KeyValue._from_pb(kv) for kv in resp.kvs], resp.header.revision, resp.more, resp.count
        )

    async def iter_prefix(self, prefix: bytes, *, page_size: int = 1000) -> AsyncIterator[RangeResult]:
        """Every key under ``prefix``, page by page, all pages from one snapshot (the first page's revision):
        a start-up re-list of 500,000 bindings never holds one huge response."""
        revision = 0
        after: bytes | None = None
        while True:
            page = await self.get_prefix(prefix, limit=page_size, start_after=after, revision=revision)
            revision = page.revision
            yield page
            if not page.more or not page.kvs:
                return
            after = page.kvs[-1].key

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write the key (on ``lease`` when non-zero); returns its new mod_revision.
        :class:`LeaseNotFound` when the lease has expired."""
        resp = await self._call("put", lambda: self.kv.put(key, value, lease=lease, timeout=self.timeout))
        return int(resp.header.revision)

    async def delete(self, key: bytes, prev_kv: bool = True, prefix: bool = False) -> list[KeyValue]:
        """Delete the key (or every key under it with ``prefix``); returns the deleted records (with
        ``prev_kv``). Sent once: a retry after a lost reply would return nothing."""
        end = prefix_range_end(key) if prefix else None

        def call() -> Any:
            return self.kv.delete(key, range_end=end, prev_kv=prev_kv, timeout=self.timeout, max_attempts=1)

        resp = await self._call("delete", call)
        return [KeyValue._from_pb(kv) for kv in resp.prev_kvs]

    async def txn(
        self, compares: Sequence[Compare], success_ops: Sequence[Op], failure_ops: Sequence[Op] = ()
    ) -> TxnResult:
        """All ``compares`` hold → ``success_ops`` run, else ``failure_ops``, atomically at one revision.

        Sent exactly once: on :class:`EtcdUnavailable` the outcome is unknown (re-read before deciding; a
        create-only claim may have been won by this very call)."""

        def call() -> Any:
            return self.kv.txn(
                [c._to_pb() for c in compares],
                [o._to_pb() for o in success_ops],
                [o._to_pb() for o in failure_ops],
                timeout=self.timeout,
                max_attempts=1,
            )

        reads = all(o.kind is _OpKind.GET for o in (*success_ops, *failure_ops))
        resp = await self._call("txn", call, reads=reads)
        results: list[OpResult] = []
        for r in resp.responses:
            kind = r.WhichOneof("response")
            if kind == "response_range":
                results.append(OpResult(kvs=[KeyValue._from_pb(kv) for kv in r.response_range.kvs]))
            elif kind == "response_delete_range":
                dr = r.response_delete_range
                results.append(
                    OpResult(prev_kvs=[KeyValue._from_pb(kv) for kv in dr.prev_kvs], deleted=dr.deleted)
                )
            else:
                results.append(OpResult())
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), results)

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (tests; the server compacts by itself in production)."""
        await self._call(
            "compact", lambda: self.kv.compact(revision, physical=True, timeout=self.timeout * 5)
        )

    async def revision(self) -> int:
        """The store's current revision."""
        resp = await self._call(
            "revision", lambda: self.kv.get(b"\0", count_only=True, timeout=self.timeout), reads=True
        )
        return int(resp.header.revision)

    # -- leases

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd raises anything below its minimum, ~2 s); returns its id."""
        resp = await self._call("lease grant", lambda: self.lease_service.grant(ttl, timeout=self.timeout))
        if resp.error:
            raise EtcdError(f"lease grant: {resp.error}")
        return int(resp.ID)

    async def revoke(self, lease_id: int) -> None:
        """Revoke the lease and delete its keys now (watchers see DELETEs). A lease already gone is fine."""
        with contextlib.suppress(LeaseNotFound):
            await self._call(
                "lease revoke", lambda: self.lease_service.revoke(lease_id, timeout=self.timeout)
            )

    async def keepalive_once(self, lease_id: int) -> int:
        """Renew the lease to its full TTL once; returns that TTL, 0 when the lease no longer exists."""

        async def call() -> int:
            stream = self.lease_service.keep_alive(lease_id)
            try:
                async with asyncio.timeout(self.timeout):
                    async for resp in stream:
                        return int(resp.TTL)
                return 0
            finally:
                stream.cancel()

        return int(await self._call("lease keepalive", call))

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left (-1 when gone)."""
        resp = await self._call(
            "lease ttl", lambda: self.lease_service.time_to_live(lease_id, timeout=self.timeout)
        )
        return int(resp.TTL)

    async def leases(self) -> list[int]:
        """Ids of every live lease on the cluster (all clients: a measurement, not a hot-path call)."""
        resp = await self._call("leases", lambda: self.lease_service.leases(timeout=self.timeout * 5))
        return [int(lease.ID) for lease in resp.leases]

    # -- health

    async def health(self, timeout: float | None = None, key: bytes = b"health") -> bool:
        """True when etcd answers a linearizable read in time (so it has a leader and quorum): ``/readyz``.
        ``key``: what to read (count only); with etcd auth, a key the user may read (its own prefix)."""
        if self._kv is None:
            return False
        t = timeout or self.timeout
        try:
            await self._call(
                "health", lambda: self.kv.get(key, count_only=True, timeout=t, max_attempts=1), reads=True
            )
        except EtcdError:
            return False
        return True

    # -- watch

    def watch_prefix(
        self,
        prefix: bytes,
        start_revision: int = 0,
        prev_kv: bool = True,
        *,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
    ) -> Watch:
        """Every change under ``prefix`` from ``start_revision`` (0 = from now), as an async iterator of
        :class:`WatchEvent` and, when history was compacted, a final :class:`Compacted`.

        When the stream breaks (etcd restarted, connection cut, no leader), it reconnects with jittered
        exponential backoff and resumes at the revision after the last event it delivered, so nothing is
        lost or repeated. ``Watch.connected`` tells whether the stream is currently up."""
        watch = Watch(self, prefix, start_revision, prev_kv, backoff_initial, backoff_max)
        self._watches.add(watch)
        return watch


async def _requests(create: Any) -> AsyncIterator[Any]:
    """The request side of a watch stream: one create, then held open (closing it would end the watch)."""
    yield create
    await asyncio.Event().wait()


class Watch:
    """The iterator returned by :meth:`EtcdClient.watch_prefix`. ``next_revision``: where it resumes."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        start_revision: int,
        prev_kv: bool,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.next_revision = start_revision
        self._prev_kv = prev_kv
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.connected = False
        self.connected_at = 0.0  # monotonic time of the last (re)connection: a backlog replays after it
        self.reconnects = 0
        self._closed = False
        self._restarting = False
        self._stream: Any = None

    def __aiter__(self) -> AsyncIterator[WatchEvent | Compacted]:
        return self._run()

    async def close(self) -> None:
        """Stop the watch; the iterator ends."""
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()

    def restart(self) -> None:
        """Resume on the client's current endpoint (it failed over), after the last event delivered."""
        if self._stream is not None and not self._closed:
            self._restarting = True
            self._stream.cancel()

    async def _run(self) -> AsyncIterator[WatchEvent | Compacted]:
        client = self._client
        end = prefix_range_end(self.prefix)
        backoff = self._backoff_initial
        while not self._closed:
            stub = client._watch_stub
            if stub is None or client._channel is None:
                raise EtcdUnavailable("watch: client closed")
            create = WatchCreateRequest(
                key=self.prefix,
                range_end=end,
                start_revision=self.next_revision,
                prev_kv=self._prev_kv,
                progress_notify=True,
            )

            stream = stub.Watch(
                _requests(WatchRequest(create_request=create)), metadata=client._watch_metadata
            )
            self._stream = stream
            try:
                async for resp in stream:
                    if resp.compact_revision:
                        self.connected = False
                        yield Compacted(int(resp.compact_revision))
                        return
                    if resp.canceled:
                        reason = resp.cancel_reason or "canceled by etcd"
                        if "compacted" in reason:
                            yield Compacted(0)
                            return
                        raise EtcdError(f"watch: {reason}")
                    if resp.created:
                        self.connected = True
                        self.connected_at = time.monotonic()
                        backoff = self._backoff_initial
                        if self.next_revision == 0:
                            self.next_revision = int(resp.header.revision) + 1
                        continue
                    if not resp.events:
                        # Progress notification: etcd sends it only to a watcher that has caught up.
                        self.next_revision = max(self.next_revision, int(resp.header.revision) + 1)
                        continue
                    for ev in resp.events:
                        kv = KeyValue._from_pb(ev.kv)
                        prev = KeyValue._from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None
                        # Resume after the last delivered event, never after header.revision: a watcher
                        # catching up gets the *current* revision in its header before it has seen it all.
                        self.next_revision = kv.mod_revision + 1
                        yield WatchEvent(EventType.DELETE if ev.type == 1 else EventType.PUT, kv, prev)
                if self._closed:
                    return
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    return
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and client._username is not None:
                    with contextlib.suppress(EtcdError):
                        await client._login()
                elif exc.code() not in (
                    *_UNAVAILABLE_CODES,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.INTERNAL,
                ):
                    raise _map_error(exc, "watch") from exc
                log.info(
                    "etcd watch %r broke (%s); resuming at %d",
                    self.prefix,
                    exc.code().name,
                    self.next_revision,
                )
            except asyncio.CancelledError:
                if self._closed:  # close() cancelled the stream under us
                    return
                if not self._restarting:
                    raise
                self._restarting = False  # restart(): the client moved to another endpoint
                log.info(
                    "etcd watch %r moves to %s; resuming at %d",
                    self.prefix,
                    client.endpoint,
                    self.next_revision,
                )
            except grpc.aio.UsageError as exc:
                raise EtcdUnavailable("watch: client closed") from exc
            finally:
                self.connected = False
                self._stream = None
                stream.cancel()
            if self._closed:
                return
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self._backoff_max)


# ---------------------------------------------------------------------------------------------------- leases


@dataclass(slots=True)
class _BucketLease:
    lease_id: int
    end: float  # bucket end: etcd deletes the keys at [end, end + 1 s)
    keys: int = 0


@dataclass
class LeasePool:
    """Shared leases by expiry bucket: ``lease_for(expires_at)`` hands out a lease that ends at the end of
    the ``bucket``-second slot holding ``expires_at`` (never before it), shared by up to ``max_keys`` keys.

    Why: one lease per binding would make etcd revoke up to ~1,000 leases/s (20k simultaneous expiries came
    13.8 s late) and, in etcd 3.5, a put on a lease costs time proportional to the keys already on it (10k
    keys on one lease: ~1k puts/s instead of ~6k), hence the cap. Live leases ≈ max(keys / max_keys, spread
    of expiries / bucket). The next bucket's lease is granted ahead in the background so the write path does
    not wait for a grant; a lease whose keys were all released is revoked. The key's own ``expires_at`` stays
    the truth: an etcd restart resets every lease to its full TTL, so a lease may end later than its bucket.
    """

    client: EtcdClient
    bucket: float = 5.0
    max_keys: int = 1000
    clock: Callable[[], float] = time.time
    min_ttl: int = 5
    prefetch: bool = True
    _buckets: dict[int, list[_BucketLease]] = field(default_factory=dict, init=False, repr=False)
    _by_id: dict[int, tuple[int, _BucketLease]] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[int, asyncio.Future[_BucketLease]] = field(default_factory=dict, init=False, repr=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, init=False, repr=False)
    _pruned_at: float = field(default=0.0, init=False, repr=False)
    grants: int = field(default=0, init=False)

    def _slot(self, expires_at: float) -> int:
        return math.ceil(expires_at / self.bucket)

    async def lease_for(self, expires_at: float) -> int:
        """A lease id for a key that expires at ``expires_at`` (on ``clock``), counted against its cap.

        No etcd call at steady state (a lease with room exists, or was granted ahead); otherwise one grant.
        Call :meth:`release` when the key is deleted or moved to another lease."""
        now = self.clock()
        self._prune(now)
        slot = self._slot(expires_at)
        entry = self._room(slot)
        if entry is None:
            entry = await self._grant_shared(slot, now)
        entry.keys += 1
        if self.prefetch:
            if entry.keys == 1:  # a slot came into use: time moves on, the next writes land in the next one
                self._ahead(slot + 1)
            elif entry.keys == self.max_keys * 4 // 5:  # this lease is filling up: have the next one ready
                self._ahead(slot)
        return entry.lease_id

    def _room(self, slot: int) -> _BucketLease | None:
        for entry in self._buckets.get(slot, ()):
            if entry.keys < self.max_keys:
                return entry
        return None

    async def _grant_shared(self, slot: int, now: float) -> _BucketLease:
        """Grant for ``slot``, sharing one in-flight grant between concurrent callers."""
        while True:
            pending = self._pending.get(slot)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._pending[slot] = pending
                try:
                    entry = await self._grant(slot, now)
                except BaseException as exc:
                    pending.set_exception(exc)
                    pending.exception()  # mark retrieved: waiters re-raise their own
                    raise
                finally:
                    self._pending.pop(slot, None)
                pending.set_result(entry)
            else:
                await asyncio.shield(pending)
            entry_or_none = self._room(slot)
            if entry_or_none is not None:
                return entry_or_none

    async def _grant(self, slot: int, now: float) -> _BucketLease:
        end = slot * self.bucket
        ttl = max(self.min_ttl, math.ceil(end - now))
        lease_id = await self.client.grant(ttl)
        self.grants += 1
        entry = _BucketLease(lease_id, end)
        self._buckets.setdefault(slot, []).append(entry)
        self._by_id[lease_id] = (slot, entry)
        return entry

    def _ahead(self, slot: int) -> None:
        """Grant a lease for ``slot`` in the background unless one with room to spare (or a grant) exists."""
        spare = self.max_keys * 4 // 5
        if slot in self._pending or any(e.keys < spare for e in self._buckets.get(slot, ())):
            return

        async def grant() -> None:
            with contextlib.suppress(EtcdError):
                await self._grant_shared_spare(slot)

        task = asyncio.get_running_loop().create_task(grant())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _grant_shared_spare(self, slot: int) -> None:
        """Grant one more lease for ``slot`` (a spare, or the first of the next slot)."""
        pending = asyncio.get_running_loop().create_future()
        self._pending[slot] = pending
        try:
            entry = await self._grant(slot, self.clock())
            pending.set_result(entry)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()
            raise
        finally:
            self._pending.pop(slot, None)

    async def release(self, lease_id: int) -> None:
        """One key left ``lease_id`` (deleted, or rewritten on another lease); revoke the lease once empty."""
        found = self._by_id.get(lease_id)
        if found is None:
            return
        slot, entry = found
        entry.keys = max(0, entry.keys - 1)
        if entry.keys == 0:
            self._forget(slot, entry)
            with contextlib.suppress(EtcdError):
                await self.client.revoke(lease_id)

    def forget(self, lease_id: int) -> None:
        """Drop a lease etcd reported gone (:class:`LeaseNotFound`): the next ``lease_for`` grants anew."""
        found = self._by_id.get(lease_id)
        if found is not None:
            self._forget(*found)

    def _forget(self, slot: int, entry: _BucketLease) -> None:
        self._by_id.pop(entry.lease_id, None)
        entries = self._buckets.get(slot)
        if entries is not None:
            with contextlib.suppress(ValueError):
                entries.remove(entry)
            if not entries:
                del self._buckets[slot]

    def _prune(self, now: float) -> None:
        """Forget leases whose bucket has ended: etcd has deleted (or is deleting) their keys."""
        if now - self._pruned_at < 1.0:
            return
        self._pruned_at = now
        for slot in [s for s in self._buckets if s * self.bucket < now]:
            for entry in self._buckets.pop(slot):
                self._by_id.pop(entry.lease_id, None)

    @property
    def live(self) -> int:
        """Leases this pool holds (not yet ended, not revoked)."""
        return len(self._by_id)

    def lease_ids(self) -> list[int]:
        """The leases this pool holds."""
        return list(self._by_id)

    async def close(self, revoke: bool = False) -> None:
        """Stop background grants; with ``revoke``, revoke every lease (deletes their keys: tests only)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if revoke:
            for lease_id in self.lease_ids():
                with contextlib.suppress(EtcdError):
                    await self.client.revoke(lease_id)
        self._buckets.clear()
        self._by_id.clear()
