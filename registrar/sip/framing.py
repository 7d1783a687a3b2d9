"""Sans-IO framing of SIP messages on a stream transport (TCP, TLS): RFC 3261 §18.3, RFC 5626 §4.4.1.

A :class:`StreamFramer` takes the bytes of one connection as they arrive, in chunks of any size, and
returns what they completed, in order::

    framer = StreamFramer()
    for item in framer.feed(chunk):
        if item is PING:                      # a CRLFCRLF keep-alive between messages
            write(PONG)                       # RFC 5626 §4.4.1: answer with a single CRLF
        elif isinstance(item, FramingError):  # the stream cannot be split any more
            close()                           # (item.status may be sent first, if it can be addressed)
        else:
            stack.receive(item, peer, now)    # exactly one message: start line through body

A message ends after its header section plus Content-Length bytes of body. Between messages, CRLFs are
skipped (RFC 3261 §7.5); each CRLFCRLF among them is reported as :data:`PING`. The framing fails for good,
with one :class:`FramingError` as the last item (after which :attr:`StreamFramer.closed` is true and input is
ignored), when the first line is not a SIP start line, the header section grows past ``max_header`` bytes,
Content-Length is not a decimal number or is given twice with different values, the body would be larger
than ``max_body``, or a message that announces a body (Content-Type) has no Content-Length. A
Content-Length larger than the data simply waits for more; the transport's idle timeout ends that.
Nothing here parses the message beyond finding its end: :func:`registrar.sip.message.parse_message` with
``stream=True`` does the rest.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from registrar.sip.errors import FramingError

__all__ = ["PING", "PONG", "FramingError", "Ping", "StreamFramer"]

MAX_HEADER: Final = 64 * 1024
MAX_BODY: Final = 65535
PONG: Final = b"\r\n"

_CRLF2 = b"\r\n\r\n"
# The value is taken whole and its trailing blanks stripped after: a lazy ``([^\r\n]*?)[ \t]*`` backtracks in
# quadratic time over a run of blanks (28 s for a 60 KB header line; found by tests/fuzz). The quantifiers are
# possessive for the same reason: the blanks after the colon and the value both match a blank, and when the
# line ends in a bare CR the greedy pair tried every split of the run (14 s on 30,000 tabs).
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*+:[ \t]*+([^\r\n]*+)\r?$", re.I | re.M)
_CONTENT_TYPE = re.compile(rb"^(?:content-type|c)[ \t]*:", re.I | re.M)
_FOLD = re.compile(rb"\r\n[ \t]+")
# A request line ("METHOD SP URI SP SIP/x.y") or a status line ("SIP/x.y SP code ..."), loosely: the
# parser gives the precise verdict; this only tells a message from garbage or a stray body.
_START_LINE = re.compile(rb"SIP/[0-9]|[!-~]+ [^\r\n]* SIP/[0-9]")


class Ping(enum.Enum):
    """The double-CRLF keep-alive ping of RFC 5626 §4.4.1; its one value is :data:`PING`."""

    PING = "ping"

    def __repr__(self) -> str:
        return "PING"


PING: Final = Ping.PING


class StreamFramer:
    """Split the byte stream of one connection into SIP messages. See the module docstring."""

    __slots__ = ("_buf", "_need", "_scan", "_started", "closed", "error", "max_body", "max_header")

    def __init__(self, *, max_header: int = MAX_HEADER, max_body: int = MAX_BODY) -> None:
        self.max_header = max_header
        self.max_body = max_body
        self.closed = False
        self.error: FramingError | None = None
        self._buf = bytearray()
        self._need: int | None = None  # total length of the current message, once its header is in
        self._scan = 0  # where to resume looking for the end of the header section
        self._started = False  # the current message's start line has been checked

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned (a partial message, or a partial keep-alive)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | Ping | FramingError]:
        """Add bytes from the stream; return the messages, pings and (at most one, last) error completed."""
        if self.closed:
            return []
        buf = self._buf
        buf += data
        out: list[bytes | Ping | FramingError] = []
        while buf:
            if self._need is None:
                if not self._started:
                    if not self._skip_keepalives(out):
                        break
                    if not buf:
                        break
                    line_end = buf.find(b"\r\n")
                    if line_end < 0:
                        if len(buf) > self.max_header:
                            return self._fail(out, "start line too long", 513)
                        break
                    if _START_LINE.match(buf, 0, line_end) is None:
                        return self._fail(out, "not a SIP start line")
                    self._started = True
                end = buf.find(_CRLF2, self._scan)
                if end < 0:
                    if len(buf) > self.max_header:
                        return self._fail(out, f"header section larger than {self.max_header} bytes", 513)
                    self._scan = max(0, len(buf) - 3)
                    break
                head_len = end + 4
                if head_len > self.max_header:
                    return self._fail(out, f"header section larger than {self.max_header} bytes", 513)
                length = self._content_length(bytes(buf[:end]))
                if isinstance(length, FramingError):
                    out.append(self._close(length))
                    return out
                self._need = head_len + length
            need = self._need
            if len(buf) < need:
                break
            out.append(bytes(buf[:need]))
            del buf[:need]
            self._need = None
            self._scan = 0
            self._started = False
        return out

    def _skip_keepalives(self, out: list[bytes | Ping | FramingError]) -> bool:
        """Drop CRLFs before a message, reporting each CRLFCRLF; False to wait (a ping may be half in)."""
        buf = self._buf
        while buf and buf[0] in (13, 10):  # CR, LF
            if buf[:4] == _CRLF2:
                out.append(PING)
                del buf[:4]
            elif len(buf) < 4 and _CRLF2.startswith(buf):
                return False
            elif buf[:2] == b"\r\n":
                del buf[:2]
            else:  # a bare CR or LF: tolerated like a CRLF
                del buf[:1]
        return True

    def _content_length(self, head: bytes) -> int | FramingError:
        if b"\r\n " in head or b"\r\n\t" in head:
            head = _FOLD.sub(b" ", head)
        values = {v.rstrip(b" \t") for v in _CONTENT_LENGTH.findall(head, head.find(b"\n") + 1)}
        if not values:
            if _CONTENT_TYPE.search(head, head.find(b"\n") + 1):
                return FramingError("Content-Length missing on a message with a body (Content-Type)")
            return 0
        if len(values) > 1:
            return FramingError("conflicting Content-Length header fields")
        (value,) = values
        if not value.isdigit():
            return FramingError(f"bad Content-Length {value[:20].decode('latin-1')!r}")
        digits = value.lstrip(b"0") or b"0"
        if len(digits) > 20:  # (int() raises past 4300 digits; found by tests/fuzz)
            return FramingError(f"Content-Length larger than {self.max_body}", status=513)
        length = int(digits)
        if length > self.max_body:
            return FramingError(f"Content-Length {length} larger than {self.max_body}", status=513)
        return length

    def _fail(
        self, out: list[bytes | Ping | FramingError], reason: str, status: int = 400
    ) -> list[bytes | Ping | FramingError]:
        out.append(self._close(FramingError(reason, status=status)))
        return out

    def _close(self, error: FramingError) -> FramingError:
        self.closed = True
        self.error = error
        self._buf.clear()
        return error
