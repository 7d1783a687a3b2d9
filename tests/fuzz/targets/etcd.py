"""The decoders of values read from etcd (registrar/store/etcd_layout.py), and what the store builds from them.

Whatever bytes sit under a key (another writer, a corrupted value, a different version), a decoder either
raises ValueError, TypeError or KeyError (the store skips the value with a log line) or returns values of
the declared types: a Binding whose fields do not have their types would fail later, far from etcd, in the
core (poisoning its AoR). So a decoded binding is also cached and read back the way the store does it
(registrar/store/cache.py) and used the way the core uses one (lookup order, remaining lifetime).
"""

from __future__ import annotations

import contextlib
from dataclasses import fields

from registrar.records import AorRecord, Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.cache import CachedAor, cached_item
from registrar.store.etcd_layout import (
    EtcdKeys,
    decode_binding,
    decode_head_meta,
    decode_index,
    decode_member,
    encode_binding,
    encode_head,
)
from registrar.store.overlay import Overlay
from tests.fuzz.harness import Target

KEYS = EtcdKeys(b"/midreg/test/")
EXPECTED = (ValueError, TypeError, KeyError)
_NOW = 1_000_000.0


def _typed(value: object, allowed: tuple[type, ...], where: str) -> None:
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    assert ok, f"{where} is {value!r}: expected {allowed}"


def check_binding(b: Binding) -> None:
    """The field types of Binding (registrar/records.py), as the core relies on them."""
    num, opt_num = (int, float), (int, float, type(None))
    _typed(b.ctid, (int,), "ctid")
    _typed(b.contact, (str,), "contact")
    _typed(b.expires_at, num, "expires_at")
    _typed(b.source, (Peer,), "source")
    _typed(b.source.transport, (str,), "source.transport")
    _typed(b.source.host, (str,), "source.host")
    _typed(b.source.port, (int,), "source.port")
    _typed(b.source.conn, (int, type(None)), "source.conn")
    _typed(b.source.local, (int,), "source.local")
    _typed(b.call_id, (str,), "call_id")
    _typed(b.cseq, (int,), "cseq")
    _typed(b.q, opt_num, "q")
    _typed(b.path, (list,), "path")
    for p in b.path:
        _typed(p, (str,), "path[]")
    for name in ("instance", "reg_id", "user_agent", "main_contact", "relayed_call_id", "owner"):
        _typed(getattr(b, name), (str, type(None)), name)
    _typed(b.methods, (list, type(None)), "methods")
    for m in b.methods or ():
        _typed(m, (str,), "methods[]")
    _typed(b.updated_at, num, "updated_at")
    _typed(b.local_expires, (int,), "local_expires")
    _typed(b.main_expires, (int, type(None)), "main_expires")
    _typed(b.relayed_at, opt_num, "relayed_at")
    _typed(b.relayed_cseq, (int,), "relayed_cseq")


def check_meta(m: MainMeta) -> None:
    for f in fields(MainMeta):
        value = getattr(m, f.name)
        if f.name in ("from_uri", "to_uri", "ruri"):
            _typed(value, (str,), f.name)
        elif f.name in ("cseq",):
            _typed(value, (int,), f.name)
        elif f.name in ("main_expires",):
            _typed(value, (int, type(None)), f.name)
        elif f.name in ("relayed_at", "relay_until"):
            _typed(value, (int, float, type(None)), f.name)
        elif f.name == "no_dr":
            _typed(value, (bool,), f.name)
        else:
            _typed(value, (str, type(None)), f.name)


def _binding(data: bytes) -> None:
    try:
        binding, hold = decode_binding(data)
    except EXPECTED:
        return
    check_binding(binding)
    _typed(hold, (int, float), "hold")
    entry = CachedAor(7, 7, None, (cached_item(binding, hold, 7),))
    for member in ("other", binding.owner or "me"):
        record = entry.record("sip:a@example.com", member, Overlay(), _NOW)
        assert record is not None
        for b in record.valid_bindings(_NOW):
            b.remaining(_NOW)
            check_binding(b)
    decode_binding(encode_binding(binding, hold))
    AorRecord.from_dict(AorRecord("a", {binding.ctid: binding}).to_dict())


def _head(data: bytes) -> None:
    try:
        meta = decode_head_meta(data)
    except EXPECTED:
        return
    if meta is not None:
        check_meta(meta)
        assert decode_head_meta(encode_head("a", meta, [1])) == meta


def run(data: bytes) -> None:
    _binding(data)
    _head(data)
    with contextlib.suppress(*EXPECTED):
        _typed(decode_index(data), (str,), "index")
    with contextlib.suppress(*EXPECTED):
        _typed(decode_member(data), (str,), "member")
    KEYS.parse(KEYS.prefix + data)


TARGET = Target("etcd", run, (), __doc__ or "")
