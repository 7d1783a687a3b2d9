"""Registrar rules shared by every mode: AoR canonical form and lifetimes (behaviour §3.2, §3.3)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import quote, unquote

from registrar.config import Settings
from registrar.sip.fastinit import fast_frozen_init
from registrar.sip.headers import Contact, is_digits
from registrar.sip.uri import URI, SipURI, TelURI

MAX_AOR_LEN = 256
MAX_USERNAME_LEN = 64
MAX_DOMAIN_LEN = 64
MAX_CONTACT_LEN = 255


class RegistrarError(Exception):
    """A REGISTER is refused: ``status`` and the ``P-Registrar-Error`` text (behaviour §3.1, §3.5)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def canonical_aor(uri: URI, settings: Settings) -> str:
    """The AoR of a To URI: user %-unescaped, realm prefix stripped, host lower-cased
    (behaviour §3.2, T06)."""
    if isinstance(uri, TelURI):
        user, host = uri.number, ""
    elif isinstance(uri, SipURI):
        user, host = unquote(uri.user or ""), uri.host
    else:
        raise RegistrarError(400, "Bad AoR URI scheme")
    if not user:
        raise RegistrarError(400, "Missing AoR username")
    if len(user) > MAX_USERNAME_LEN or len(host) > MAX_DOMAIN_LEN:
        raise RegistrarError(500, "Address Of Record too long")
    if settings.use_domain and host:
        prefix = settings.realm_prefix
        # [REC] compare the prefix case-insensitively (T06).
        if prefix and len(host) > len(prefix) and host.lower().startswith(prefix.lower()):
            host = host[len(prefix) :]
        aor = f"{user}@{host.lower()}"
    else:
        aor = user
    if not settings.case_sensitive:
        aor = aor.lower()
    if len(aor) > MAX_AOR_LEN:
        raise RegistrarError(500, "Address Of Record too long")
    return aor


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class Lifetimes:
    requested: int  # e_req: what the UA asked (or the default)
    local: int  # e: clamped and randomised local lifetime
    outgoing: int  # what the relayed REGISTER carries


def requested_expires(contact: Contact, header: int | None, settings: Settings) -> int:
    """e_req: Contact ;expires, else the Expires header, else the default (behaviour §3.3)."""
    value = contact.expires
    if value:
        return int(value) if is_digits(value) else settings.default_expires
    if header is not None:
        return header
    return settings.default_expires


def clamp(e: int, settings: Settings) -> int:
    if e != 0 and settings.min_expires and e < settings.min_expires:
        e = settings.min_expires
    if e != 0 and settings.max_expires and e > settings.max_expires:
        e = settings.max_expires
    return e


def lifetimes(
    contact: Contact, header: int | None, settings: Settings, rng: random.Random | None = None
) -> Lifetimes:
    requested = requested_expires(contact, header, settings)
    local = clamp(requested, settings)
    if local and settings.expires_max_deviation and rng is not None:
        d = settings.expires_max_deviation
        local = clamp(max(1, local + rng.randint(-d, d)), settings)
    if settings.mode.value == "mirror":
        outgoing = requested
    else:
        outgoing = 0 if requested == 0 else settings.outgoing_expires
    return Lifetimes(requested, local, outgoing)


def escape_aor(aor: str, settings: Settings) -> str:
    """The user part of the aggregated contact (behaviour §6.1): %-escaped AoR, '@' as at_escape_str."""
    if not aor.isascii():
        raise RegistrarError(500, "AoR cannot be escaped into a contact")
    user, at, host = aor.partition("@")
    escaped = quote(user, safe="-_.!~*'()&=+$,;?/")
    if at and settings.use_domain:
        escaped += settings.at_escape_str + quote(host, safe="-_.!~*'()&=+$,;?/")
    return escaped


def aor_from_uri(uri: URI, settings: Settings) -> str | None:
    """The AoR an aggregated contact stands for: user part un-escaped (behaviour §9.2 step 1)."""
    if not isinstance(uri, SipURI) or not uri.user:
        return None
    user = uri.user
    if settings.at_escape_str != "%40" and settings.at_escape_str in user:
        head, _, tail = user.partition(settings.at_escape_str)
        user = f"{head}%40{tail}"
    aor = unquote(user)
    return aor if settings.case_sensitive else aor.lower()
