"""HTTP endpoints: health, readiness, metrics names and the read-only AoR view."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest

from registrar.http.aors import aor_json
from registrar.http.app import EngineCollector, make_app
from registrar.sip.message import Request
from tests.unit.corekit import PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN, response_to


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.new_event_loop().run_until_complete(coro)


def test_endpoints_and_aor_view() -> None:
    m = Core(mode="contact", outgoing_expires=3600)
    m.feed(register("<sip:alice@192.0.2.10:5062>", expires=60), PHONE)
    m.feed(main_ok(m.to_main()), MAIN)
    m.take()
    m.advance(20)
    registry = CollectorRegistry()
    registry.register(
        EngineCollector(
            m.rig.stack.stats, m.core.stats, lambda: m.rig.stack.active_transactions, m.store.counts
        )
    )
    ready = {"value": True}

    async def view(aor: str) -> dict[str, Any] | None:
        record = m.store.load(aor)
        return None if record is None else aor_json(record, m.settings.mode, m.now)

    app = make_app(registry, lambda: ready["value"], view)

    async def go() -> None:
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/healthz")).status == 200
            assert (await client.get("/readyz")).status == 200
            ready["value"] = False
            assert (await client.get("/readyz")).status == 503
            text = await (await client.get("/metrics")).text()
            for name in (
                'midregistrar_requests_total{method="REGISTER"} 1.0',
                "midregistrar_register_requests_total 1.0",
                'midregistrar_registers_total{outcome="relayed"} 1.0',
                'midregistrar_responses_total{code="200",method="REGISTER"}',
                "midregistrar_transactions_active",
                "midregistrar_parse_errors_total 0.0",
                "midregistrar_bindings 1.0",
                "midregistrar_aors 1.0",
                "midregistrar_deregisters_sent_total 0.0",
            ):
                assert name in text, name
            resp = await client.get("/v1/aors/alice@example.com")
            data = json.loads(await resp.text())
            assert data["aor"] == "alice@example.com" and data["mode"] == "contact"
            [binding] = data["bindings"]
            assert binding["contact"] == "sip:alice@192.0.2.10:5062" and binding["expires"] == 40
            assert binding["main"]["expires"] == 3600
            assert (await client.get("/v1/aors/nobody@example.com")).status == 404

    _run(go())


def _metrics(m: Core) -> str:
    registry = CollectorRegistry()
    registry.register(
        EngineCollector(
            m.rig.stack.stats,
            m.core.stats,
            lambda: m.rig.stack.active_transactions,
            m.store.counts,
            ready=lambda: True,
            templates=lambda: len(m.core.templates),
        )
    )
    return generate_latest(registry).decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample of the exposition text; labels in any order."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{labels} in\n{text}")


def test_register_answers_are_counted_and_timed_by_outcome() -> None:
    """Relayed (with the main registrar's code), absorbed (pipeline and template) and refused REGISTERs, and
    the answers to generated De-REGISTERs, each reach /metrics; latencies land in the right buckets."""
    m = Core(mode="contact", outgoing_expires=3600)
    m.feed(register("<sip:alice@192.0.2.10:5062>", expires=60), PHONE)
    relayed = m.to_main()
    m.advance(0.003)  # main answers 3 ms later
    m.feed(main_ok(relayed), MAIN)
    m.take()
    for cseq in (11, 12):  # the first refresh through the pipeline, the second from its template
        m.advance(20)
        m.feed(
            register("<sip:alice@192.0.2.10:5062>", expires=60, cseq=cseq, branch=f"z9hG4bK-r{cseq}"), PHONE
        )
        assert m.to_phone().status == 200
    m.feed(register("<sip:alice@192.0.2.10:5062>", expires=60, cseq=5, branch="z9hG4bK-old"), PHONE)
    refused = m.to_phone().status
    assert refused >= 400  # an older CSeq in the same Call-ID: refused here
    bob = register("<sip:bob@192.0.2.11:5062>", expires=60, to="<sip:bob@example.com>", call_id="b1")
    m.feed(bob.replace(b"alice@example.com>;tag", b"bob@example.com>;tag"), PHONE)
    m.feed(response_to(m.to_main(), 503), MAIN)
    assert m.to_phone().status == 503  # main's failure passed on
    assert _sample(_metrics(m), "midregistrar_refresh_templates") == 1  # alice's
    m.advance(62)  # alice stopped refreshing: her binding expires and is withdrawn from main
    dereg = [r for r, p in m.take() if isinstance(r, Request) and p == MAIN]  # with its retransmissions
    assert dereg and {r.cseq.seq for r in dereg} == {13}, dereg
    m.feed(response_to(dereg[0], 200), MAIN)
    text = _metrics(m)
    assert m.core.stats.template_answers == 1
    assert _sample(text, "midregistrar_refresh_template_hits_total") == 1
    assert _sample(text, "midregistrar_refresh_templates") == 0  # went with alice's binding
    assert _sample(text, "midregistrar_relayed_register_answers_total", code="200") == 1
    assert _sample(text, "midregistrar_relayed_register_answers_total", code="503") == 1
    assert _sample(text, "midregistrar_responses_total", method="REGISTER", code="503") == 1
    assert _sample(text, "midregistrar_responses_total", method="REGISTER", code=str(refused)) == 1
    assert _sample(text, "midregistrar_responses_total", method="REGISTER", code="200") == 3
    assert _sample(text, "midregistrar_deregister_answers_total", code="200") == 1
    assert _sample(text, "midregistrar_ready") == 1
    hist = "midregistrar_register_duration_seconds"
    assert _sample(text, hist + "_count", outcome="relayed") == 2
    assert _sample(text, hist + "_count", outcome="absorbed") == 2
    assert _sample(text, hist + "_count", outcome="refused") == 1
    # The relayed one answered after 3 ms: above the 2.5 ms bound, within 5 ms (bob's at once).
    assert _sample(text, hist + "_bucket", outcome="relayed", le="0.0025") == 1
    assert _sample(text, hist + "_bucket", outcome="relayed", le="0.005") == 2
    assert _sample(text, hist + "_bucket", outcome="relayed", le="+Inf") == 2
    assert abs(_sample(text, hist + "_sum", outcome="relayed") - 0.003) < 1e-9


def test_asyncio_tasks_gauge_counts_the_tasks_of_the_loop() -> None:
    """`midregistrar_asyncio_tasks` follows the tasks alive in the event loop that serves /metrics (the soak's
    leak signal); read outside a running loop, the gauge is left out instead of failing the scrape."""
    m = Core(mode="contact")
    registry = CollectorRegistry()
    registry.register(
        EngineCollector(
            m.rig.stack.stats, m.core.stats, lambda: m.rig.stack.active_transactions, m.store.counts
        )
    )
    app = make_app(registry, lambda: True)

    async def go() -> None:
        async with TestClient(TestServer(app)) as client:
            before = _sample(await (await client.get("/metrics")).text(), "midregistrar_asyncio_tasks")
            parked = [asyncio.ensure_future(asyncio.sleep(3600)) for _ in range(25)]
            during = _sample(await (await client.get("/metrics")).text(), "midregistrar_asyncio_tasks")
            for task in parked:
                task.cancel()
            await asyncio.gather(*parked, return_exceptions=True)
            after = _sample(await (await client.get("/metrics")).text(), "midregistrar_asyncio_tasks")
            assert before >= 1 and during == before + 25 and after == before

    _run(go())
    assert "midregistrar_asyncio_tasks" not in _metrics(m)
