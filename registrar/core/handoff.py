"""The hand-off header between registrar processes, authenticated (architecture "Networking and flow
ownership"; issue "trust nothing by address").

A process that receives a request for a phone flow another process holds passes it on with
``X-Midreg-Flow: <sender> <contact id> <unix time> <mac>``. The MAC is an HMAC-SHA256 over those fields and
what identifies the request (method, Request-URI, Call-ID, CSeq, and the branch of the Via below the
sender's: the transaction it forwards), with a key the
processes share (a Secret the operator keeps per MidRegistrar). A forged source address is not enough: the
receiver acts on the header only when the MAC verifies with one of its keys and the time is within the replay
window. Several keys verify and the first signs, so keys rotate without downtime: add the new key second,
roll, put it first, roll, drop the old one. Pure functions: keys, requests and ``now`` in.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from registrar.sip.errors import ParseError
from registrar.sip.headers import is_digits
from registrar.sip.message import Request

HEADER = "X-Midreg-Flow"
REPLAY_WINDOW = 30.0  # seconds a signed hand-off stays good (clocks of pods agree far better)
MAC_HEX = 32  # 128 bits of the HMAC, as hex


@dataclass(frozen=True)
class HandoffKeys:
    """The shared keys: the first signs, every one verifies."""

    keys: tuple[bytes, ...]

    @classmethod
    def from_text(cls, text: str) -> HandoffKeys:
        """One key per line (blank lines and ``#`` comments ignored); at least 16 bytes each."""
        keys = tuple(
            line.strip().encode() for line in text.splitlines() if line.strip() and not line.startswith("#")
        )
        if not keys:
            raise ValueError("no hand-off key")
        if any(len(k) < 16 for k in keys):
            raise ValueError("a hand-off key is shorter than 16 bytes")
        return cls(keys)

    @classmethod
    def from_file(cls, path: Path) -> HandoffKeys:
        return cls.from_text(path.read_text())

    def mac(self, fields: str, key: bytes | None = None) -> str:
        return hmac.new(key or self.keys[0], fields.encode(), hashlib.sha256).hexdigest()[:MAC_HEX]

    def verifies(self, fields: str, mac: str) -> bool:
        return any(hmac.compare_digest(self.mac(fields, k), mac) for k in self.keys)


def _fields(sender: str, ctid: int, at: int, request: Request, upstream: int) -> str:
    """What the MAC covers: the header's own fields and the request it rides on, so that it cannot be moved
    to another request. ``upstream`` indexes the Via of the transaction the sender forwards: the top one when
    it signs (its own Via comes after), the second when the receiver checks."""
    vias = request.vias
    branch = (vias[upstream].branch or "") if len(vias) > upstream else ""
    return "\n".join(
        (
            sender,
            str(ctid),
            str(at),
            request.method,
            str(request.uri),
            request.call_id,
            str(request.cseq.seq),
            branch,
        )
    )


def sign(keys: HandoffKeys | None, sender: str, ctid: int, request: Request, now: float) -> str:
    """The header value for ``request``, before the sender adds its own Via. Without keys, the unsigned form
    ``<sender> <contact id>`` of processes that trust their peers' addresses."""
    if keys is None:
        return f"{sender} {ctid}"
    at = int(now)
    return f"{sender} {ctid} {at} {keys.mac(_fields(sender, ctid, at, request, 0))}"


@dataclass(frozen=True)
class Handoff:
    sender: str
    ctid: int


def verify(
    keys: HandoffKeys,
    value: str,
    request: Request,
    now: float,
    offset: Callable[[str], float] | None = None,
) -> Handoff | None:
    """The hand-off the header names when its MAC verifies and it is fresh; None for anything else (forged,
    replayed, moved to another request, unsigned, garbled). ``offset``: how far the sender's clock is ahead
    of ours, as measured through the store (so a skew the processes know of does not make every hand-off
    look like a replay)."""
    parts = value.split()
    if len(parts) != 4 or not is_digits(parts[1]) or not is_digits(parts[2]) or len(parts[3]) != MAC_HEX:
        return None
    sender, ctid, at = parts[0], int(parts[1]), int(parts[2])
    if abs(now + (offset(sender) if offset is not None else 0.0) - at) > REPLAY_WINDOW:
        return None
    try:
        fields = _fields(sender, ctid, at, request, 1)
    except (ParseError, ValueError):
        return None
    return Handoff(sender, ctid) if keys.verifies(fields, parts[3]) else None


def unsigned(value: str) -> Handoff | None:
    """The unsigned form (no keys configured): ``<sender> <contact id>``."""
    sender, _, ctid = value.partition(" ")
    return Handoff(sender, int(ctid)) if sender and is_digits(ctid) else None


__all__: Sequence[str] = ["HEADER", "Handoff", "HandoffKeys", "sign", "unsigned", "verify"]
