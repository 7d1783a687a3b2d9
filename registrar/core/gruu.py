"""GRUUs for registered instances (RFC 5627, behaviour §8.6): the mid-registrar owns the bindings, so it
issues them. Off unless enabled (OpenSIPS' ``disable_gruu`` defaults to on)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from registrar.config import Settings
from registrar.records import Binding
from registrar.sip.uri import URI, SipURI


@dataclass(frozen=True, slots=True)
class GruuContext:
    """What a 200 OK needs to add GRUUs: the AoR, our address, the clock."""

    aor: str
    hostport: str
    now: float


def _xor(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % len(key)] for i, b in enumerate(data))


def instance_id(instance: str) -> str:
    return instance.strip().strip("<>")


def pub_gruu(aor: str, instance: str, ctx: GruuContext, settings: Settings) -> str:
    base = aor if settings.use_domain and "@" in aor else f"{aor}@{ctx.hostport}"
    return f"sip:{base};gr={instance_id(instance)}"


def temp_gruu(aor: str, binding: Binding, ctx: GruuContext, settings: Settings) -> str:
    clear = f"{int(ctx.now)} {aor} {binding.instance} {binding.call_id}".encode()
    token = base64.urlsafe_b64encode(_xor(clear, settings.gruu_secret.encode())).decode().rstrip("=")
    return f"sip:tgruu.{token}@{ctx.hostport};gr"


def decode_temp_gruu(uri: URI, settings: Settings) -> tuple[str, str, str] | None:
    """(AoR, instance, Call-ID) a temporary GRUU stands for, or None."""
    if not isinstance(uri, SipURI) or not uri.user or not uri.user.startswith("tgruu."):
        return None
    token = uri.user[len("tgruu.") :]
    try:
        clear = _xor(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), settings.gruu_secret.encode())
        _, aor, instance, call_id = clear.decode().split(" ", 3)
    except (ValueError, UnicodeDecodeError):
        return None
    return aor, instance, call_id


def gruu_params(binding: Binding, ctx: GruuContext, settings: Settings) -> str:
    """`;pub-gruu=…;temp-gruu=…;+sip.instance=…` for a contact that registered an instance."""
    if not binding.instance:
        return ""
    return (
        f';pub-gruu="{pub_gruu(ctx.aor, binding.instance, ctx, settings)}"'
        f';temp-gruu="{temp_gruu(ctx.aor, binding, ctx, settings)}"'
        f';+sip.instance="{binding.instance}"'
    )
