"""Where the registrar's state lives in etcd and how it is written: the one statement of the key layout and
of the values, for the etcd store, the operator (finalizer cleanup, AoR and contact counts) and the
benchmarks that seed etcd. docs/architecture.md "Shared state in etcd" explains the choices.

Only the standard library and registrar.records: the operator imports this module without gRPC.

Keys under ``P``, one registrar's prefix (``settings.etcd_prefix``); an AoR is written with ``%`` and ``/``
escaped, so that it stays one path segment whatever it holds:

- ``P aor/<aor>``: head, ``{"v":1,"aor","meta","ctids"}``, on the lease of its largest binding hold;
- ``P aor/<aor>/ct/<ctid>``: binding, ``Binding.to_dict()`` + ``"v"`` + ``"hold"`` (when the owner's lease
  for it ends), on a lease ending at ``hold``; ``P ctid/<ctid>`` → the AoR, on the same lease;
- ``P claims/<ctid>/<mod_revision of the deleted binding>``: the member id, written with every delete of a
  binding key (and by the winner of an orphan claim);
- ``P members/<member id>``: ``{"sip": address}`` on the member's liveness lease.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from registrar.records import RECORD_VERSION, Binding, MainMeta

_COMPACT = (",", ":")


def escape_aor(aor: str) -> bytes:
    return aor.replace("%", "%25").replace("/", "%2F").encode()


def unescape_aor(text: bytes) -> str:
    return text.decode().replace("%2F", "/").replace("%25", "%")


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix" (the last byte below 0xff, incremented)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # the whole keyspace


class KeyKind(enum.Enum):
    HEAD = "head"
    BINDING = "binding"
    AOR_OTHER = "aor-other"  # under an AoR, but neither its head nor a binding (written by someone else)
    INDEX = "index"
    CLAIM = "claim"
    MEMBER = "member"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key under the prefix, named: ``aor`` for HEAD/BINDING/AOR_OTHER, ``ctid`` for BINDING/INDEX/CLAIM,
    ``mod_revision`` for CLAIM, ``member`` for MEMBER."""

    kind: KeyKind
    aor: str = ""
    ctid: int = 0
    mod_revision: int = 0
    member: str = ""


@dataclass(frozen=True, slots=True)
class EtcdKeys:
    """The keys of one registrar (``prefix`` ends with ``/``)."""

    prefix: bytes

    @property
    def aors(self) -> bytes:
        """The prefix of every head and binding key."""
        return self.prefix + b"aor/"

    @property
    def members(self) -> bytes:
        """The prefix of every member key."""
        return self.prefix + b"members/"

    def head(self, aor: str) -> bytes:
        return self.prefix + b"aor/" + escape_aor(aor)

    def bindings(self, aor: str) -> bytes:
        """The prefix of the AoR's binding keys."""
        return self.head(aor) + b"/ct/"

    def binding(self, aor: str, ctid: int) -> bytes:
        return self.head(aor) + b"/ct/%d" % ctid

    def index(self, ctid: int) -> bytes:
        return self.prefix + b"ctid/%d" % ctid

    def claim(self, ctid: int, mod_revision: int) -> bytes:
        return self.prefix + b"claims/%d/%d" % (ctid, mod_revision)

    def member(self, member: str) -> bytes:
        return self.prefix + b"members/" + member.encode()

    def parse(self, key: bytes) -> ParsedKey | None:
        """What a key is; None outside the prefix or not in this layout."""
        if not key.startswith(self.prefix):
            return None
        kind, _, rest = key[len(self.prefix) :].partition(b"/")
        try:
            if kind == b"aor":
                esc, sep, tail = rest.partition(b"/")
                aor = unescape_aor(esc)
                if not sep:
                    return ParsedKey(KeyKind.HEAD, aor=aor)
                if tail.startswith(b"ct/") and tail[3:].isdigit():
                    return ParsedKey(KeyKind.BINDING, aor=aor, ctid=int(tail[3:]))
                return ParsedKey(KeyKind.AOR_OTHER, aor=aor)
            if kind == b"ctid":
                return ParsedKey(KeyKind.INDEX, ctid=int(rest))
            if kind == b"claims":
                ctid, _, mod_revision = rest.partition(b"/")
                return ParsedKey(KeyKind.CLAIM, ctid=int(ctid), mod_revision=int(mod_revision))
            if kind == b"members":
                return ParsedKey(KeyKind.MEMBER, member=rest.decode())
        except ValueError:  # not a number, not UTF-8: not one of ours
            return None
        return None


# What a decoder raises on a value not in this layout (another writer's, a later version's, corrupted):
# the store skips such a value with a log line (:func:`why`), never letting it reach the core.
UNDECODABLE = (ValueError, TypeError, KeyError)


def why(exc: BaseException) -> str:
    """One line saying why a value was not understood."""
    return f"{type(exc).__name__}: {exc}"[:200]


def encode_head(aor: str, meta: MainMeta | None, ctids: Iterable[int]) -> bytes:
    value = {
        "v": RECORD_VERSION,
        "aor": aor,
        "meta": meta.to_dict() if meta is not None else None,
        "ctids": [str(c) for c in ctids],
    }
    return json.dumps(value, separators=_COMPACT).encode()


def _json_object(value: bytes) -> dict[str, Any]:
    """A JSON object (ValueError or TypeError on anything else: bad JSON, another type, nesting too deep)."""
    try:
        data = json.loads(value)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    if not isinstance(data, dict):
        raise TypeError(f"a JSON {type(data).__name__}, not an object")
    return data


def decode_head_meta(value: bytes) -> MainMeta | None:
    """The head's meta (raises ValueError, TypeError or KeyError on a value not in this layout)."""
    data = _json_object(value)
    return MainMeta.from_dict(data["meta"]) if data.get("meta") else None


def encode_binding(binding: Binding, hold: float) -> bytes:
    data = binding.to_dict()
    data["v"] = RECORD_VERSION
    data["hold"] = hold
    return json.dumps(data, separators=_COMPACT).encode()


def decode_binding(value: bytes) -> tuple[Binding, float]:
    """The binding and its hold (its expiry when a writer left the hold out)."""
    data = _json_object(value)
    data.pop("v", None)
    try:
        hold = float(data.pop("hold", data.get("expires_at", 0.0)))
    except OverflowError:  # an integer past a float's range
        raise ValueError("hold out of range") from None
    if not math.isfinite(hold):
        raise ValueError(f"hold is {hold}")
    return Binding.from_dict(data), hold


def encode_index(aor: str) -> bytes:
    return aor.encode()


def decode_index(value: bytes) -> str:
    return value.decode()


def encode_member(address: str, clock: float | None = None) -> bytes:
    """``clock``: the writer's wall clock when it wrote (peers compare it with theirs: skew detection)."""
    data: dict[str, Any] = {"sip": address}
    if clock is not None:
        data["clock"] = round(clock, 3)
    return json.dumps(data).encode()


def member_clock(value: bytes) -> float | None:
    """The writer's wall clock in a member value (None when absent or not a finite number)."""
    try:
        clock = _json_object(value).get("clock")
    except UNDECODABLE:
        return None
    if isinstance(clock, bool) or not isinstance(clock, int | float) or not math.isfinite(clock):
        return None
    return float(clock)


def decode_member(value: bytes) -> str:
    """The member's internal SIP address (raises ValueError, TypeError or KeyError when not one)."""
    address = _json_object(value)["sip"]
    if not isinstance(address, str):
        raise TypeError(f"member address {address!r} is not a string")
    return address


def encode_claim(member: str) -> bytes:
    return member.encode()
