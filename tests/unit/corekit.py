"""Drive the whole mid-registrar pipeline (stack + core + memory store) on a virtual clock."""

from __future__ import annotations

import random
import re
from typing import Any

from registrar.config import Settings
from registrar.core.service import MidRegistrar
from registrar.sip.message import Request, Response
from registrar.sip.transport import Peer
from registrar.store.memory import MemoryStore
from tests.unit.stackkit import MAIN, Rig, make_rig, response_to

PHONE = Peer("udp", "192.0.2.10", 5062)
NATTED = Peer("udp", "203.0.113.5", 40000)


class Core:
    def __init__(
        self, core_kw: dict[str, Any] | None = None, *, rig: Rig | None = None, **settings: Any
    ) -> None:
        base: dict[str, Any] = {
            "main_registrar": "sip:10.0.0.3:5070",
            "listen": ["udp:10.0.0.2:5060"],
            "min_expires": 10,
            "max_expires": 3600,
            "default_expires": 3600,
        }
        base.update(settings)
        self.settings = Settings(**base)
        self.rig: Rig = rig or make_rig()
        self.store = MemoryStore(random.Random(7))
        self.core = MidRegistrar(
            self.settings, self.rig.stack, self.store, random.Random(1), **(core_kw or {})
        )
        self.shortcuts = 0  # messages answered from a refresh template

    @property
    def now(self) -> float:
        return self.rig.now

    def feed(self, data: bytes, peer: Peer) -> None:
        """As the shell does: a repeated refresh is answered from its template, the rest parsed."""
        if self.core.shortcut(data, peer, self.rig.now):
            self.shortcuts += 1
            self.rig.drain()
        else:
            self.rig.feed(data, peer)
        self._dispatch()

    def advance(self, seconds: float) -> None:
        """Move the clock, firing stack and core timers in order."""
        end = self.rig.now + seconds
        while True:
            deadlines = [
                d for d in (self.rig.stack.next_deadline(), self.core.next_deadline()) if d is not None
            ]
            if not deadlines or min(deadlines) > end:
                break
            self.rig.now = max(self.rig.now, min(deadlines))
            self.rig.stack.handle_timers(self.rig.now)
            self.core.on_timer(self.rig.now)
            self.rig.drain()
            self._dispatch()
        self.rig.now = end

    def _dispatch(self) -> None:
        while events := self.rig.take_events():
            for event in events:
                self.core.handle(event, self.rig.now)
            self.rig.drain()

    def take(self) -> list[tuple[Request | Response, Peer]]:
        return self.rig.take()

    def to_main(self) -> Request:
        sent = [m for m, p in self.take() if isinstance(m, Request) and p == MAIN]
        assert len(sent) == 1, sent
        return sent[0]

    def to_phone(self, peer: Peer = PHONE) -> Response:
        sent = [m for m, p in self.take() if isinstance(m, Response) and p == peer]
        assert len(sent) == 1, sent
        return sent[0]


def register(
    contact: str = '<sip:alice@192.0.2.10:5062;transport=udp>;+sip.instance="<urn:uuid:1>";expires=1800',
    *,
    cseq: int = 10,
    call_id: str = "c1@192.0.2.10",
    branch: str = "z9hG4bK-a1",
    expires: int | None = None,
    to: str = "<sip:alice@example.com>",
    extra: str = "",
    via_host: str = "192.0.2.10:5062",
) -> bytes:
    lines = [
        "REGISTER sip:example.com SIP/2.0",
        f"Via: SIP/2.0/UDP {via_host};rport;branch={branch}",
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=f1",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
    ]
    if contact:
        lines.append(f"Contact: {contact}")
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if extra:
        lines.append(extra)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def main_ok(
    relayed: Request, *, expires: int | None = 3600, header: int | None = 3600, extra: str = ""
) -> bytes:
    """The main registrar's 200: echoes the contacts it got with its own lifetime."""
    contacts = []
    for c in relayed.contacts:
        uri = str(c.uri)
        value = c.expires if expires is None else str(expires)
        contacts.append(f"Contact: <{uri}>;expires={value}")
    more = "\r\n".join(
        [*contacts, *([f"Expires: {header}"] if header is not None else []), *([extra] if extra else [])]
    )
    return response_to(relayed, 200, extra=more)


def ctid_of(relayed: Request) -> str:
    m = re.search(r"ctid=(\d+)", str(relayed.contacts[0].uri))
    assert m, relayed.contacts
    return m.group(1)
