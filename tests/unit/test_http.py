"""HTTP endpoints: health, readiness, metrics names and the read-only AoR view."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from registrar.http.aors import aor_json
from registrar.http.app import EngineCollector, make_app
from tests.unit.corekit import PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN


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
                'midregistrar_responses_total{code="200"}',
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
