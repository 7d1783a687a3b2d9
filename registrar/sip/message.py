"""SIP message model, parser and serializer (RFC 3261 §7, §18.3, §20).

Header fields keep their original line: a message that is parsed and serialized again without changes to a
header gives back that header byte-for-byte. Only changed, added or removed fields are rewritten.
Text is decoded as UTF-8 with ``surrogateescape`` so that any byte sequence survives the round trip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TypeVar, cast

from registrar.sip.errors import ParseError
from registrar.sip.headers import (
    _TOKEN_MATCH,
    KNOWN_METHODS,
    Address,
    Contact,
    CSeq,
    Via,
    is_digits,
    parse_address,
    parse_contacts,
    parse_cseq,
    parse_via,
    parse_via_sent_by,
    split_commas,
)
from registrar.sip.uri import URI, SipURI, URIError, parse_uri

COMPACT = {
    "i": "call-id",
    "m": "contact",
    "f": "from",
    "t": "to",
    "v": "via",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "y": "identity",
}

_COMPACT_GET = COMPACT.get
_T = TypeVar("_T")

# Header fields whose value is a comma-separated list (RFC 3261 §7.3.1). Authorization-style fields are not.
LIST_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "path",
        "service-route",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "allow-events",
        "content-encoding",
        "in-reply-to",
        "alert-info",
        "call-info",
        "error-info",
    }
)
SINGLE_HEADERS = frozenset({"to", "from", "call-id", "cseq", "max-forwards", "content-length"})

MAX_MESSAGE = 65535
SIP_VERSION = "SIP/2.0"
REASONS = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    423: "Interval Too Brief",
    429: "Too Many Requests",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    487: "Request Terminated",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
}


def _slow_key(name: str) -> str:
    key = name.lower()
    return _COMPACT_GET(key, key)


# Spellings of the common header names, as written on the wire and as the code asks for them, mapped to their
# key: one dict look-up instead of lower() + compact expansion on every parsed line and every get().
_COMMON_NAMES = (
    "Via",
    "From",
    "To",
    "Call-ID",
    "Call-Id",
    "CSeq",
    "Contact",
    "Max-Forwards",
    "Content-Length",
    "Content-Type",
    "Expires",
    "User-Agent",
    "Server",
    "Allow",
    "Supported",
    "Require",
    "Route",
    "Record-Route",
    "Path",
    "Authorization",
    "WWW-Authenticate",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "Date",
    "Event",
    "Allow-Events",
    "Accept",
    "Min-Expires",
    "Retry-After",
    "Warning",
    "Unsupported",
    "Service-Route",
    "Timestamp",
    "Organization",
    "Subject",
)
_KEY_OF = {spelling: _slow_key(spelling) for name in _COMMON_NAMES for spelling in (name, name.lower())}
_KEY_OF |= COMPACT
_KEY_GET = _KEY_OF.get


def header_key(name: str) -> str:
    """Canonical look-up key of a header name: lower-case, compact form expanded."""
    return _KEY_GET(name) or _slow_key(name)


class Header:
    """One header line, immutable: ``raw`` is the original text (folding included), ``None`` once rewritten.

    Never change a Header in place; put a new one in its place. That lets copies of a message share their
    Header objects, and lets each one keep the typed view parsed from its value (:meth:`parsed`), which can
    then never go stale.
    """

    __slots__ = ("_parsed", "key", "name", "raw", "value")

    def __init__(self, name: str, value: str, raw: str | None = None, key: str | None = None) -> None:
        self.name = name
        self.key = key or header_key(name)
        self.value = value
        self.raw = raw
        self._parsed: tuple[Callable[[str], object], object] | None = None

    def parsed(self, parse: Callable[[str], _T]) -> _T:
        """``parse(value)``, computed once per Header (failures are not kept: they raise every time)."""
        hit = self._parsed
        if hit is not None and hit[0] is parse:
            return cast(_T, hit[1])
        result = parse(self.value)
        self._parsed = (parse, result)
        return result

    def line(self) -> str:
        return self.raw if self.raw is not None else f"{self.name}: {self.value}"

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {self.value!r})"


def typed_header(name: str, value: str, parse: Callable[[str], _T], result: _T) -> Header:
    """A new header whose typed view is already known (a Via we built): it is not parsed back from text."""
    header = Header(name, value)
    header._parsed = (parse, result)
    return header


def parse_via_list(value: str) -> list[Via]:
    """The Via values of one header line."""
    value = value.strip()
    if "," not in value:  # one value, the usual case
        return [parse_via(value)] if value else []
    return [parse_via(v) for v in split_commas(value)]


def _parse_contact_list(value: str) -> list[Contact]:
    return parse_contacts(split_commas(value))


def _parse_from(value: str) -> Address:
    return parse_address(value, "From")


def _parse_to(value: str) -> Address:
    return parse_address(value, "To")


class Headers:
    """Ordered, multi-valued, case-insensitive header fields."""

    __slots__ = ("_items",)

    def __init__(self, items: list[Header] | None = None) -> None:
        self._items: list[Header] = items if items is not None else []

    def __iter__(self) -> Iterator[Header]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        key = header_key(name)
        return any(h.key == key for h in self._items)

    def get(self, name: str) -> str | None:
        key = _KEY_GET(name) or _slow_key(name)
        for h in self._items:
            if h.key == key:
                return h.value
        return None

    def count(self, name: str) -> int:
        key = header_key(name)
        return sum(1 for h in self._items if h.key == key)

    def fields(self, name: str) -> list[str]:
        """The value of every header line of that name, unsplit."""
        key = header_key(name)
        return [h.value for h in self._items if h.key == key]

    def values(self, name: str) -> list[str]:
        """All values of that name, list headers split on commas (RFC 3261 §7.3.1)."""
        key = header_key(name)
        out: list[str] = []
        for h in self._items:
            if h.key == key:
                if key in LIST_HEADERS:
                    out.extend(split_commas(h.value))
                else:
                    out.append(h.value)
        return out

    def set(self, name: str, value: str) -> None:
        """Replace every line of that name by one (in place of the first), or append it."""
        key = header_key(name)
        for i, h in enumerate(self._items):
            if h.key == key:
                self._items[i] = Header(name, value, key=key)
                self._items[i + 1 :] = [x for x in self._items[i + 1 :] if x.key != key]
                return
        self._items.append(Header(name, value, key=key))

    def add(self, name: str, value: str) -> None:
        """Append a line after the last line of that name (or at the end)."""
        key = header_key(name)
        last = -1
        for i, h in enumerate(self._items):
            if h.key == key:
                last = i
        header = Header(name, value, key=key)
        if last < 0:
            self._items.append(header)
        else:
            self._items.insert(last + 1, header)

    def prepend(self, name: str, value: str) -> None:
        """Insert a line before the first of that name (Via, Record-Route, Route), or at the top."""
        self.prepend_header(Header(name, value))

    def prepend_header(self, header: Header) -> None:
        """:meth:`prepend` for a ready-made line (one built with :func:`typed_header`)."""
        key = header.key
        for i, h in enumerate(self._items):
            if h.key == key:
                self._items.insert(i, header)
                return
        self._items.insert(0, header)

    def remove(self, name: str) -> int:
        key = header_key(name)
        before = len(self._items)
        self._items = [h for h in self._items if h.key != key]
        return before - len(self._items)

    def pop_first_value(self, name: str) -> str | None:
        """Remove and return the first value of a list header (the top Via, the first Route)."""
        key = header_key(name)
        for i, h in enumerate(self._items):
            if h.key == key:
                parts = split_commas(h.value)
                if len(parts) <= 1:
                    del self._items[i]
                    return parts[0] if parts else None
                self._items[i] = Header(h.name, ", ".join(parts[1:]), key=key)
                return parts[0]
        return None

    def first(self, name: str) -> Header | None:
        """The first line of that name."""
        key = _KEY_GET(name) or _slow_key(name)
        for h in self._items:
            if h.key == key:
                return h
        return None

    def replace(self, old: Header, new: Header) -> None:
        """Put ``new`` where ``old`` is (the way to change a line: Header objects are never edited)."""
        for i, h in enumerate(self._items):
            if h is old:
                self._items[i] = new
                return
        raise ValueError("no such header line")

    def copy(self) -> Headers:
        """A new list of the same (immutable) Header objects: editing either list leaves the other alone."""
        return Headers(self._items.copy())


class Message:
    """Common part of requests and responses.

    Typed views (``to``, ``vias``, ``contacts``…) are parsed on first use and kept by the Header they come
    from (see :meth:`Header.parsed`), so editing a header can never leave a stale parsed value behind, and
    copies of a message share what was already parsed. The typed values are shared too: treat them as
    immutable.
    """

    __slots__ = ("body", "headers", "version")

    def __init__(self, headers: Headers | None = None, body: bytes = b"", version: str = SIP_VERSION) -> None:
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.version = version

    def _typed_list(self, key: str, parse: Callable[[str], list[_T]]) -> list[_T]:
        out: list[_T] = []
        for h in self.headers:
            if h.key == key:
                out += h.parsed(parse)
        return out

    @property
    def call_id(self) -> str:
        value = self.headers.get("call-id")
        if not value:
            raise ParseError("missing Call-ID")
        return value

    @property
    def cseq(self) -> CSeq:
        header = self.headers.first("cseq")
        if header is None:
            raise ParseError("missing CSeq")
        return header.parsed(parse_cseq)

    @property
    def from_(self) -> Address:
        header = self.headers.first("from")
        if header is None:
            raise ParseError("missing From")
        return header.parsed(_parse_from)

    @property
    def to(self) -> Address:
        header = self.headers.first("to")
        if header is None:
            raise ParseError("missing To")
        return header.parsed(_parse_to)

    @property
    def vias(self) -> list[Via]:
        return self._typed_list("via", parse_via_list)

    @property
    def top_via(self) -> Via:
        vias = self.vias
        if not vias:
            raise ParseError("missing Via")
        return vias[0]

    @property
    def contacts(self) -> list[Contact]:
        return self._typed_list("contact", _parse_contact_list)

    def addresses(self, name: str) -> list[Address]:
        """Route, Record-Route, Path values as addresses."""
        return [parse_address(v, name) for v in self.headers.values(name)]

    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self, *, stream: bool = False) -> bytes:
        """Serialize. Content-Length is corrected when present and always written for stream transports."""
        length = len(self.body)
        lines = [self.start_line()]
        have_length = False
        for h in self.headers:
            if h.key == "content-length":
                have_length = True
                if h.value != str(length):
                    lines.append(f"{h.name}: {length}")
                    continue
            lines.append(h.raw if h.raw is not None else f"{h.name}: {h.value}")
        if not have_length and (stream or length):
            lines.append(f"Content-Length: {length}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body


class Request(Message):
    """A request. The Request-URI text is kept as received and parsed on first use of :attr:`uri`."""

    __slots__ = ("_uri", "_uri_text", "method")

    def __init__(
        self,
        method: str,
        uri: URI | str,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body, version)
        self.method = method
        self._uri: URI | None = None if isinstance(uri, str) else uri
        self._uri_text = uri if isinstance(uri, str) else None

    @property
    def uri(self) -> URI:
        if self._uri is None:
            assert self._uri_text is not None
            try:
                self._uri = parse_uri(self._uri_text)
            except URIError as exc:
                raise ParseError(f"bad Request-URI: {exc}") from None
        return self._uri

    @uri.setter
    def uri(self, value: URI) -> None:
        self._uri = value
        self._uri_text = None

    @property
    def uri_text(self) -> str:
        """The Request-URI as it is written in the start line (as received until :attr:`uri` is set)."""
        return self._uri_text if self._uri_text is not None else str(self._uri)

    def start_line(self) -> str:
        return f"{self.method} {self.uri_text} {self.version}"

    def copy(self) -> Request:
        req = Request(self.method, self._uri_text or self.uri, self.headers.copy(), self.body, self.version)
        req._uri = self._uri
        return req

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("max-forwards")
        return None if value is None else int(value)

    def __repr__(self) -> str:
        return f"<Request {self.start_line()!r}>"


class Response(Message):
    __slots__ = ("reason", "status")

    def __init__(
        self,
        status: int,
        reason: str = "",
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body, version)
        self.status = status
        self.reason = reason or REASONS.get(status, "")

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def copy(self) -> Response:
        return Response(self.status, self.reason, self.headers.copy(), self.body, self.version)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason!r}>"


def _split_head(data: bytes) -> tuple[str, bytes]:
    idx = data.find(b"\r\n\r\n")
    if idx >= 0:
        return data[:idx].decode("utf-8", "surrogateescape"), data[idx + 4 :]
    idx = data.find(b"\n\n")
    if idx >= 0:  # bare-LF senders: tolerated
        return data[:idx].decode("utf-8", "surrogateescape").replace("\r\n", "\n"), data[idx + 2 :]
    raise ParseError("no empty line after the header fields", can_reply=False)


def parse_message(data: bytes, *, stream: bool = False) -> Request | Response:
    """Parse one datagram (or one framed stream message) and check its framing and mandatory fields.

    Raises :class:`ParseError`; ``can_reply`` tells whether a 400 can be routed back, and ``message`` carries
    the partly parsed message once the header fields are split. Header fields that are not needed to route
    or match the message (From/To/Contact/Request-URI syntax) are checked on first use, or all at once by
    :func:`check_fields`.
    """
    if len(data) > MAX_MESSAGE:
        raise ParseError("message too large", status=513, can_reply=False)
    head, rest = _split_head(data.lstrip(b"\r\n"))
    sep = "\r\n" if "\r\n" in head else "\n"
    lines = head.split(sep)
    items: list[Header] = []
    append = items.append
    folded = "\n " in head or "\n\t" in head
    seen: dict[str, str] = {}  # the first value of each field _validate() checks
    duplicate: str | None = None
    for line in _unfold(lines[1:], sep) if folded else lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            if not line:
                continue
            raise ParseError(f"header line without a colon: {line[:40]!r}", can_reply=False)
        key = _KEY_GET(name)
        if key is None:  # not one of the common spellings: check and normalise it
            name = name.rstrip(" \t")
            if _TOKEN_MATCH(name) is None:
                raise ParseError(f"bad header name {name[:40]!r}", can_reply=False)
            key = _slow_key(name)
        value = value.strip(" \t\r\n")
        if folded and "\n" in value:
            value = _unfold_value(value)
        append(Header(name, value, line, key))
        if key in _CHECKED:
            if key not in seen:
                seen[key] = value
            elif duplicate is None and key in SINGLE_HEADERS:
                duplicate = key
    headers = Headers(items)
    start = lines[0]
    msg: Request | Response
    try:
        msg = (
            _parse_status_line(start, headers)
            if start.startswith("SIP/")
            else _parse_request_line(start, headers)
        )
    except ParseError as exc:
        if exc.can_reply and not start.startswith("SIP/"):
            method = start.partition(" ")[0]
            exc.message = Request(method if _TOKEN_MATCH(method) else "UNKNOWN", "sip:invalid", headers)
            exc.can_reply = method != "ACK" and _routable(headers)
        raise
    try:
        _validate(msg, seen, duplicate)
        msg.body = _body(seen.get("content-length"), rest, stream)
    except ParseError as exc:
        _blame(exc, msg)
        raise
    return msg


def _unfold_value(value: str) -> str:
    """Each line fold, ``[ \\t]*\\r?\\n[ \\t]+``, replaced by one SP (RFC 3261 §7.3.1), in linear time (the
    regex, searched over a run of blanks, took quadratic time: 18 s for a 60 KB one; found by tests/fuzz)."""
    pieces = value.split("\n")
    out: list[str] = []
    current = [pieces[0]]
    for piece in pieces[1:]:
        rest = piece.lstrip(" \t")
        if len(rest) == len(piece):  # no blank after this line break: not a fold
            current.append(piece)
            continue
        before = "\n".join(current)
        out.append((before[:-1] if before.endswith("\r") else before).rstrip(" \t"))
        current = [rest]
    out.append("\n".join(current))
    return " ".join(out)


def _blame(exc: ParseError, msg: Request | Response) -> None:
    """Attach the message to an error about it; no reply can go to a response or an ACK."""
    if exc.message is None:
        exc.message = msg
    if not isinstance(msg, Request) or msg.method == "ACK":
        exc.can_reply = False


def _routable(headers: Headers) -> bool:
    """Whether the top Via names a sent-by a response could be sent to (parameters may be broken)."""
    fields = headers.fields("via")
    if not fields:
        return False
    values = split_commas(fields[0])
    if not values:
        return False
    try:
        parse_via_sent_by(values[0])
    except ParseError:
        return False
    return True


def _unfold(lines: list[str], sep: str) -> list[str]:
    """Join continuation lines onto their header line, keeping the fold in the raw text."""
    fields: list[list[str]] = []  # each field's lines, joined once at the end (linear in the lines' count)
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not fields:
                raise ParseError("continuation line before any header field", can_reply=False)
            fields[-1].append(line)
        else:
            fields.append([line])
    return [sep.join(parts) if len(parts) > 1 else parts[0] for parts in fields]


def _parse_status_line(start: str, headers: Headers) -> Response:
    parts = start.split(" ", 2)
    if len(parts) < 2 or parts[0] != SIP_VERSION:
        raise ParseError(
            "bad Status-Line: expected 'SIP/2.0 SP Status-Code SP Reason-Phrase'", can_reply=False
        )
    code = parts[1]
    if len(code) != 3 or not is_digits(code) or not 100 <= int(code) <= 699:
        raise ParseError(f"bad Status-Code {code[:20]!r}: expected three digits 100-699", can_reply=False)
    response = Response(int(code), "", headers)
    response.reason = parts[2] if len(parts) > 2 else ""  # kept as received, even when empty
    return response


def _parse_request_line(start: str, headers: Headers) -> Request:
    parts = start.split(" ")
    if len(parts) != 3 or not all(parts):
        if start != start.rstrip(" \t"):
            raise ParseError("whitespace at the end of the Request-Line")
        if "  " in start or "\t" in start:
            raise ParseError("Request-Line elements must be separated by a single SP")
        if len(parts) > 3 and parts[-1].startswith("SIP/") and all(parts):
            raise ParseError("Request-URI contains whitespace")
        raise ParseError("bad Request-Line: expected 'METHOD SP Request-URI SP SIP/2.0'")
    method, uri_text, version = parts
    if method not in KNOWN_METHODS and _TOKEN_MATCH(method) is None:
        raise ParseError("bad method")
    if version != SIP_VERSION:
        if version.upper() == SIP_VERSION:
            pass
        elif version.upper().startswith("SIP/"):
            raise ParseError(f"SIP version {version[:20]!r} not supported", status=505)
        else:
            raise ParseError("bad Request-Line version")
    if uri_text[0] == "<":
        raise ParseError("Request-URI must not be enclosed in <>")
    return Request(method, uri_text, headers)


def _body(value: str | None, rest: bytes, stream: bool) -> bytes:
    """The body after the head, cut to ``value``, the first Content-Length (None when there is none)."""
    if value is None:
        if stream and rest:
            raise ParseError("Content-Length is required on a stream transport")
        return rest
    if not is_digits(value):
        if value[:1] == "-" and is_digits(value[1:]):
            raise ParseError(f"bad Content-Length {value[:20]!r}: negative")
        raise ParseError(f"bad Content-Length {value[:20]!r}: not a decimal number")
    length = int(value)
    if length > MAX_MESSAGE:
        raise ParseError("Content-Length too large", status=513)
    if length > len(rest):
        raise ParseError("Content-Length larger than the message body")
    return rest[:length] if length != len(rest) else rest


_CHECKED = SINGLE_HEADERS | {"via", "expires"}


def _validate(msg: Request | Response, seen: dict[str, str], duplicate: str | None) -> None:
    """Framing-level checks every message passes before a transaction sees it (RFC 3261 §8.2, §16.3).
    The parser collects the fields on its one pass: ``seen`` holds the first value of each field in
    ``_CHECKED``, ``duplicate`` the first single-valued field found twice."""
    if duplicate is not None:
        raise ParseError(f"duplicate {duplicate} header field")
    is_request = isinstance(msg, Request)
    if "via" not in seen:
        raise ParseError("missing Via", can_reply=False)
    try:
        msg.top_via  # noqa: B018 - parse it: replies are routed by it
    except ParseError as exc:
        # Still answerable when the sent-by parses and only the parameters are broken (RFC 4475 §3.1.2.1).
        raise ParseError(exc.reason, can_reply=_routable(msg.headers)) from None
    first = msg.headers.first("via")
    if first is not None and not first.parsed(parse_via_list):
        # ``Via:`` or ``Via: ,`` above the real one: the top Via would be taken from one line and stamped
        # or stripped in another (it raised out of Stack.receive; found by tests/fuzz). Nowhere to answer.
        raise ParseError("empty Via header field", can_reply=False)
    # Reasons keep the lower-case keys: other layers match on "missing call-id" etc.
    missing = [key for key in ("from", "to", "call-id", "cseq") if not seen.get(key)]
    if missing:
        raise ParseError(f"missing {', '.join(missing)} header field{'s' if len(missing) > 1 else ''}")
    cseq = msg.cseq
    if is_request:
        assert isinstance(msg, Request)
        if cseq.method != msg.method:
            raise ParseError("CSeq method does not match the request method")
        mf = seen.get("max-forwards")
        if mf is not None and (not is_digits(mf) or int(mf) > 255):
            raise ParseError(f"bad Max-Forwards {mf[:20]!r}: expected 0-255")
        expires = seen.get("expires")
        if expires is not None and (not is_digits(expires) or int(expires) > 2**32 - 1):
            raise ParseError(f"bad Expires {expires[:20]!r}: expected 0-4294967295")


# RFC 3261 §25.1 SIP-date: an RFC 1123 date, always in GMT.
_DATE_MATCH = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT\Z"
).match


def check_fields(msg: Request | Response) -> None:
    """Parse every typed field the engine may use (Request-URI, From, To, Contact, Route, Record-Route, Path)
    and check the syntax of Date; raise :class:`ParseError` (with ``message`` set) on the first bad one."""
    try:
        msg.from_  # noqa: B018
        msg.to  # noqa: B018
        msg.contacts  # noqa: B018
        if isinstance(msg, Request):
            uri = msg.uri
            if isinstance(uri, SipURI) and uri.headers:
                raise ParseError("Request-URI must not carry header components")
        for name in ("route", "record-route", "path"):
            msg.addresses(name)
        date = msg.headers.get("date")
        if date is not None and _DATE_MATCH(date) is None:
            raise ParseError("bad Date: expected an RFC 1123 date in GMT")
    except ParseError as exc:
        _blame(exc, msg)
        raise


def make_response(
    request: Request, status: int, reason: str | None = None, *, to_tag: str | None = None
) -> Response:
    """Build a response to a request (RFC 3261 §8.2.6): Via, From, To (+tag), Call-ID, CSeq copied."""
    items: list[Header] = []
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            items.append(h)
        elif h.key == "to":
            if to_tag and status > 100 and "tag=" not in h.value.lower():
                items.append(Header(h.name, f"{h.value};tag={to_tag}", None, h.key))
            else:
                items.append(h)
        elif h.key == "record-route" and 100 < status < 300:
            items.append(h)
    return Response(status, reason or REASONS.get(status, ""), Headers(items))


def branch_of(msg: Message) -> str:
    return msg.top_via.branch or ""


__all__ = [
    "COMPACT",
    "REASONS",
    "Header",
    "Headers",
    "Message",
    "Request",
    "Response",
    "branch_of",
    "header_key",
    "make_response",
    "parse_message",
    "parse_via_list",
    "typed_header",
]
