"""The etcd key layout and values (registrar/store/etcd_layout.py), pinned byte for byte: every registrar
process, the operator and the benchmarks read and write these, so a change here is a wire-format change."""

from __future__ import annotations

import pytest

from registrar.records import Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.etcd_layout import (
    EtcdKeys,
    KeyKind,
    ParsedKey,
    decode_binding,
    decode_head_meta,
    decode_member,
    encode_binding,
    encode_head,
    encode_member,
    escape_aor,
    prefix_range_end,
    unescape_aor,
)

KEYS = EtcdKeys(b"/midregistrar/ns/a/")
BINDING = Binding(
    ctid=7,
    contact="sip:p@192.0.2.1:5060",
    expires_at=1000.5,
    source=Peer("tcp", "192.0.2.1", 5060, 3),
    call_id="c",
    cseq=2,
    q=0.5,
    owner="a",
)


def test_keys() -> None:
    assert KEYS.head("alice@example.com") == b"/midregistrar/ns/a/aor/alice@example.com"
    assert KEYS.binding("a/b%c@x", 5) == b"/midregistrar/ns/a/aor/a%2Fb%25c@x/ct/5"
    assert KEYS.bindings("a@x") == b"/midregistrar/ns/a/aor/a@x/ct/"
    assert KEYS.index(5) == b"/midregistrar/ns/a/ctid/5"
    assert KEYS.claim(5, 91) == b"/midregistrar/ns/a/claims/5/91"
    assert KEYS.member("pod-1") == b"/midregistrar/ns/a/members/pod-1"
    assert KEYS.aors == b"/midregistrar/ns/a/aor/" and KEYS.members == b"/midregistrar/ns/a/members/"


@pytest.mark.parametrize("aor", ["alice@example.com", "a/b@x", "100%/ct/1@x", "%2F@x"])
def test_escaping_keeps_an_aor_one_segment(aor: str) -> None:
    assert b"/" not in escape_aor(aor) and unescape_aor(escape_aor(aor)) == aor
    assert KEYS.parse(KEYS.head(aor)) == ParsedKey(KeyKind.HEAD, aor=aor)
    assert KEYS.parse(KEYS.binding(aor, 9)) == ParsedKey(KeyKind.BINDING, aor=aor, ctid=9)


def test_parse() -> None:
    assert KEYS.parse(KEYS.index(5)) == ParsedKey(KeyKind.INDEX, ctid=5)
    assert KEYS.parse(KEYS.claim(5, 91)) == ParsedKey(KeyKind.CLAIM, ctid=5, mod_revision=91)
    assert KEYS.parse(KEYS.member("pod-1")) == ParsedKey(KeyKind.MEMBER, member="pod-1")
    assert KEYS.parse(KEYS.head("a@x") + b"/other") == ParsedKey(KeyKind.AOR_OTHER, aor="a@x")
    assert KEYS.parse(KEYS.head("a@x") + b"/ct/x1") == ParsedKey(KeyKind.AOR_OTHER, aor="a@x")
    for foreign in (b"/midregistrar/ns/b/aor/a@x", KEYS.prefix + b"ctid/x", KEYS.prefix + b"claims/1", b"x"):
        assert KEYS.parse(foreign) is None


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/midregistrar/ns/a/") == b"/midregistrar/ns/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_binding_value() -> None:
    value = encode_binding(BINDING, 1600.5)
    assert value == (
        b'{"ctid":7,"contact":"sip:p@192.0.2.1:5060","expires_at":1000.5,"source":{"transport":"tcp",'
        b'"host":"192.0.2.1","port":5060,"conn":3,"local":0},"call_id":"c","cseq":2,"q":0.5,"path":[],'
        b'"instance":null,"reg_id":null,"methods":null,"user_agent":null,"updated_at":0.0,"local_expires":0,'
        b'"main_expires":null,"relayed_at":null,"main_contact":null,"relayed_call_id":null,"relayed_cseq":0,'
        b'"owner":"a","v":1,"hold":1600.5}'
    )
    assert decode_binding(value) == (BINDING, 1600.5)
    without_hold = value.replace(b',"hold":1600.5', b"")
    assert decode_binding(without_hold) == (BINDING, 1000.5)


def test_head_value() -> None:
    meta = MainMeta("sip:a@x", "sip:a@x", "sip:x", call_id="m", cseq=4)
    value = encode_head("a@x", meta, [1, 22])
    assert value == (
        b'{"v":1,"aor":"a@x","meta":{"from_uri":"sip:a@x","to_uri":"sip:a@x","ruri":"sip:x","hop":null,'
        b'"call_id":"m","cseq":4,"main_expires":null,"relayed_at":null,"main_contact":null,"no_dr":false,'
        b'"relay_until":null,"contact_owner":null},"ctids":["1","22"]}'
    )
    assert decode_head_meta(value) == meta
    assert decode_head_meta(encode_head("a@x", None, [1])) is None


def test_member_value() -> None:
    assert encode_member("udp:10.0.0.7:5060") == b'{"sip": "udp:10.0.0.7:5060"}'
    assert decode_member(encode_member("udp:10.0.0.7:5060")) == "udp:10.0.0.7:5060"
    with pytest.raises(TypeError):
        decode_member(b'{"sip": 5}')
