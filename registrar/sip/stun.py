"""STUN keep-alives on the SIP port (RFC 5626 §4.4.2, §8; message format of RFC 5389).

A phone using SIP outbound over UDP keeps its NAT binding open with STUN Binding requests sent to the very
port its SIP goes to, and reads the XOR-MAPPED-ADDRESS of the answer to notice when its public address
changes (it then re-registers). A STUN message cannot be mistaken for SIP: its first byte is 0x00 or 0x01,
and bytes 4-7 hold the magic cookie. Pure functions: bytes in, bytes out.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from typing import Final

__all__ = ["MAGIC_COOKIE", "binding_response", "is_stun"]

MAGIC_COOKIE: Final = 0x2112A442
_HEADER: Final = struct.Struct("!HHI12s")  # type, length of the attributes, magic cookie, transaction id
_BINDING_REQUEST: Final = 0x0001
_BINDING_SUCCESS: Final = 0x0101
_XOR_MAPPED_ADDRESS: Final = 0x0020
_FINGERPRINT: Final = 0x8028
_FINGERPRINT_XOR: Final = 0x5354554E


def is_stun(data: bytes) -> bool:
    """A STUN message by its header (RFC 5389 §6): the two top bits zero, the cookie, a whole length."""
    if len(data) < _HEADER.size or data[0] & 0xC0:
        return False
    length: int
    cookie: int
    _, length, cookie, _ = _HEADER.unpack_from(data)
    return cookie == MAGIC_COOKIE and length % 4 == 0 and length == len(data) - _HEADER.size


def binding_response(data: bytes, host: str, port: int) -> bytes | None:
    """The Binding success response to a Binding request from ``host``:``port``, or None for any other STUN
    message (an indication, a response: nothing to answer). With a FINGERPRINT in the request, the answer
    carries one too (RFC 5389 §7.3), so a phone that checks it accepts the answer."""
    if not is_stun(data):
        return None
    kind, _, _, txid = _HEADER.unpack_from(data)
    if kind != _BINDING_REQUEST:
        return None
    attributes = _xor_mapped_address(host, port, txid)
    fingerprint = _has_fingerprint(data)
    length = len(attributes) + (8 if fingerprint else 0)
    out = _HEADER.pack(_BINDING_SUCCESS, length, MAGIC_COOKIE, txid) + attributes
    if fingerprint:
        crc = zlib.crc32(out) ^ _FINGERPRINT_XOR
        out += struct.pack("!HHI", _FINGERPRINT, 4, crc)
    return out


def _xor_mapped_address(host: str, port: int, txid: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS (RFC 5389 §15.2): the source address as seen here, XORed so that NATs rewriting
    addresses inside payloads leave it alone. An IPv4-mapped IPv6 source is reported as IPv4."""
    address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    xport = port ^ (MAGIC_COOKIE >> 16)
    if isinstance(address, ipaddress.IPv4Address):
        family, mask = 0x01, MAGIC_COOKIE.to_bytes(4, "big")
    else:
        family, mask = 0x02, MAGIC_COOKIE.to_bytes(4, "big") + txid
    xaddr = bytes(a ^ m for a, m in zip(address.packed, mask, strict=True))
    value = struct.pack("!BBH", 0, family, xport) + xaddr
    return struct.pack("!HH", _XOR_MAPPED_ADDRESS, len(value)) + value


def _has_fingerprint(data: bytes) -> bool:
    """Whether the request's last attribute is a FINGERPRINT (it is always the last, RFC 5389 §15.5)."""
    return len(data) >= _HEADER.size + 8 and struct.unpack_from("!HH", data, len(data) - 8) == (
        _FINGERPRINT,
        4,
    )
