"""The hand-off keys of a MidRegistrar's pods (registrar.core.handoff): a Secret ``<name>-handoff`` that the
operator makes, mounted into every pod, and rotated without downtime when the MidRegistrar is annotated
``sip.midregistrar.io/rotate-handoff-key: <any new value>``.

A pod signs with the first key of the file and accepts any, and re-reads the file when the kubelet updates it
(within about a minute). So a rotation takes three steps, each once every pod can have read the previous one
(``settle`` seconds): the new key is added second (every pod accepts it, none signs with it yet), then it is
put first (pods sign with it, the old one is still accepted from pods not yet updated), then the old key goes.
Pure functions: the Secret's state and ``now`` in, the next state out.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

ROTATE_ANNOTATION = "sip.midregistrar.io/rotate-handoff-key"  # on the MidRegistrar: ask for a rotation
ROTATION = "sip.midregistrar.io/handoff-rotation"  # on the Secret: the request being (or last) handled
PHASE = "sip.midregistrar.io/handoff-rotation-phase"  # "", "added", "promoted"
SINCE = "sip.midregistrar.io/handoff-rotation-since"  # unix time of the last step
KEY_FILE = "keys"


def new_key() -> str:
    return secrets.token_hex(32)


@dataclass(frozen=True)
class KeyState:
    keys: tuple[str, ...]
    rotation: str = ""
    phase: str = ""
    since: float = 0.0

    @classmethod
    def from_secret(cls, data: dict[str, str], annotations: dict[str, str]) -> KeyState:
        """From a Secret's decoded data and annotations."""
        keys = tuple(k.strip() for k in data.get(KEY_FILE, "").splitlines() if k.strip())
        try:
            since = float(annotations.get(SINCE, "0") or 0)
        except ValueError:
            since = 0.0
        return cls(keys, annotations.get(ROTATION, ""), annotations.get(PHASE, ""), since)

    def file(self) -> str:
        return "".join(f"{k}\n" for k in self.keys)

    def annotations(self) -> dict[str, str]:
        return {ROTATION: self.rotation, PHASE: self.phase, SINCE: f"{self.since:.0f}"}


def initial(now: float, make_key: Callable[[], str] = new_key) -> KeyState:
    return KeyState((make_key(),), since=now)


def next_state(
    state: KeyState, requested: str, now: float, settle: float, make_key: Callable[[], str] = new_key
) -> KeyState | None:
    """The next step of a rotation, or None when there is nothing to do now. ``requested`` is the
    MidRegistrar's rotation annotation ("" when none)."""
    if not state.keys:
        return initial(now, make_key)
    if state.phase == "" and requested and requested != state.rotation:
        return KeyState((state.keys[0], make_key()), requested, "added", now)
    if now - state.since < settle:
        return None
    if state.phase == "added" and len(state.keys) >= 2:
        return KeyState((state.keys[1], state.keys[0]), state.rotation, "promoted", now)
    if state.phase == "promoted":
        return KeyState(state.keys[:1], state.rotation, "", now)
    return None
