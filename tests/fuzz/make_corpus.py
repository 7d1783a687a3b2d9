"""Write the seed corpus, tests/fuzz/corpus/<target>/ (``python -m tests.fuzz.make_corpus``): the RFC 4475 and
RFC 5118 torture messages, typical requests and responses, registration scripts for the whole engine in
every mode, configuration files written by the config model, etcd values written by the encoders. Each
file is named by its content's hash; files already there (added by ``run --merge``) are kept."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from registrar.config import Settings
from registrar.records import Binding, MainMeta
from registrar.sip.transport import Peer
from registrar.store.etcd_layout import encode_binding, encode_head, encode_index, encode_member
from tests.fuzz.harness import CORPUS
from tests.fuzz.targets.pipeline import SEP
from tests.unit.corekit import register
from tests.unit.stackkit import request_bytes

UNIT = Path(__file__).resolve().parent.parent / "unit"
TORTURE = sorted((UNIT / "rfc4475").glob("*.dat")) + sorted((UNIT / "rfc5118").glob("*.dat"))

TCP_REGISTER = register(
    contact='<sip:alice@192.0.2.10:50000;transport=tcp>;+sip.instance="<urn:uuid:1>";reg-id=1;expires=600',
    via_host="192.0.2.10:50000",
).replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
INVITE = request_bytes("INVITE", "sip:alice@example.com", via="SIP/2.0/UDP 192.0.2.20:5060")
RESPONSE = (
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-1\r\nFrom: <sip:a@b>;tag=1\r\n"
    b"To: <sip:a@b>;tag=2\r\nCall-ID: x\r\nCSeq: 1 REGISTER\r\nContact: <sip:a@10.0.0.2>;expires=60\r\n"
    b"Content-Length: 0\r\n\r\n"
)
MAIN_OK = b"@MAIN 200\r\nContact: <sip:alice@10.0.0.2:5060;ctid=1>;expires=3600\r\nExpires: 3600"


def messages() -> list[bytes]:
    out = [p.read_bytes() for p in TORTURE]
    out += [register(), TCP_REGISTER, INVITE, RESPONSE, register(contact="*", expires=0)]
    out += [request_bytes(m) for m in ("OPTIONS", "BYE", "CANCEL", "ACK", "MESSAGE")]
    out += [register() + b"\r\n\r\n" + TCP_REGISTER, b"\r\n\r\n" + INVITE + b"\r\n"]
    compact = b"REGISTER sip:example.com SIP/2.0\r\nv: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-c\r\n"
    compact += b"f: <sip:a@example.com>;tag=1\r\nt: <sip:a@example.com>\r\ni: c\r\nCSeq: 1 REGISTER\r\n"
    compact += b"m: <sip:a@192.0.2.10>\r\n ;expires=60\r\nl: 0\r\n\r\n"
    return [*out, compact]


def uris() -> list[bytes]:
    texts = [
        "sip:alice@example.com",
        "sips:alice:secret@[2001:db8::1]:5061;transport=tcp;lr?subject=x&h=%20",
        "sip:%61lice@EXAMPLE.com;maddr=239.255.255.1;ttl=15",
        "sip:+1-212-555-1212:1234@gateway.com;user=phone",
        "tel:+358-555-1234567;phone-context=+358;ext=22",
        "mailto:a@b",
        "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        '"Alice \\"A\\"" <sip:alice@example.com>;tag=1928301774',
        'Bob <sips:bob@biloxi.example.com;ob>;+sip.instance="<urn:uuid:1>";reg-id=1;q=0.7;expires=3600',
        '<sip:a@b;lr>, <sip:c@d>;x="y,z"',
        "*",
        "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776;received=10.0.0.1;rport=5061",
        "SIP / 2.0 / TCP [2001:db8::9:1]:6050 ;branch=z9hG4bKas3",
        "SIP/2.0/TLS example.com;branch=z9hG4bK1;maddr=224.2.0.1;ttl=16",
        "4711 REGISTER",
        "branch=z9hG4bK1;rport;received=1.2.3.4",
        "sip:[::ffff:192.0.2.1]:5060",
        "sip:user;par=u%40example.net@example.com",
    ]
    return [t.encode() for t in texts]


def scripts(tcp: bool) -> list[bytes]:
    phone = TCP_REGISTER if tcp else register()
    refresh = phone.replace(b"CSeq: 10", b"CSeq: 11").replace(b"z9hG4bK-a1", b"z9hG4bK-a2")
    dereg = phone.replace(b"CSeq: 10", b"CSeq: 12").replace(b"z9hG4bK-a1", b"z9hG4bK-a3")
    dereg = dereg.replace(b";expires=1800", b"").replace(b";expires=600", b"")
    dereg = dereg.replace(b"Content-Length: 0", b"Expires: 0\r\nContent-Length: 0")
    out = []
    for pad in (b"", b" ", b"  "):  # the length picks the mode: mirror, contact, aor
        out.append(SEP.join([phone, MAIN_OK, refresh, refresh, b"@WAIT 30", INVITE, dereg, MAIN_OK]) + pad)
        out.append(SEP.join([phone, b"@MAIN 423\r\nMin-Expires: 7200", b"@WAIT 2000"]) + pad)
        out.append(SEP.join([phone, MAIN_OK + b"\r\nPath: <sip:p@10.0.0.9;lr>", phone, b"@WAIT 4000"]) + pad)
    out += [m for m in messages() if tcp == (b"TCP" in m)][:8]
    if not tcp:
        out += [p.read_bytes() for p in TORTURE]
        out.append(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))  # STUN binding request
    else:
        out.append(b"\r\n\r\n" + phone + b"\r\n\r\n")
    return out


def configs() -> list[bytes]:
    base: dict[str, Any] = {"main_registrar": "sip:10.0.0.3:5070", "listen": ["udp:127.0.0.1:5060"]}
    variants: list[dict[str, Any]] = [
        {},
        {"mode": "contact", "outgoing_expires": 7200, "listen": ["udp:0.0.0.0:5060", "tcp:[::]:5060"]},
        {"mode": "aor", "store": "etcd", "etcd_endpoints": ["http://127.0.0.1:2379"]},
        {"min_expires": 60, "max_expires": 3600, "default_expires": 1800, "advertise": "sip.example.com"},
    ]
    out = [Settings(**{**base, **v}).to_yaml().encode() for v in variants]
    out += [
        b"main-registrar: sip:registrar.example.com\nlisten: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]\n",
        b"main_registrar: sip:1.2.3.4\nlisten: udp:127.0.0.1:5060\nmain_credentials: [realm:user:pw]\n",
        b"a: &a [x, x]\nb: &b [*a, *a]\nlisten: *b\n",
        b"",
        b"- 1\n",
    ]
    return out


def etcd_values() -> list[bytes]:
    binding = Binding(
        ctid=42,
        contact="sip:alice@192.0.2.10:5062",
        expires_at=1_000_600.0,
        source=Peer("udp", "192.0.2.10", 5062),
        call_id="c1",
        cseq=10,
        q=0.5,
        path=["<sip:p@10.0.0.9;lr>"],
        instance="<urn:uuid:1>",
        reg_id="1",
        methods=["INVITE"],
        owner="m1",
        main_expires=3600,
        relayed_at=1_000_000.0,
    )
    meta = MainMeta("sip:a@example.com", "sip:a@example.com", "sip:example.com", hop="sip:10.0.0.3")
    return [
        encode_binding(binding, 1_000_700.0),
        encode_binding(Binding(1, "sip:b@h", 0.0, Peer("tcp", "::1", 5060, conn=3), "c", 1), 0.0),
        encode_head("sip:a@example.com", meta, [42, 1]),
        encode_head("sip:b@example.com", None, []),
        encode_index("sip:a@example.com"),
        encode_member("sip:10.0.0.2:5060"),
        b"aor/sip:a%2Fb@example.com/ct/42",
    ]


def main() -> None:
    sets = {
        "message": messages(),
        "uri": uris(),
        "udp": scripts(tcp=False),
        "tcp": scripts(tcp=True),
        "config": configs(),
        "etcd": etcd_values(),
    }
    for name, seeds in sets.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in seeds:
            (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
        print(f"{name}: {len(list(folder.iterdir()))} files")


if __name__ == "__main__":
    main()
