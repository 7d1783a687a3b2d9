"""Wires one registrar process together from :class:`Settings` and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
import socket
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from registrar.config import Listen, Settings, StoreKind, split_hostport
from registrar.core import digest
from registrar.core.handoff import HandoffKeys
from registrar.core.service import MidRegistrar
from registrar.http.aors import aor_json
from registrar.http.app import EngineCollector, StoreStats, make_app
from registrar.net.limits import Admission
from registrar.net.server import SipServer, build_stack
from registrar.records import AorRecord, Binding
from registrar.store.base import Pending, Store, StoreUnavailable
from registrar.store.memory import MemoryStore

log = logging.getLogger("midregistrar")

# A full collection after 100 gen1 ones instead of 10. A larger gen0 threshold measured worse: fewer but
# longer pauses (11 ms median at 20,000) and more GC time overall (cache misses on the bigger young set).
GC_THRESHOLDS = (700, 10, 100)
HANDOFF_KEYS_RELOAD = 10.0  # seconds between checks of the hand-off key file


def tune_gc() -> None:
    """Keep the cyclic GC's pauses short and rare (measured with ``python -m bench.memory_bench
    --gc-tuned``): the SIP pipeline makes no reference cycles (0 objects freed over 100,000 REGISTERs), so
    a collection is pure cost, and a full one walks every in-flight transaction. What exists after start-up
    is frozen out of all later collections, and full collections run 10× less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Registrar:
    """One running process: SIP sockets, the core, the HTTP endpoints."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack = build_stack(settings)
        self.store: Store
        if settings.store is StoreKind.ETCD:
            from registrar.store.etcd import EtcdStore  # imports gRPC: only when asked for

            self.etcd: EtcdStore | None = EtcdStore(settings)
            self.etcd.listener = _StoreEvents(self)
            self.store = self.etcd
        else:
            self.etcd = None
            self.store = MemoryStore()
        gate = None
        if settings.auth_file:
            gate = digest.DigestGate(
                settings.auth_realm, digest.load_passwords(settings.auth_file), secrets.token_bytes(32)
            )
        credentials = [digest.Credentials(*c.split(":", 2)) for c in settings.main_credentials]
        self.core = MidRegistrar(settings, self.stack, self.store, gate=gate, credentials=credentials)
        self.started = False
        self._handoff_text: str | None = None
        self._handoff_task: asyncio.Task[None] | None = None
        self.store_available = True
        self.server: SipServer | None = None
        self._http: web.AppRunner | None = None
        self._stop = asyncio.Event()

    @property
    def ready(self) -> bool:
        """``/readyz``: serving, not draining, and the store reachable."""
        return self.started and self.store_available and not self.core.draining

    def _load_handoff_keys(self) -> None:
        """Read the hand-off keys when their file changed (a renewed Secret): an unreadable or empty file
        keeps the keys in use, with a log line."""
        path = self.settings.handoff_key_file
        if not path:
            return
        try:
            text = Path(path).read_text()
        except OSError as exc:
            log.warning("hand-off keys not reloaded: %s", exc)
            return
        if text == self._handoff_text:
            return
        try:
            self.core.state.handoff_keys = HandoffKeys.from_text(text)
        except ValueError as exc:
            log.warning("hand-off keys not reloaded from %s: %s", path, exc)
            return
        if self._handoff_text is not None:
            log.info("hand-off keys reloaded from %s", path)
        self._handoff_text = text

    async def _watch_handoff_keys(self) -> None:
        while True:
            await asyncio.sleep(HANDOFF_KEYS_RELOAD)
            self._load_handoff_keys()

    async def start(self) -> None:
        self._load_handoff_keys()
        if self.settings.handoff_key_file:
            self._handoff_task = asyncio.get_running_loop().create_task(self._watch_handoff_keys())
        elif self.etcd is not None:
            log.warning("no --handoff-key-file: hand-offs between processes are trusted by source address")
        self.server = SipServer(self.settings, self.stack, self.core, exempt=self._member_host)
        await self.server.start()
        if self.etcd is not None:
            await self.etcd.start(self.internal_address())
        if self.settings.http:
            registry = CollectorRegistry()
            registry.register(
                EngineCollector(
                    self.stack.stats,
                    self.core.stats,
                    lambda: self.stack.active_transactions,
                    self.store.counts,
                    self._store_stats if self.etcd is not None else None,
                    lambda: self.ready,
                    self.server.tls.stats,
                    self._connections,
                    lambda: self.server.sources if self.server is not None else None,
                    lambda: len(self.core.templates),
                )
            )
            app = make_app(registry, lambda: self.ready, self.aor_view)
            self._http = web.AppRunner(app, access_log=None)
            await self._http.setup()
            host, port = split_hostport(self.settings.http, default_port=9090)
            await web.TCPSite(self._http, host, port).start()
        self.started = True
        sockets = ", ".join(str(b) for b in self.server.bound())
        log.info(
            "midregistrar ready: listening on %s; main registrar %s; mode %s; store %s%s",
            sockets,
            self.settings.main_registrar,
            self.settings.mode.value,
            self.settings.store.value,
            f"; http {self.settings.http}" if self.settings.http else "",
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        await self.start()
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Turn unready and keep serving for ``drain_grace`` seconds, telling phones to come back soon
        (short expires) so they move to another instance; then let running transactions finish (bounded by
        ``drain_timeout``) and close everything."""
        self.core.draining = True
        settings = self.settings
        log.info(
            "draining: %.0f s grace, %d transactions waiting for a final response",
            settings.drain_grace,
            self.stack.pending_transactions,
        )
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + max(settings.drain_grace, settings.drain_timeout)
        while loop.time() < deadline:
            if loop.time() - start >= settings.drain_grace and not self.stack.pending_transactions:
                break
            await asyncio.sleep(0.05)
        if self._handoff_task is not None:
            self._handoff_task.cancel()
        if self.server is not None:
            await self.server.close()
        if self._http is not None:
            await self._http.cleanup()
        if self.etcd is not None:
            await self.etcd.close()
        log.info("stopped")

    def _connections(self) -> tuple[dict[str, int], Admission]:
        assert self.server is not None
        return self.server.connection_counts(), self.server.admission

    def _member_host(self, host: str) -> bool:
        """Whether ``host`` is another registrar process's (hand-offs are never rate-limited by source)."""
        if self.etcd is None:
            return False
        for address in self.etcd.members.values():
            try:
                if Listen.parse(address).host == host:
                    return True
            except ValueError:  # a foreign member value: not ours to trust
                continue
        return False

    def _store_stats(self) -> StoreStats:
        assert self.etcd is not None
        etcd = self.etcd
        return StoreStats(
            etcd.calls,
            etcd.available,
            etcd.pool.live,
            len(etcd.members),
            etcd.registry.skew(),
            etcd.fetches_refused,
            etcd.reads,
        )

    async def aor_view(self, aor: str) -> dict[str, Any] | None:
        """``GET /v1/aors/{aor}``: from the store's memory, fetched first when it must be."""
        assert self.server is not None
        for _ in range(3):
            try:
                record = self.store.load(aor)
                return None if record is None else aor_json(record, self.settings.mode, self.server.now)
            except Pending as wait:
                fetched: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                self.core.park(wait.key, _settle(fetched))
                await asyncio.wait_for(fetched, self.settings.etcd_timeout * 2)
            except StoreUnavailable:
                break
        raise web.HTTPServiceUnavailable(text="registration state unreachable\n")

    def internal_address(self) -> str:
        """Where peer processes hand over requests for the flows this one holds: ``internal_address``, else
        the first listening socket (a wildcard host replaced by this host's address)."""
        if self.settings.internal_address:
            return self.settings.internal_address
        assert self.server is not None
        first = self.server.bound()[0]
        host = first.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
        return str(Listen(transport=first.transport, host=host, port=first.port))


