"""SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966), with RFC 3261 §19.1.4 comparison.

URIs are immutable values: rewriting a Contact builds a new one with :meth:`SipURI.replace`.
Parameter names are kept as written (for serialization) and compared case-insensitively.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from registrar.sip.errors import SipError


class URIError(SipError):
    """The text is not a URI this engine can use."""


# RFC 3261 §25.1 character classes, as regex fragments.
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_HOSTNAME = r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*[A-Za-z](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.?"
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+\-.]*$")
_TEL_RE = re.compile(r"^[+]?[0-9A-Fa-f*#\-.()pPwW]+$")
_TEL_DIGITS = frozenset("0123456789abcdefABCDEF*#")


def _split_params(text: str, sep: str) -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    for part in text.split(sep):
        if not part:
            continue
        name, eq, value = part.partition("=")
        out.append((name, value if eq else None))
    return tuple(out)


@dataclass(slots=True)
class SipURI:
    """``sip:`` or ``sips:`` URI. ``params`` keep their order and spelling; look-ups ignore case.

    Treated as immutable (change one with :meth:`replace`); not frozen only because frozen dataclasses
    cost microseconds to build on the parse path.
    """

    scheme: str
    user: str | None
    host: str
    port: int | None = None
    password: str | None = None
    params: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str | None], ...] = ()
    _text: str | None = field(default=None, compare=False, repr=False)

    def param(self, name: str, default: str | None = None) -> str | None:
        lname = name.lower()
        for key, value in self.params:
            if key.lower() == lname:
                return value if value is not None else ""
        return default

    def has_param(self, name: str) -> bool:
        lname = name.lower()
        return any(key.lower() == lname for key, _ in self.params)

    def without_params(self, *names: str) -> SipURI:
        drop = {n.lower() for n in names}
        return self.replace(params=tuple(p for p in self.params if p[0].lower() not in drop))

    def replace(self, **changes: object) -> SipURI:
        changes.setdefault("_text", None)
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def transport(self) -> str:
        value = self.param("transport")
        if value:
            return value.lower()
        return "tls" if self.scheme == "sips" else "udp"

    def __str__(self) -> str:
        if self._text is not None:
            return self._text
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.hostport)
        for name, value in self.params:
            out += [";", name] if value is None else [";", name, "=", value]
        if self.headers:
            out.append("?")
            out.append("&".join(n if v is None else f"{n}={v}" for n, v in self.headers))
        return "".join(out)

    def equals(self, other: object) -> bool:
        """RFC 3261 §19.1.4 comparison.

        Scheme, host, parameter names and values compare case-insensitively, user and password
        case-sensitively; an escaped character equals its unescaped form unless it is reserved; a port,
        a transport, user, ttl, method or maddr parameter present in only one URI makes them differ (a
        default is not the same as an explicit value); other parameters count only when both URIs carry
        them; header components must all match.
        """
        if not isinstance(other, SipURI):
            return False
        if self.scheme.lower() != other.scheme.lower() or self.port != other.port:
            return False
        if _canon(self.user) != _canon(other.user) or _canon(self.password) != _canon(other.password):
            return False
        if _canon_host(self.host) != _canon_host(other.host):
            return False
        mine = _canon_params(self.params)
        theirs = _canon_params(other.params)
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                return False
        for name in _MUST_MATCH:
            if (name in mine) != (name in theirs):
                return False
        return _canon_headers(self.headers) == _canon_headers(other.headers)


@dataclass(slots=True)
class TelURI:
    """``tel:`` URI (RFC 3966), enough to carry it through and compare it."""

    number: str
    params: tuple[tuple[str, str | None], ...] = ()
    scheme: str = "tel"

    def __str__(self) -> str:
        return "tel:" + self.number + "".join(f";{n}" if v is None else f";{n}={v}" for n, v in self.params)

    def equals(self, other: object) -> bool:
        if not isinstance(other, TelURI):
            return False
        return _tel_digits(self.number) == _tel_digits(other.number) and _tel_params(
            self.params
        ) == _tel_params(other.params)

    def param(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.params:
            if key.lower() == name.lower():
                return value if value is not None else ""
        return default


_VISUAL = str.maketrans("", "", "-.()")


def _tel_digits(number: str) -> str:
    """RFC 3966 §4: visual separators do not count and hex digits are case-insensitive."""
    return number.translate(_VISUAL).lower()


def _tel_params(params: tuple[tuple[str, str | None], ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, value in params:
        key = name.lower()
        if value is not None and key == "phone-context":
            value = _tel_digits(value) if value.startswith("+") else value.lower()
        elif value is not None:
            value = value.lower()
        out[key] = value
    return out


@dataclass(slots=True)
class AbsoluteURI:
    """Any other scheme (``mailto:``, ``http:``, ``urn:``): carried as text."""

    scheme: str
    text: str

    def __str__(self) -> str:
        return self.text

    def equals(self, other: object) -> bool:
        return isinstance(other, AbsoluteURI) and self.text == other.text

    def param(self, name: str, default: str | None = None) -> str | None:
        return default


URI = SipURI | TelURI | AbsoluteURI


_RESERVED = frozenset(";/?:@&=+$,")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_MUST_MATCH = ("user", "ttl", "method", "maddr", "transport")


def _unescape_one(m: re.Match[str]) -> str:
    char = chr(int(m.group(1), 16))
    # RFC 3261 §19.1.4: only characters outside the reserved set equal their escaped form; "%" itself
    # stays escaped so that a decoded "%41" can never pass for an escape.
    return "%" + m.group(1).upper() if char in _RESERVED or char == "%" else char


def _canon(value: str | None) -> str | None:
    """The form in which two URI components compare: unreserved escapes decoded, the rest upper-cased."""
    if value is None or "%" not in value:
        return value
    return _ESCAPE.sub(_unescape_one, value)


def _canon_host(host: str) -> str:
    if host.startswith("["):
        try:
            return "[" + ipaddress.IPv6Address(host[1:-1]).compressed + "]"
        except ValueError:
            pass
    return host.lower()


def _canon_params(params: tuple[tuple[str, str | None], ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, value in params:
        key = (_canon(name) or "").lower()
        out[key] = None if value is None else (_canon(value) or "").lower()
    return out


def _canon_headers(headers: tuple[tuple[str, str | None], ...]) -> dict[str, str | None]:
    return {(_canon(name) or "").lower(): _canon(value) for name, value in headers}


def parse_uri(text: str) -> URI:
    """Parse a URI; raise :class:`URIError` with the reason."""
    scheme, colon, rest = text.partition(":")
    lscheme = scheme.lower()
    if not colon or (lscheme not in ("sip", "sips") and not _SCHEME_RE.match(scheme)):
        raise URIError(f"no scheme in URI {text!r}")
    if lscheme in ("sip", "sips"):
        return _parse_sip(lscheme, rest, text)
    if lscheme == "tel":
        number, _, ptext = rest.partition(";")
        if not _TEL_RE.match(number) or not any(c in _TEL_DIGITS for c in number):
            raise URIError(f"bad telephone number in {text!r}")
        return TelURI(number=number, params=_split_params(ptext, ";"))
    if not rest or any(c in rest for c in ' \t<>"') or any(ord(c) < 33 for c in rest):
        raise URIError(f"bad URI {text!r}")
    return AbsoluteURI(scheme=lscheme, text=text)


# Runs of plain characters are matched possessively (``[…]++``): none of them can be the ':', '@', ';', '=' or
# '?' that ends a part, so giving characters back could never help; it only made a miss cost more.
_SIP_MATCH = re.compile(
    rf"(?:(?P<user>(?:[{_UNRESERVED}&=+$,;?/]++|%[0-9A-Fa-f]{{2}})++)"
    rf"(?::(?P<password>(?:[{_UNRESERVED}&=+$,]++|%[0-9A-Fa-f]{{2}})*+))?@)?"
    rf"(?P<host>\[[0-9A-Fa-f:.]+\]|{_IPV4}|{_HOSTNAME})(?::(?P<port>[0-9]{{1,5}}))?"
    rf"(?P<params>(?:;(?:[{_UNRESERVED}\[\]/:&+$]++|%[0-9A-Fa-f]{{2}})++"
    rf"(?:=(?:[{_UNRESERVED}\[\]/:&+$]++|%[0-9A-Fa-f]{{2}})*+)?)*+)"
    r"(?:\?(?P<headers>[^\s]*))?\Z"
).match


def _parse_sip(scheme: str, rest: str, text: str) -> SipURI:
    m = _SIP_MATCH(rest)
    if m is None:
        hostport = rest.rpartition("@")[2].partition(";")[0].partition("?")[0]
        if hostport.count(":") > 1 and "[" not in hostport:
            # Say why (RFC 5118 §4.2): a bare IPv6 address is ambiguous with the port, so it needs brackets.
            raise URIError(f"IPv6 address not enclosed in [] in {text!r}")
        raise URIError(f"bad SIP URI {text!r}")
    user, password, host, port_text, ptext, htext = m.groups()
    if host[0] == "[" and not _valid_ipv6_reference(host):
        raise URIError(f"bad IPv6 reference in {text!r}")
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise URIError(f"bad port in {text!r}")
    return SipURI(
        scheme,
        user,
        host,
        port,
        password,
        _split_params(ptext, ";") if ptext else (),
        _split_params(htext, "&") if htext else (),
        scheme + ":" + rest,
    )


def _valid_ipv6_reference(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True
