"""The mid-registrar's state: an AoR record and its contact bindings (behaviour §2; docs/architecture.md
"Shared state in etcd").

The model both the core (which decides) and the stores (which keep) import; it imports neither. Plain
dataclasses with two public encodings:

- a JSON form (``to_dict``/``from_dict``, versioned with ``RECORD_VERSION``): what is written where other
  processes read it (etcd), so its field names are a wire format;
- a positional form (``to_tuple``/``from_tuple``): plain values only, for ``marshal``, kept inside one
  process (the memory store, the etcd store's cache). Its layout follows the dataclasses and is never
  written anywhere; only this module knows the positions.
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass, field, fields
from operator import attrgetter
from typing import Any, get_args, get_origin, get_type_hints

from registrar.sip.transport import Peer

RECORD_VERSION = 1


@dataclass(slots=True)
class Binding:
    """One contact of an AoR, as the phone registered it. Never edited in place once stored: records share
    bindings between copies, so a change is a new Binding (``dataclasses.replace``)."""

    ctid: int
    contact: str  # the UA's Contact URI exactly as sent
    expires_at: float  # absolute, on the engine's clock
    source: Peer  # where the REGISTER came from: the flow to reach the phone (received, RFC 3581)
    call_id: str
    cseq: int
    q: float | None = None
    path: list[str] = field(default_factory=list)
    instance: str | None = None
    reg_id: str | None = None
    methods: list[str] | None = None
    user_agent: str | None = None
    updated_at: float = 0.0
    # What the main registrar holds for this contact (mode contact; behaviour §2.2 exp, expO, LRTs, Con, CID).
    local_expires: int = 0  # exp: lifetime granted to the UA at the last relayed registration
    main_expires: int | None = None  # expO: lifetime the main registrar granted
    relayed_at: float | None = None  # LRTs: time of the last 2xx from the main registrar
    main_contact: str | None = None  # Con: our contact as the main registrar echoed it
    relayed_call_id: str | None = None  # CID of the last relayed REGISTER
    relayed_cseq: int = 0  # highest CSeq relayed with that Call-ID ([REC] T60)
    owner: str | None = None  # member id of the process holding the phone's flow (shared store)

    def remaining(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    def valid(self, now: float) -> bool:
        return self.expires_at > now

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source"] = asdict(self.source)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Binding:
        """Raises TypeError, ValueError or KeyError unless every field has its declared type (written by
        another process, a value may be anything: one that did not would fail far from where it was read)."""
        data = _typed(data, _BINDING_TYPES, "binding")
        data["source"] = Peer(**_typed(data["source"], _PEER_TYPES, "source"))
        if not 0 <= data["source"].port <= 65535:
            raise ValueError(f"source port {data['source'].port} out of range")
        return cls(**data)

    def to_tuple(self) -> tuple[Any, ...]:
        """The field values in declaration order, ``source`` as a tuple of its own (in-process only)."""
        values = list(_binding_fields(self))
        values[_SOURCE] = _peer_values(self.source)
        return tuple(values)

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> Binding:
        args = list(values)
        args[_SOURCE] = Peer(*args[_SOURCE])
        return cls(*args)

    def replaced(self, **changes: Any) -> Binding:
        """``dataclasses.replace`` for the hot path: built from the values in field order (about 4× faster,
        as an absorbed refresh replaces every binding it touches)."""
        values = list(_binding_fields(self))
        for name, value in changes.items():
            values[_BINDING_AT[name]] = value
        return Binding(*values)


@dataclass(slots=True)
class MainMeta:
    """How to reach the main registrar for this AoR, and (mode aor) what it holds (behaviour §2.3)."""

    from_uri: str
    to_uri: str
    ruri: str
    hop: str | None = None
    call_id: str | None = None  # CID of the last relayed REGISTER (mode aor)
    cseq: int = 0  # highest CSeq relayed with that Call-ID
    main_expires: int | None = None  # expO of the aggregated contact
    relayed_at: float | None = None  # LRTs
    main_contact: str | None = None  # Con: the aggregated contact as echoed
    no_dr: bool = False  # the UA de-registered: never send a De-REGISTER
    relay_until: float | None = None  # a refresh is being relayed until then: others absorb (T59)
    contact_owner: str | None = None  # shared store: the member whose address the aggregated contact carries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MainMeta:
        """Fields this version does not know are dropped: a newer process may share the store (rolling
        upgrade)."""
        data = _typed(data, _META_TYPES, "meta")
        return cls(**{k: v for k, v in data.items() if k in _META_FIELDS})


@dataclass(slots=True)
class AorRecord:
    """An AoR and its bindings, keyed by contact id."""

    aor: str
    bindings: dict[int, Binding] = field(default_factory=dict)
    version: int = 0  # the store's revision when loaded (compare-and-swap on commit)
    meta: MainMeta | None = None

    def copy(self) -> AorRecord:
        """A copy whose set of bindings can change without touching this one. Bindings and meta are
        shared: they are never edited in place, only replaced (``dataclasses.replace``)."""
        return AorRecord(self.aor, dict(self.bindings), self.version, self.meta)

    def valid_bindings(self, now: float) -> list[Binding]:
        """Unexpired bindings in lookup order: descending q (no q counts lowest), then oldest first."""
        found = [b for b in self.bindings.values() if b.valid(now)]
        return sorted(found, key=lambda b: -(b.q if b.q is not None else -1.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "aor": self.aor,
            "bindings": [b.to_dict() for b in self.bindings.values()],
            "meta": self.meta.to_dict() if self.meta is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AorRecord:
        if data.get("v") != RECORD_VERSION:
            raise ValueError(f"unsupported AoR record version {data.get('v')!r}")
        bindings = [Binding.from_dict(b) for b in data.get("bindings", [])]
        meta = MainMeta.from_dict(data["meta"]) if data.get("meta") else None
        return cls(aor=data["aor"], bindings={b.ctid: b for b in bindings}, meta=meta)

    def to_tuple(self) -> tuple[Any, ...]:
        """(version, meta, binding, ...) as tuples of field values in declaration order, ``source`` as a
        tuple of its own: plain values only, for ``marshal``. In-process only: the layout follows the
        dataclasses, so it is never written anywhere (that is what ``to_dict`` is for)."""
        meta = None if self.meta is None else _meta_values(self.meta)
        return (self.version, meta, *map(Binding.to_tuple, self.bindings.values()))

    @classmethod
    def from_tuple(cls, aor: str, values: tuple[Any, ...]) -> AorRecord:
        found = {b.ctid: b for b in map(Binding.from_tuple, values[2:])}
        meta = values[1]
        return cls(aor, found, values[0], None if meta is None else MainMeta(*meta))

    @staticmethod
    def tuple_ctids(values: tuple[Any, ...]) -> list[int]:
        """The contact ids in a ``to_tuple`` form, without building the bindings."""
        return [b[_CTID] for b in values[2:]]


_peer_values = attrgetter(*(f.name for f in fields(Peer)))
_META_FIELDS = frozenset(f.name for f in fields(MainMeta))
_meta_values = attrgetter(*(f.name for f in fields(MainMeta)))
_BINDING_FIELDS = [f.name for f in fields(Binding)]
_SOURCE = _BINDING_FIELDS.index("source")
_CTID = _BINDING_FIELDS.index("ctid")
_BINDING_AT = {name: i for i, name in enumerate(_BINDING_FIELDS)}
_binding_fields = attrgetter(*_BINDING_FIELDS)


def _check(value: Any, hint: Any, name: str) -> Any:
    """``value`` if it has the type ``hint`` (an int where a float is declared is made one), else TypeError
    or ValueError. JSON's types only: str, bool, int (within 64 bits), finite float, ``X | None``,
    ``list[X]``."""
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} is {type(value).__name__}, not a number")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:  # (float() would raise OverflowError)
            raise ValueError(f"{name} out of range")
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} is {type(value).__name__}, not an integer")
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{name} out of range")
        return value
    if hint is str or hint is bool:
        if not isinstance(value, hint):
            raise TypeError(f"{name} is {type(value).__name__}, not {hint.__name__}")
        return value
    if get_origin(hint) is list:
        if not isinstance(value, list):
            raise TypeError(f"{name} is {type(value).__name__}, not a list")
        (item,) = get_args(hint)
        return [_check(v, item, name) for v in value]
    raise TypeError(f"{name}: no check for {hint!r}")


def _typed(data: Any, hints: dict[str, Any], what: str) -> dict[str, Any]:
    """A copy of the JSON object ``data`` with the fields in ``hints`` checked (:func:`_check`); others are
    left for the constructor to refuse (or the caller to drop)."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} is {type(data).__name__}, not an object")
    return {k: v if k not in hints or k == "source" else _check(v, hints[k], k) for k, v in data.items()}


_BINDING_TYPES = get_type_hints(Binding)
_PEER_TYPES = get_type_hints(Peer)
_META_TYPES = get_type_hints(MainMeta)