def _settle(future: asyncio.Future[float]) -> Callable[[float], None]:
    """Parked work that wakes an awaiting coroutine."""

    def settle(now: float) -> None:
        if not future.done():
            future.set_result(now)

    return settle


class _StoreEvents:
    """The store's callbacks, run on the event loop: into the core, then the stack's output goes out. The
    stack's clock is brought to now first: what the core sends from here (a De-REGISTER, a relay) must
    not arm its timers from the time of the last datagram."""

    def __init__(self, registrar: Registrar) -> None:
        self.registrar = registrar

    def _run(self, what: str, work: Callable[[float], None]) -> None:
        server = self.registrar.server
        if server is None:
            return
        now = server.now
        self.registrar.stack.handle_timers(now)
        try:
            work(now)
        except Exception:  # a bug in one piece of parked work must not stop the engine
            log.exception("%s failed", what)
        server.flush()

    def store_ready(self, key: str) -> None:
        self._run("parked work", partial(self.registrar.core.store_ready, key))

    def store_committed(self, ticket: int, ok: bool) -> None:
        self._run("work after a write", partial(self.registrar.core.store_committed, ticket, ok))

    def orphans_expired(self, before: AorRecord, gone: list[Binding]) -> None:
        self._run("orphan De-REGISTER", partial(self.registrar.core.orphans_expired, before, gone))

    def availability_changed(self, available: bool) -> None:
        self.registrar.store_available = available
        log.warning("etcd %s", "reachable again" if available else "unreachable: answering 503, not ready")


async def run(settings: Settings) -> None:
    registrar = Registrar(settings)
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, registrar.request_stop)
    await registrar.serve()
