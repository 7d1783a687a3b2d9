"""Typed views of the header fields the engine reads: name-addr, Via, CSeq, Contact.

The message keeps header values as text (so unchanged headers serialize byte-for-byte); these functions
turn a value into a typed, immutable object and back. They raise :class:`ParseError` on bad syntax.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, replace

from registrar.sip.errors import ParseError
from registrar.sip.uri import URI, URIError, parse_uri

MAGIC_COOKIE = "z9hG4bK"
# Methods in common use: tokens by definition, so the token check can be skipped for them.
KNOWN_METHODS = frozenset(
    {
        "REGISTER",
        "INVITE",
        "ACK",
        "CANCEL",
        "BYE",
        "OPTIONS",
        "MESSAGE",
        "SUBSCRIBE",
        "NOTIFY",
        "REFER",
        "INFO",
        "UPDATE",
        "PRACK",
        "PUBLISH",
    }
)

Params = tuple[tuple[str, str | None], ...]


_TOKEN_MATCH = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z").match
_DISPLAY_MATCH = re.compile(r"[A-Za-z0-9\-.!%*_+`'~ \t]*\Z").match


def is_token(text: str) -> bool:
    return _TOKEN_MATCH(text) is not None


_INT_DIGITS = sys.get_int_max_str_digits() or 4300


def is_digits(text: str) -> bool:
    """``1*DIGIT`` as RFC 3261 means it, within what ``int()`` converts: ASCII digits only (``str.isdigit``
    alone takes '²', on which ``int`` raises, or '٣', which no SIP peer means), at most 4300 of them (past
    that ``int`` raises, and the conversion is quadratic)."""
    return text.isdigit() and text.isascii() and len(text) <= _INT_DIGITS


def split_commas(value: str) -> list[str]:
    """Split a header value on commas that are outside quotes and angle brackets."""
    if "," not in value:
        return [value.strip()] if value.strip() else []
    if '"' not in value and "<" not in value:  # nothing to skip over: every comma separates (Allow, Via)
        return [part for part in (p.strip() for p in value.split(",")) if part]
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
# One parameter, matched where the previous one ended; every run possessive (``*+``). A search (finditer) from
# each position of a run of blanks took quadratic time (0.8 s for a 30 KB Via; found by tests/fuzz).
_PARAM_MATCH = re.compile(
    r"[ \t]*+;[ \t]*+([A-Za-z0-9\-.!%*_+`\'~]++)"
    r'(?:[ \t]*+=[ \t]*+("(?:[^"\\]++|\\.)*+"|[A-Za-z0-9\-.!%*_+`\'~\[\]:]*+))?[ \t]*+'
).match
# The usual case, ``rport;branch=z9hG4bK-1`` or ``+sip.instance="<urn:uuid:1>";expires=60``: no whitespace,
# no ';' or '\\' inside quotes. One capture-free regex checks it all and str.split takes it apart, twice as
# fast as matching every parameter with groups.
_SIMPLE_VALUE = r"""(?:[A-Za-z0-9\-.!%*_+`'~\[\]:]*+|"[^"\\;]*+")"""
_SIMPLE_PARAMS_MATCH = re.compile(
    rf"{_TOKEN}+(?:={_SIMPLE_VALUE})?+(?:;{_TOKEN}+(?:={_SIMPLE_VALUE})?+)*+\Z"
).match


def parse_params(text: str, where: str) -> Params:
    """Parse ``a=b;c;d="q"`` (the text after the first ';'; empty gives no params)."""
    if not text:
        return ()
    if " " not in text and "\t" not in text and _SIMPLE_PARAMS_MATCH(text) is not None:
        out: list[tuple[str, str | None]] = []
        for part in text.split(";"):
            name, eq, value = part.partition("=")
            out.append((name, value if eq else None))
        return tuple(out)
    text = ";" + text
    pos = 0
    out = []
    end = len(text)
    while pos < end:
        m = _PARAM_MATCH(text, pos)
        if m is None:
            break
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    if pos != len(text):
        if text[pos] == ";" and text[pos + 1 :].lstrip(" \t")[:1] in ("", ";", ","):
            raise ParseError(f"empty {where} parameter")
        raise ParseError(f"bad {where} parameters {text[1:60]!r}")
    return tuple(out)


def _end_of_quoted(text: str, start: int) -> int:
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i
        i += 1
    return -1


def get_param(params: Params, name: str) -> str | None:
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return "" if value is None else value
    return None


def set_param(params: Params, name: str, value: str | None) -> Params:
    lname = name.lower()
    out = [(k, value) if k.lower() == lname else (k, v) for k, v in params]
    if not any(k.lower() == lname for k, _ in params):
        out.append((name, value))
    return tuple(out)


def drop_params(params: Params, *names: str) -> Params:
    drop = {n.lower() for n in names}
    return tuple((k, v) for k, v in params if k.lower() not in drop)


def format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def unquote(value: str | None) -> str | None:
    if value is None or len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    if "\\" not in value:
        return value[1:-1]
    out = []
    i = 1
    while i < len(value) - 1:
        c = value[i]
        if c == "\\" and i + 1 < len(value) - 1:
            i += 1
            c = value[i]
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(slots=True)
class Address:
    """A name-addr or addr-spec with its header parameters (From, To, Contact, Route, Path…)."""

    uri: URI
    display: str | None = None
    params: Params = ()

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    def with_param(self, name: str, value: str | None) -> Address:
        return replace(self, params=set_param(self.params, name, value))

    def without_params(self, *names: str) -> Address:
        return replace(self, params=drop_params(self.params, *names))

    def __str__(self) -> str:
        head = f"{self.display} " if self.display else ""
        return f"{head}<{self.uri}>{format_params(self.params)}"


# ``[display] <uri> rest``: the display name a quoted string (group 1, kept with its quotes) or tokens and
# blanks (group 2, stripped). Every run is possessive (``*+``): with backtracking, the lazy display name
# followed by blanks took quadratic time over a run of blanks (2.4 s for a 60 KB From; found by tests/fuzz).
_NAME_ADDR_MATCH = re.compile(
    r'[ \t]*+(?:("(?:[^"\\]++|\\.)*+")[ \t]*+|([A-Za-z0-9\-.!%*_+`\'~ \t]*+))<([^<>]*+)>[ \t]*+(.*)\Z', re.S
).match


def parse_address(value: str, where: str = "address") -> Address:
    """Parse name-addr / addr-spec followed by header params (RFC 3261 §20.10, §25.1)."""
    if "<" in value:
        end = value.find(">") if value[0] == "<" else -1
        if end > 0 and "<" not in value[1:end]:  # ``<uri>;params`` without a display name: no regex needed
            display, uri_text, rest = None, value[1:end], value[end + 1 :].lstrip(" \t")
        else:
            m = _NAME_ADDR_MATCH(value)
            if m is None:
                if value.lstrip().startswith('"') and _end_of_quoted(value.lstrip(), 0) < 0:
                    raise ParseError(f"unterminated quoted display name in {where}")
                raise ParseError(f"bad name-addr in {where}: display name must be tokens or a quoted string")
            quoted, tokens, uri_text, rest = m.groups()
            display = quoted or (tokens.strip(" \t") if tokens else None) or None
        if uri_text != uri_text.strip(" \t"):
            raise ParseError(f"whitespace inside <> around the URI in {where}")
        if rest and rest[0] != ";":
            raise ParseError(f"junk after URI in {where}")
        params = parse_params(rest[1:], where) if rest else ()
    else:
        uri_text, _, ptext = value.strip().partition(";")
        uri_text = uri_text.rstrip()
        if not uri_text or any(c in uri_text for c in ' \t,?>"') or uri_text.startswith('"'):
            raise ParseError(f"{where} URI with spaces, commas or headers must be enclosed in <>")
        params = parse_params(ptext, where)
        display = None
    try:
        uri = parse_uri(uri_text)
    except URIError as exc:
        raise ParseError(f"bad URI in {where}: {exc}") from None
    return Address(uri, display, params)


@dataclass(slots=True)
class Via:
    """One Via value (RFC 3261 §20.42), with RFC 3581 rport."""

    transport: str
    host: str
    port: int | None = None
    params: Params = ()
    protocol: str = "SIP/2.0"

    @property
    def branch(self) -> str | None:
        return get_param(self.params, "branch")

    @property
    def received(self) -> str | None:
        return get_param(self.params, "received")

    @property
    def rport(self) -> str | None:
        """None when absent, '' when requested without a value, else the port text."""
        return get_param(self.params, "rport")

    def __str__(self) -> str:
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"{self.protocol}/{self.transport} {hostport}{format_params(self.params)}"


_VIA_MATCH = re.compile(
    rf"[ \t]*({_TOKEN})[ \t]*/[ \t]*({_TOKEN})[ \t]*/[ \t]*({_TOKEN})[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*(;.*)?\Z",
    re.S,
).match


def parse_via(value: str) -> Via:
    m = _VIA_MATCH(value)
    if m is None:
        raise ParseError("bad Via: expected 'SIP/2.0/<transport> <host>[:port][;params]'")
    name, version, transport, host, port_text, ptext = m.groups()
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise ParseError("bad port in Via")
    if host[0] == "[" and not _valid_ipv6(host[1:-1]):
        raise ParseError("bad IPv6 reference in Via")
    params = parse_params(ptext[1:], "Via") if ptext else ()
    return Via(transport.upper(), host, port, params, f"{name}/{version}")


def parse_via_sent_by(value: str) -> Via:
    """Parse a Via whose parameters may be malformed, keeping only the parameters that parse.

    For routing a 400 back to the sender of a request whose top Via has broken parameters (RFC 4475
    §3.1.2.1): the sent-protocol and sent-by must still parse, or :class:`ParseError` is raised.
    """
    head, semi, ptext = value.partition(";")
    via = parse_via(head)
    if not semi:
        return via
    kept: list[tuple[str, str | None]] = []
    for part in ptext.split(";"):
        if part.strip(" \t"):
            try:
                kept.extend(parse_params(part, "Via"))
            except ParseError:
                continue
    return replace(via, params=tuple(kept))


def _valid_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class CSeq:
    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_cseq(value: str) -> CSeq:
    num, _, method = value.strip().partition(" ")
    method = method.strip()
    if not is_digits(num) or (method not in KNOWN_METHODS and not is_token(method)):
        raise ParseError("bad CSeq")
    seq = int(num)
    if seq > 2**31 - 1:
        raise ParseError("CSeq number too large")
    return CSeq(seq, method)


@dataclass(slots=True)
class Contact:
    """A Contact value; ``star`` for ``Contact: *``."""

    address: Address | None

    @property
    def star(self) -> bool:
        return self.address is None

    @property
    def uri(self) -> URI:
        if self.address is None:
            raise ValueError("Contact: * has no URI")
        return self.address.uri

    def param(self, name: str) -> str | None:
        return None if self.address is None else self.address.param(name)

    @property
    def expires(self) -> str | None:
        return self.param("expires")

    @property
    def q(self) -> float | None:
        text = self.param("q")
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            return None
        return min(max(value, 0.0), 1.0)

    @property
    def instance(self) -> str | None:
        return unquote(self.param("+sip.instance"))

    @property
    def reg_id(self) -> str | None:
        return self.param("reg-id")


def parse_contacts(values: list[str]) -> list[Contact]:
    """Parse all Contact values of a message (already split on commas)."""
    out: list[Contact] = []
    for value in values:
        if value.strip() == "*":
            out.append(Contact(None))
        else:
            out.append(Contact(parse_address(value, "Contact")))
    return out
