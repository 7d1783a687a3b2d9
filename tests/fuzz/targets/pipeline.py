"""The whole engine as the shell drives it (tests/unit/corekit.py): stack + mid-registrar core + memory store,
on a virtual clock. Shared by the ``udp`` and ``tcp`` targets; not a target itself.

An input is a script of segments separated by :data:`SEP`:

- ``@MAIN <status>`` + CRLF + extra header lines: the main registrar answers the last request the engine sent
  it (Via, From, To, Call-ID, CSeq echoed by :func:`tests.unit.stackkit.response_to`, then the extra lines:
  Contact, Expires, Path, Service-Route… as fuzzed);
- ``@WAIT <seconds>``: the clock moves on, firing timers;
- anything else: bytes from the phone (one datagram, or a piece of the TCP stream).

The mode (mirror, contact, aor) comes from the input's length. Nothing may escape ``receive``, the core's
``shortcut``/``handle`` or the timers: the engine answers bad input with a 400 or drops it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from registrar.sip.message import Request
from registrar.sip.transport import Peer
from tests.unit.corekit import Core
from tests.unit.stackkit import MAIN

SEP = b"\r\n--8<--\r\n"
MODES = ("mirror", "contact", "aor")


def make_core(data: bytes, tcp: bool) -> Core:
    mode = MODES[len(data) % 3]
    listen = ["udp:10.0.0.2:5060", "tcp:10.0.0.2:5060"] if tcp else ["udp:10.0.0.2:5060"]
    extra: dict[str, Any] = {"outgoing_expires": 3600} if mode != "mirror" else {}
    return Core(mode=mode, listen=listen, **extra)


def last_to_main(core: Core, sent: list[Request]) -> None:
    for msg, peer in core.take():
        if isinstance(msg, Request) and peer == MAIN and msg.method != "ACK":
            sent.append(msg)


def answer(request: Request, status: int, extra: bytes) -> bytes:
    """The main registrar's response to ``request`` (as tests/unit/stackkit.py's ``response_to``, but any
    bytes: the request may carry any, and so may the fuzzed extra header lines)."""
    lines = [f"SIP/2.0 {status} Whatever".encode()]
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            lines.append(f"{h.name}: {h.value}".encode("utf-8", "surrogateescape"))
        elif h.key == "to":
            tag = ";tag=t1" if status > 100 and "tag=" not in h.value else ""
            lines.append(f"To: {h.value}{tag}".encode("utf-8", "surrogateescape"))
    if extra:
        lines.append(extra)
    lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def script(data: bytes, core: Core, phone: Callable[[bytes], None]) -> None:
    sent: list[Request] = []
    for segment in itertools.islice(data.split(SEP), 16):
        if segment.startswith(b"@MAIN "):
            last_to_main(core, sent)
            if not sent:
                continue
            line, _, extra = segment[6:].partition(b"\r\n")
            status = int(line[:3]) if line[:3].isdigit() else 200
            status = min(max(status, 100), 699)
            core.feed(answer(sent[-1], status, extra.strip(b"\r\n")), MAIN)
        elif segment.startswith(b"@WAIT "):
            seconds = int(segment[6:12]) if segment[6:12].isdigit() else 1
            core.advance(min(seconds, 100_000))
        else:
            phone(segment)
        last_to_main(core, sent)
    core.advance(70.0)  # every transaction timer, expiry and refresh due soon
    core.take()


def udp(data: bytes) -> None:
    core = make_core(data, tcp=False)
    peer = Peer("udp", "192.0.2.10", 5062)
    script(data, core, lambda segment: core.feed(segment, peer))


__all__ = ["SEP", "Core", "make_core", "script", "udp"]
