"""The read-only JSON view of one AoR served at ``GET /v1/aors/{aor}``: its valid bindings with their
remaining lifetimes, and what was last relayed to the main registrar for each and for the AoR."""

from __future__ import annotations

from typing import Any

from registrar.config import Mode
from registrar.records import AorRecord


def aor_json(record: AorRecord, mode: Mode, now: float) -> dict[str, Any]:
    """``record`` as stored, seen at ``now``; expired bindings are left out."""
    bindings = []
    for b in record.valid_bindings(now):
        bindings.append(
            {
                "ctid": str(b.ctid),
                "contact": b.contact,
                "expires": b.remaining(now),
                "received": str(b.source),
                "q": b.q,
                "call_id": b.call_id,
                "cseq": b.cseq,
                "path": b.path,
                "instance": b.instance,
                "reg_id": b.reg_id,
                "user_agent": b.user_agent,
                "owner": b.owner,
                "main": {
                    "expires": b.main_expires,
                    "relayed_ago": None if b.relayed_at is None else round(now - b.relayed_at, 3),
                    "contact": b.main_contact,
                },
            }
        )
    meta = record.meta
    return {
        "aor": record.aor,
        "mode": mode.value,
        "bindings": bindings,
        "main": None
        if meta is None
        else {
            "ruri": meta.ruri,
            "from": meta.from_uri,
            "to": meta.to_uri,
            "call_id": meta.call_id,
            "cseq": meta.cseq,
            "expires": meta.main_expires,
            "relayed_ago": None if meta.relayed_at is None else round(now - meta.relayed_at, 3),
            "contact": meta.main_contact,
            "no_deregister": meta.no_dr,
        },
    }
