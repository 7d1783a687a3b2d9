"""STUN keep-alives on the UDP SIP port (RFC 5626 §8): a Binding request in, a Binding success response out
with the phone's address as XOR-MAPPED-ADDRESS; the expected attribute bytes are RFC 5769's test vectors."""

from __future__ import annotations

import binascii
import struct

from registrar.sip.stack import IncomingRequest
from registrar.sip.transport import Peer
from tests.unit.stackkit import make_rig, request_bytes

COOKIE = bytes.fromhex("2112a442")
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")  # RFC 5769 §2.2 and §2.3


def binding_request(txid: bytes = TXID, *, fingerprint: bool = False) -> bytes:
    body = b""
    if fingerprint:
        head = struct.pack("!HH", 0x0001, 8) + COOKIE + txid
        crc = binascii.crc32(head) ^ 0x5354554E
        body = struct.pack("!HHI", 0x8028, 4, crc)
        return head + body
    return struct.pack("!HH", 0x0001, 0) + COOKIE + txid


def attributes(message: bytes) -> dict[int, bytes]:
    kind, length = struct.unpack_from("!HH", message)
    assert kind == 0x0101 and message[4:8] == COOKIE and length == len(message) - 20
    out, at = {}, 20
    while at < len(message):
        atype, alen = struct.unpack_from("!HH", message, at)
        out[atype] = message[at + 4 : at + 4 + alen]
        at += 4 + alen + (-alen % 4)
    return out


def stun_exchange(data: bytes, peer: Peer) -> list[bytes]:
    rig = make_rig()
    rig.feed(data, peer)
    assert rig.take_events() == []
    return [out for out, to in rig.raw if to == peer]


def test_an_ipv4_phone_gets_its_address_back_xored_as_rfc_5769_shows() -> None:
    phone = Peer("udp", "192.0.2.1", 32853)
    [answer] = stun_exchange(binding_request(), phone)
    assert answer[8:20] == TXID
    assert attributes(answer)[0x0020] == bytes.fromhex("0001a147e112a643")


def test_an_ipv6_phone_gets_its_address_xored_with_the_cookie_and_transaction_id() -> None:
    phone = Peer("udp", "2001:db8:1234:5678:11:2233:4455:6677", 32853)
    [answer] = stun_exchange(binding_request(), phone)
    assert attributes(answer)[0x0020] == bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


def test_an_ipv4_mapped_source_on_a_dual_stack_socket_is_reported_as_ipv4() -> None:
    [answer] = stun_exchange(binding_request(), Peer("udp", "::ffff:192.0.2.1", 32853))
    assert attributes(answer)[0x0020] == bytes.fromhex("0001a147e112a643")


def test_a_request_with_a_fingerprint_gets_a_valid_fingerprint_back() -> None:
    [answer] = stun_exchange(binding_request(fingerprint=True), Peer("udp", "192.0.2.1", 32853))
    attrs = attributes(answer)
    assert list(attrs)[-1] == 0x8028
    (crc,) = struct.unpack("!I", attrs[0x8028])
    assert crc == binascii.crc32(answer[:-8]) ^ 0x5354554E


def test_stun_answers_are_counted_and_sip_still_flows_on_the_same_port() -> None:
    rig = make_rig()
    phone = Peer("udp", "192.0.2.10", 5062)
    for _ in range(3):
        rig.feed(binding_request(), phone)
    assert rig.stack.stats.stun_keepalives == 3 and len(rig.raw) == 3
    rig.feed(request_bytes("OPTIONS", "sip:10.0.0.2", via="SIP/2.0/UDP 192.0.2.10:5062"), phone)
    [event] = rig.take_events()
    assert isinstance(event, IncomingRequest)


def test_other_stun_messages_and_garbage_that_looks_like_stun_get_no_answer() -> None:
    phone = Peer("udp", "192.0.2.10", 5062)
    indication = struct.pack("!HH", 0x0011, 0) + COOKIE + TXID  # a Binding indication: no answer expected
    bad_cookie = struct.pack("!HH", 0x0001, 0) + b"\x00\x00\x00\x00" + TXID
    short = b"\x00\x01\x00"
    wrong_length = struct.pack("!HH", 0x0001, 8) + COOKIE + TXID
    rig = make_rig()
    for data in (indication, bad_cookie, short, wrong_length):
        rig.feed(data, phone)
    assert rig.raw == [] and rig.take_events() == []
    assert rig.stack.stats.parse_errors == 4 and rig.stack.stats.stun_keepalives == 0
