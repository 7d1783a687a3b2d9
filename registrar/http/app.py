"""HTTP endpoints: /healthz, /readyz and /metrics (Prometheus, ``midregistrar_`` prefix)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from registrar.core.gate import REFUSED
from registrar.core.state import CoreStats
from registrar.net.limits import DROPS, REFUSALS, TIMEOUTS, Admission, SourceLimit
from registrar.net.tls import TlsStats
from registrar.sip.stack import StackStats


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a shared store reports at scrape time."""

    calls: int
    available: bool
    leases: int
    members: int
    clock_skew: float = 0.0  # s: the largest clock offset to a live peer (registrar/store/members.py)
    reads_refused: int = 0  # AoR reads not queued (registrar/store/etcd.py FETCH_BACKLOG): answered 503
    reads: int = 0  # of ``calls``, reads of AoRs and contact ids memory did not hold


class EngineCollector(Collector):
    """Reads the engine's plain counters at scrape time: the SIP path pays nothing for metrics."""

    def __init__(
        self,
        stack_stats: StackStats,
        core_stats: CoreStats,
        active_transactions: Callable[[], int],
        counts: Callable[[], tuple[int, int]],
        store_stats: Callable[[], StoreStats] | None = None,
        ready: Callable[[], bool] | None = None,
        tls_stats: TlsStats | None = None,
        connections: Callable[[], tuple[dict[str, int], Admission]] | None = None,
        sources: Callable[[], SourceLimit | None] | None = None,
        templates: Callable[[], int] | None = None,
    ) -> None:
        self.sources = sources
        self.templates = templates
        self.stack_stats = stack_stats
        self.ready = ready
        self.tls_stats = tls_stats
        self.connections = connections
        self.core_stats = core_stats
        self.active_transactions = active_transactions
        self.counts = counts
        self.store_stats = store_stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self.stack_stats
        requests = CounterMetricFamily(
            "midregistrar_requests", "SIP requests received, by method", labels=["method"]
        )
        for method, n in sorted(s.requests_in.items()):
            requests.add_metric([method], n)
        yield requests
        register = CounterMetricFamily("midregistrar_register_requests", "REGISTER requests received")
        register.add_metric([], s.requests_in.get("REGISTER", 0))
        yield register
        responses = CounterMetricFamily(
            "midregistrar_responses",
            "SIP responses sent, by request method and code",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(s.responses_out.items()):
            responses.add_metric([method, str(code)], n)
        yield responses
        relayed = CounterMetricFamily(
            "midregistrar_relayed_register_answers",
            "Final answers of the main registrar to relayed REGISTERs, by code (408: none came)",
            labels=["code"],
        )
        for (method, code), n in sorted(s.relayed_answers.items()):
            if method == "REGISTER":
                relayed.add_metric([str(code)], n)
        yield relayed
        latency = HistogramMetricFamily(
            "midregistrar_register_duration_seconds",
            "Seconds from a REGISTER's arrival to its final answer, by outcome",
            labels=["outcome"],
        )
        for outcome, histogram in s.register_latency.items():
            latency.add_metric([outcome], histogram.cumulative(), histogram.total)
        yield latency
        yield CounterMetricFamily(
            "midregistrar_parse_errors", "Messages refused as malformed", value=s.parse_errors
        )
        yield CounterMetricFamily(
            "midregistrar_retransmissions_absorbed",
            "Retransmitted requests answered by their transaction",
            value=s.retransmissions_absorbed,
        )
        yield CounterMetricFamily(
            "midregistrar_stun_keepalives",
            "STUN Binding requests answered on a UDP SIP port (RFC 5626 keep-alives)",
            value=s.stun_keepalives,
        )
        yield GaugeMetricFamily(
            "midregistrar_transactions_active", "Live SIP transactions", value=self.active_transactions()
        )
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # collected outside the event loop (a test reading the registry directly)
            pass
        else:  # a task left behind per request shows here as growth (bench.soak_bench reads it)
            yield GaugeMetricFamily(
                "midregistrar_asyncio_tasks", "asyncio tasks not yet done in the event loop", value=tasks
            )
        c = self.core_stats
        registers = CounterMetricFamily("midregistrar_registers", "REGISTER outcomes", labels=["outcome"])
        registers.add_metric(["relayed"], c.registers_relayed)
        registers.add_metric(["absorbed"], c.registers_answered)
        registers.add_metric(["refused"], c.register_errors)
        yield registers
        yield CounterMetricFamily(
            "midregistrar_deregisters_sent", "Generated De-REGISTERs sent", value=c.deregisters_sent
        )
        deregister_answers = CounterMetricFamily(
            "midregistrar_deregister_answers",
            "Final answers to generated De-REGISTERs, by code (408: none came)",
            labels=["code"],
        )
        for code, n in sorted(c.deregister_answers.items()):
            deregister_answers.add_metric([str(code)], n)
        yield deregister_answers
        yield CounterMetricFamily(
            "midregistrar_refresh_template_hits",
            "Refreshes answered from a refresh template, without parsing",
            value=c.template_answers,
        )
        if self.templates is not None:
            yield GaugeMetricFamily(
                "midregistrar_refresh_templates",
                "Refresh templates held (one per phone whose refreshes are answered from one)",
                value=self.templates(),
            )
        yield CounterMetricFamily(
            "midregistrar_bindings_expired", "Bindings removed on expiry", value=c.expired
        )
        lookups = CounterMetricFamily("midregistrar_lookups", "Lookups by result", labels=["result"])
        for outcome, n in sorted(c.lookups.items()):
            lookups.add_metric([outcome], n)
        yield lookups
        if self.ready is not None:
            yield GaugeMetricFamily(
                "midregistrar_ready",
                "1 while /readyz answers ready (serving, not draining, store up)",
                value=int(self.ready()),
            )
        aors, bindings = self.counts()
        yield GaugeMetricFamily("midregistrar_aors", "AoRs held", value=aors)
        yield GaugeMetricFamily("midregistrar_bindings", "Contact bindings held", value=bindings)
        yield CounterMetricFamily(
            "midregistrar_store_unavailable", "Requests answered 503: state unreachable", value=c.unavailable
        )
        yield CounterMetricFamily(
            "midregistrar_handoffs", "Requests handed to the process holding the flow", value=c.handoffs
        )
        yield CounterMetricFamily(
            "midregistrar_handoffs_refused",
            "Hand-off headers not trusted (bad or stale MAC, unknown sender, wrong address) and ignored",
            value=c.handoffs_refused,
        )
        if self.connections is not None:
            counts, admission = self.connections()
            open_ = GaugeMetricFamily(
                "midregistrar_connections", "Open stream connections, by transport", labels=["transport"]
            )
            for transport in ("tcp", "tls", "ws", "wss"):
                open_.add_metric([transport], counts.get(transport, 0))
            yield open_
            refused = CounterMetricFamily(
                "midregistrar_connections_refused",
                "Accepted connections closed at once, by the limit reached",
                labels=["reason"],
            )
            for reason in REFUSALS:
                refused.add_metric([reason], admission.refused[reason])
            yield refused
            timed_out = CounterMetricFamily(
                "midregistrar_connections_timed_out",
                "Connections closed for silence: no SIP message since accepted (first_message), or idle",
                labels=["phase"],
            )
            for phase in TIMEOUTS:
                timed_out.add_metric([phase], admission.timed_out[phase])
            yield timed_out
        yield from self._floods()
        if self.tls_stats is not None:
            t = self.tls_stats
            failures = CounterMetricFamily(
                "midregistrar_tls_handshake_failures",
                "TLS handshakes that failed, by side (server: accepted, client: dialled)",
                labels=["side"],
            )
            for side in ("server", "client"):
                failures.add_metric([side], t.handshake_failures.get(side, 0))
            yield failures
            yield CounterMetricFamily(
                "midregistrar_tls_certificate_reloads",
                "Certificates reloaded after their files changed",
                value=t.reloads,
            )
            yield CounterMetricFamily(
                "midregistrar_tls_certificate_reload_failures",
                "Changed certificate files that did not load (the previous certificate stays in use)",
                value=t.reload_failures,
            )
        if self.store_stats is not None:
            st = self.store_stats()
            yield CounterMetricFamily(
                "midregistrar_etcd_calls", "etcd requests made for data", value=st.calls
            )
            yield CounterMetricFamily(
                "midregistrar_etcd_reads",
                "etcd reads of AoRs and contact ids that memory did not hold (part of the calls)",
                value=st.reads,
            )
            yield GaugeMetricFamily(
                "midregistrar_etcd_up", "1 while etcd is reachable", value=int(st.available)
            )
            yield CounterMetricFamily(
                "midregistrar_etcd_reads_refused",
                "Requests answered 503 because the etcd reads queued had reached their bound",
                value=st.reads_refused,
            )
            yield GaugeMetricFamily("midregistrar_etcd_leases", "Binding leases held", value=st.leases)
            yield GaugeMetricFamily("midregistrar_members", "Live registrar processes seen", value=st.members)
            yield GaugeMetricFamily(
                "midregistrar_clock_skew_seconds",
                "Largest wall-clock offset to a live peer process, as their member keys show it",
                value=st.clock_skew,
            )

    def _floods(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The per-source message limit and the digest gate's back-off (docs/operations.md "Floods")."""
        c = self.core_stats
        yield CounterMetricFamily(
            "midregistrar_auth_failures",
            "Wrong answers to the local digest challenge (wrong password, unknown user, forged nonce)",
            value=c.auth_failures,
        )
        refused = CounterMetricFamily(
            "midregistrar_auth_refused",
            "REGISTERs answered 503 unchecked: their source, or their user, in back-off after wrong answers",
            labels=["reason"],
        )
        for reason in REFUSED:
            refused.add_metric([reason], c.auth_refused.get(reason, 0))
        yield refused
        limit = self.sources() if self.sources is not None else None
        if limit is None:
            return
        dropped = CounterMetricFamily(
            "midregistrar_messages_dropped",
            "Messages dropped unparsed and unanswered (source_rate: over --source-rate-limit)",
            labels=["reason"],
        )
        for reason in DROPS:
            dropped.add_metric([reason], limit.dropped[reason])
        yield dropped
        yield CounterMetricFamily(
            "midregistrar_sources_limited",
            "Source addresses that went over --source-rate-limit, once per second each",
            value=limit.limited,
        )
        yield CounterMetricFamily(
            "midregistrar_sources_blocked",
            "Sources blocked by the kernel socket filter for --source-block-seconds (ten times the rate)",
            value=limit.blocks,
        )
        yield GaugeMetricFamily(
            "midregistrar_sources_tracked",
            "Source addresses counted in the current second (bounded)",
            value=limit.tracked(),
        )


def make_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    aor_view: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None,
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    async def aor(request: web.Request) -> web.Response:
        """Read-only view of one AoR: bindings with remaining expires and main-registrar meta."""
        if aor_view is None:
            raise web.HTTPNotFound()
        data = await aor_view(request.match_info["aor"])
        if data is None:
            return web.json_response({"error": "no such AoR"}, status=404)
        return web.json_response(data)

    app = web.Application()
    app.router.add_get("/v1/aors/{aor}", aor)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
