"""A faster ``__init__`` for frozen, slotted dataclasses built on the hot path (Peer, Lifetimes).

A frozen dataclass's generated ``__init__`` stores every field with ``object.__setattr__`` (it must get past
its own ``__setattr__``, which raises): 1.4 µs for five fields, once or twice per SIP message. Storing through
the slot descriptors does the same in 0.4 µs. The class stays frozen: assignments still raise.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

_C = TypeVar("_C", bound=type)


def fast_frozen_init(cls: _C) -> _C:
    """Class decorator, applied on top of ``@dataclass(frozen=True, slots=True)``."""
    names: list[str] = []
    params: list[str] = []
    namespace: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init or f.default_factory is not MISSING or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain positional fields are supported")
        names.append(f.name)
        namespace[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        if f.default is MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has __post_init__")
    body = "\n".join(f"    _set_{name}(self, {name})" for name in names) or "    pass"
    exec(f"def __init__(self, {', '.join(params)}):\n{body}\n", namespace)  # fixed template: field names only
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls
