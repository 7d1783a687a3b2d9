"""Parse + serialize cost of a typical REGISTER on one core (issue 2 goal: ≤ 16 µs, i.e. ≥ 60,000/s).

Run: ``python -m bench.parse_bench`` from the repository's root. Prints the median over repeated runs of
(a) parse + serialize (framing, header split, mandatory-field checks, top Via and CSeq),
(b) the same plus every typed field a registrar reads (To, From, Contact, Call-ID, Expires), and
(c) a whole mirror-mode round trip through the sans-IO stack and core (REGISTER in, relayed out, the
main registrar's 200 in, the rewritten 200 out), all measured as process CPU time.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable

from registrar.config import Settings
from registrar.core.service import MidRegistrar
from registrar.sip.message import parse_message
from registrar.sip.stack import LocalAddress, Stack
from registrar.sip.transport import Peer
from registrar.store.memory import MemoryStore

# The same typical REGISTER the unit tests use.
from tests.unit.sipdata import REGISTER


def per_call_us(fn: Callable[[], object], n: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - start) / n * 1e6)
    return statistics.median(samples)


def parse_serialize() -> bytes:
    return parse_message(REGISTER).to_bytes()


def parse_fields_serialize() -> bytes:
    msg = parse_message(REGISTER)
    msg.to  # noqa: B018
    msg.from_  # noqa: B018
    msg.contacts  # noqa: B018
    msg.headers.get("expires")
    msg.call_id  # noqa: B018
    return msg.to_bytes()


def pipeline() -> Callable[[], object]:
    """One REGISTER relayed to the main registrar and its 200 OK back to the phone, per call: two
    messages parsed, two built, a server and a client transaction, the 2xx applied to the store."""
    settings = Settings(main_registrar="sip:10.0.0.3:5070", listen=["udp:10.0.0.2:5060"])
    counter = itertools.count()
    stack = Stack([LocalAddress("udp", "10.0.0.2", 5060)], unique=lambda: str(next(counter)))
    core = MidRegistrar(settings, stack, MemoryStore(random.Random(1)), random.Random(2))
    phone = Peer("udp", "192.0.2.10", 5062)
    main = Peer("udp", "10.0.0.3", 5070)
    seq = itertools.count()

    def one() -> None:
        i = next(seq)
        now = float(i)
        data = REGISTER.replace(b"branch=z9hG4bK-a1", b"branch=z9hG4bK-%d" % i).replace(
            b"CSeq: 10 ", b"CSeq: %d " % (i + 10)
        )
        stack.receive(data, phone, now)
        for event in stack.pop_events():
            core.handle(event, now)
        [(relayed, _)] = stack.pop_outgoing()
        stack.receive(ok_for(relayed), main, now)
        for event in stack.pop_events():
            core.handle(event, now)
        stack.pop_outgoing()
        stack.handle_timers(now + 40.0)  # let transactions end so state stays bounded

    return one


def ok_for(relayed: bytes) -> bytes:
    """The main registrar's 200 OK: the relayed request's Vias, dialog headers and Contact, expires 3600."""
    head = relayed.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = [
        h for h in head[1:] if h.split(b":", 1)[0].lower() in (b"via", b"from", b"to", b"call-id", b"cseq")
    ]
    contact = next(h for h in head if h.lower().startswith(b"contact:")).split(b";expires=")[0]
    lines = [b"SIP/2.0 200 OK", *keep, contact + b";expires=3600", b"Content-Length: 0"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def main() -> int:
    n, repeats = 20000, 7
    a = per_call_us(parse_serialize, n, repeats)
    b = per_call_us(parse_fields_serialize, n, repeats)
    c = per_call_us(pipeline(), n // 4, repeats)
    print(f"REGISTER of {len(REGISTER)} bytes, median of {repeats} runs, CPU time per message:")
    print(f"  parse + serialize:                      {a:6.2f} µs  ({1e6 / a:,.0f}/s)")
    print(f"  parse + registrar fields + serialize:   {b:6.2f} µs  ({1e6 / b:,.0f}/s)")
    print(f"  mirror round trip (REGISTER→main→200→phone): {c:6.2f} µs  ({1e6 / c:,.0f}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
