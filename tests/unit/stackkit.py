"""A tiny harness to drive the sans-IO stack with a virtual clock in unit tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from registrar.sip.errors import ParseError
from registrar.sip.message import Request, Response, parse_message
from registrar.sip.stack import Event, LocalAddress, Stack
from registrar.sip.transaction import Timers
from registrar.sip.transport import Peer

MID = LocalAddress("udp", "10.0.0.2", 5060)
PHONE = Peer("udp", "192.0.2.10", 5062)
MAIN = Peer("udp", "10.0.0.3", 5070)


@dataclass
class Rig:
    stack: Stack
    now: float = 0.0
    sent: list[tuple[Request | Response, Peer]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    raw: list[tuple[bytes, Peer]] = field(default_factory=list)  # every message sent, as sent

    def feed(self, data: bytes, peer: Peer) -> None:
        self.stack.receive(data, peer, self.now)
        self.drain()

    def drain(self) -> None:
        for data, peer in self.stack.pop_outgoing():
            self.raw.append((data, peer))
            try:
                self.sent.append((parse_message(data, stream=peer.reliable), peer))
            except ParseError:
                continue  # a 400 to a request whose Via is broken: kept as sent in ``raw`` only
        self.events.extend(self.stack.pop_events())

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer due on the way, in order."""
        end = self.now + seconds
        while True:
            deadline = self.stack.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self.stack.handle_timers(self.now)
            self.drain()
        self.now = end

    def take(self) -> list[tuple[Request | Response, Peer]]:
        out, self.sent = self.sent, []
        return out

    def take_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out


def make_rig(*, record_route: bool = False, locals_: list[LocalAddress] | None = None) -> Rig:
    counter = itertools.count(1)
    rigs: list[Rig] = []  # the stack reads the rig's virtual clock for answer latencies
    stack = Stack(
        locals_ or [MID, LocalAddress("tcp", "10.0.0.2", 5060)],
        timers=Timers(),
        record_route=record_route,
        unique=lambda: f"u{next(counter)}",
        clock=lambda: rigs[0].now,
    )
    rigs.append(Rig(stack))
    return rigs[0]


def request_bytes(
    method: str,
    uri: str = "sip:alice@10.0.0.2:5060;ctid=42",
    *,
    branch: str = "z9hG4bK-1",
    via: str = "SIP/2.0/UDP 10.0.0.3:5070",
    cseq: int = 1,
    call_id: str = "call-1",
    extra: str = "",
    max_forwards: int | None = 70,
    to_tag: str | None = None,
) -> bytes:
    to = "<sip:alice@example.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via};branch={branch}",
        *([f"Max-Forwards: {max_forwards}"] if max_forwards is not None else []),
        "From: <sip:bob@example.com>;tag=b1",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "Contact: <sip:bob@10.0.0.3:5070>",
    ]
    if extra:
        lines.append(extra)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response_to(request: Request, status: int, *, to_tag: str = "t1", extra: str = "") -> bytes:
    """What a downstream element answers to a request we sent (all its Vias echoed)."""
    reason = {100: "Trying", 180: "Ringing", 200: "OK"}.get(status, "Whatever")
    lines = [f"SIP/2.0 {status} {reason}"]
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            lines.append(f"{h.name}: {h.value}")
        elif h.key == "to":
            lines.append(
                f"To: {h.value}" + (f";tag={to_tag}" if status > 100 and "tag=" not in h.value else "")
            )
    if extra:
        lines.append(extra)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
