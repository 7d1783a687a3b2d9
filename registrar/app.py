"""Wires one registrar process together from :class:`Settings` and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
from contextlib import suppress

from aiohttp import web
from prometheus_client import CollectorRegistry

from registrar.config import Settings, StoreKind, split_hostport
from registrar.core import digest
from registrar.core.service import MidRegistrar
from registrar.http.app import EngineCollector, make_app
from registrar.net.server import SipServer, build_stack
from registrar.store.memory import MemoryStore

log = logging.getLogger("midregistrar")

# A full collection after 100 gen1 ones instead of 10. A larger gen0 threshold measured worse: fewer but
# longer pauses (11 ms median at 20,000) and more GC time overall (cache misses on the bigger young set).
GC_THRESHOLDS = (700, 10, 100)


def tune_gc() -> None:
    """Keep the cyclic GC's pauses short and rare (measured with bench/memory_bench.py --gc-tuned): the SIP
    pipeline makes no reference cycles (0 objects freed over 100,000 REGISTERs), so a collection is pure
    cost, and a full one walks every in-flight transaction. What exists after start-up is frozen out of all
    later collections, and full collections run 10× less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Registrar:
    """One running process: SIP sockets, the core, the HTTP endpoints."""

    def __init__(self, settings: Settings) -> None:
        if settings.store is StoreKind.ETCD:
            raise NotImplementedError("the etcd store is not built yet: use --store memory")
        self.settings = settings
        self.stack = build_stack(settings)
        self.store = MemoryStore()
        gate = None
        if settings.auth_file:
            gate = digest.DigestGate(
                settings.auth_realm, digest.load_passwords(settings.auth_file), secrets.token_bytes(32)
            )
        credentials = [digest.Credentials(*c.split(":", 2)) for c in settings.main_credentials]
        self.core = MidRegistrar(settings, self.stack, self.store, gate=gate, credentials=credentials)
        self.ready = False
        self.server: SipServer | None = None
        self._http: web.AppRunner | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.server = SipServer(self.settings, self.stack, self.core)
        await self.server.start()
        if self.settings.http:
            registry = CollectorRegistry()
            registry.register(
                EngineCollector(
                    self.stack.stats,
                    self.core.stats,
                    lambda: self.stack.active_transactions,
                    self.store.counts,
                )
            )
            server = self.server
            app = make_app(registry, lambda: self.ready, lambda aor: self.core.aor_view(aor, server.now))
            self._http = web.AppRunner(app, access_log=None)
            await self._http.setup()
            host, port = split_hostport(self.settings.http, default_port=9090)
            await web.TCPSite(self._http, host, port).start()
        self.ready = True
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
        self.ready = False
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
        if self.server is not None:
            await self.server.close()
        if self._http is not None:
            await self._http.cleanup()
        log.info("stopped")


async def run(settings: Settings) -> None:
    registrar = Registrar(settings)
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, registrar.request_stop)
    await registrar.serve()
