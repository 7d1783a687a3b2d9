"""SIP on raw sockets, for tests that need exact control over single messages: building a request, one
UDP or TCP exchange, OPTIONS pings, reading one framed message from a stream, and a message read back as
text (``SipMessage``)."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from registrar.sip.message import Request, Response
from registrar.sip.transport import ip_reference
from tests.support.process import Proc
from tests.support.wait import wait_for

LOOPBACK = "127.0.0.1"


def sip_request(
    method: str,
    ruri: str,
    local: tuple[str, int],
    *,
    transport: str = "UDP",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    call_id: str | None = None,
    cseq: int = 1,
    from_uri: str = "sip:probe@127.0.0.1",
    from_tag: str | None = None,
    to_uri: str | None = None,
) -> bytes:
    """A well-formed request (Via/From/To/Call-ID/CSeq/Max-Forwards/Content-Length) as bytes; a new branch
    each time, a new From tag and Call-ID unless given."""
    branch = "z9hG4bK-" + uuid.uuid4().hex[:16]
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {ip_reference(local[0])}:{local[1]};rport;branch={branch}",
        "Max-Forwards: 70",
        f"From: <{from_uri}>;tag={from_tag or uuid.uuid4().hex[:8]}",
        f"To: <{to_uri or ruri}>",
        f"Call-ID: {call_id or uuid.uuid4().hex + '@127.0.0.1'}",
        f"CSeq: {cseq} {method}",
    ]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def udp_socket(toward: str) -> socket.socket:
    """A UDP socket bound to the loopback address of ``toward``'s family (IPv6 when it has a colon)."""
    v6 = ":" in toward
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("::1" if v6 else LOOPBACK, 0))
    return s


def ok_to(request: Request, to_tag: str, contact: str | None = None) -> bytes:
    """A UAS's 200 OK to `request`: its Vias, Record-Routes, From, Call-ID and CSeq copied, a tag on its To, and
    `contact` as Contact (None: the request's own Contacts, as a registrar echoes them)."""
    copied = ("via", "record-route", "from", "call-id", "cseq") + (("contact",) if contact is None else ())
    lines = ["SIP/2.0 200 OK"]
    for h in request.headers:
        if h.key in copied:
            lines.append(f"{h.name}: {h.value}")
        elif h.key == "to":
            lines.append(f"To: {h.value};tag={to_tag}")
    if contact is not None:
        lines.append(f"Contact: {contact}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_code(data: bytes | None) -> int | None:
    if not data:
        return None
    m = re.match(rb"SIP/2\.0 (\d{3}) ", data)
    return int(m.group(1)) if m else None


def udp_exchange(
    dest: tuple[str, int],
    data: bytes,
    timeout: float = 2.0,
    sock: socket.socket | None = None,
    final_only: bool = True,
) -> bytes | None:
    """Send one datagram, return the first (final, unless final_only=False) response or None on timeout."""
    own = sock is None
    s = sock or udp_socket(dest[0])
    try:
        s.sendto(data, dest)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            try:
                reply, _ = s.recvfrom(65535)
            except TimeoutError:
                return None
            code = status_code(reply)
            if not final_only or code is None or code >= 200:
                return reply
    finally:
        if own:
            s.close()


def options(dest: tuple[str, int], timeout: float = 2.0, transport: str = "UDP") -> int | None:
    """Send OPTIONS addressed to `dest` itself; return the final status code or None."""
    ruri = f"sip:{ip_reference(dest[0])}:{dest[1]}"
    if transport.upper() == "TCP":
        with socket.create_connection(dest, timeout=timeout) as s:
            local = s.getsockname()
            msg = sip_request(
                "OPTIONS", ruri, local, transport="TCP", headers=[("Accept", "application/sdp")]
            )
            return status_code(tcp_exchange_on(s, msg, timeout))
    with udp_socket(dest[0]) as s:
        msg = sip_request("OPTIONS", ruri, s.getsockname()[:2], headers=[("Accept", "application/sdp")])
        return status_code(udp_exchange(dest, msg, timeout, sock=s))


def read_sip_stream_message(s: socket.socket, buf: bytearray, timeout: float) -> bytes | None:
    """Read one Content-Length framed SIP message from a stream socket (None on timeout/close)."""
    deadline = time.monotonic() + timeout
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = bytes(buf[:head_end])
            m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
            length = int(m.group(1)) if m else 0
            total = head_end + 4 + length
            if len(buf) >= total:
                msg = bytes(buf[:total])
                del buf[:total]
                return msg
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            chunk = s.recv(65535)
        except (TimeoutError, ConnectionError):
            return None
        if not chunk:
            return None
        buf.extend(chunk)


def tcp_exchange_on(s: socket.socket, data: bytes, timeout: float = 2.0) -> bytes | None:
    s.sendall(data)
    buf = bytearray()
    while True:
        msg = read_sip_stream_message(s, buf, timeout)
        if msg is None:
            return None
        code = status_code(msg)
        if code is None or code >= 200:
            return msg


def wait_sip_ready(dest: tuple[str, int], timeout: float = 10.0, proc: Proc | None = None) -> int:
    """Poll with OPTIONS until any final response comes back; its status code."""
    code = wait_for(
        lambda: options(dest, timeout=0.3), timeout, f"a SIP answer from {dest}", interval=0.0, proc=proc
    )
    assert code is not None
    return code


@dataclass
class SipMessage:
    """A message as text (a SIPp trace, a capture), with what the tests read from it."""

    direction: str  # "received" or "sent"
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\r\n", 1)[0].split("\n", 1)[0].strip()

    @property
    def method(self) -> str | None:
        m = re.match(r"([A-Z]+) \S+ SIP/2\.0", self.first_line)
        return m.group(1) if m else None

    @property
    def ruri(self) -> str | None:
        m = re.match(r"[A-Z]+ (\S+) SIP/2\.0", self.first_line)
        return m.group(1) if m else None

    def headers(self, name: str) -> list[str]:
        """Values of a header (long name; one value per header line, comma-separated lists split)."""
        head = re.split(r"\r?\n\r?\n", self.text, maxsplit=1)[0]
        out: list[str] = []
        for line in head.splitlines()[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() in (name.lower(), {"via": "v"}.get(name.lower(), "\0")):
                out += [p.strip() for p in v.split(",") if p.strip()]
        return out

    @property
    def vias(self) -> list[str]:
        return self.headers("Via")


def via_port(via: str) -> int | None:
    """The port of a Via header value's sent-by."""
    m = re.match(r"SIP/2\.0/\w+\s+[^:;\s]+:(\d+)", via)
    return int(m.group(1)) if m else None


def in_dialog_request(method: str, ok: Response, caller: tuple[str, int]) -> bytes:
    """The caller's ACK for a 2xx to its INVITE, or a later request of that dialog (a BYE): to the phone's
    Contact, through the route set the 2xx recorded (its Record-Routes reversed, RFC 3261 §12.1.2)."""
    routes = list(reversed(ok.headers.values("record-route")))
    seq = ok.cseq.seq if method == "ACK" else ok.cseq.seq + 1
    lines = [
        f"{method} {ok.contacts[0].uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {ip_reference(caller[0])}:{caller[1]};rport;branch=z9hG4bK-{uuid.uuid4().hex[:16]}",
        "Max-Forwards: 70",
        f"From: {ok.headers.get('from')}",
        f"To: {ok.headers.get('to')}",
        f"Call-ID: {ok.call_id}",
        f"CSeq: {seq} {method}",
        *[f"Route: {r}" for r in routes],
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ipv6_loopback() -> bool:
    """Whether this machine has ::1 (a container without IPv6 has not)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
