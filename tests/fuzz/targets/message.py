"""The SIP parser and the stream framer.

- ``parse_message`` (datagram and stream rules) may raise only ParseError; a message it accepts must take
  ``check_fields`` (ParseError only), give its typed views, and serialize to bytes the parser takes again with
  the same start line.
- ``StreamFramer`` never raises; fed the same bytes in one piece or split anywhere, it returns the same items
  (the split points come from the input's hash, so a run is reproducible).
"""

from __future__ import annotations

import hashlib
import random

from registrar.sip.errors import ParseError
from registrar.sip.framing import StreamFramer
from registrar.sip.message import MAX_MESSAGE, Request, Response, check_fields, parse_message
from tests.fuzz.harness import Target


def _views(msg: Request | Response) -> None:
    try:
        check_fields(msg)
    except ParseError:
        return
    msg.vias  # noqa: B018
    msg.cseq  # noqa: B018
    for contact in msg.contacts:
        if not contact.star:
            contact.q  # noqa: B018
            contact.instance  # noqa: B018
            str(contact.address)
            contact.uri.equals(contact.uri)
    str(msg.to), str(msg.from_)
    if isinstance(msg, Request):
        msg.max_forwards  # noqa: B018 - checked by the parser: an int or None
        str(msg.uri)


def _parse(data: bytes, stream: bool) -> None:
    try:
        msg = parse_message(data, stream=stream)
    except ParseError as exc:
        if exc.message is not None:
            exc.message.to_bytes()  # what a 400 is built from
        return
    _views(msg)
    data = msg.to_bytes(stream=stream)
    if len(data) > MAX_MESSAGE:  # (serializing may add a line: Content-Length, corrected or written)
        return
    again = parse_message(data, stream=stream)
    assert again.start_line() == msg.start_line(), (again.start_line(), msg.start_line())


def _frame(data: bytes) -> None:
    whole = StreamFramer().feed(data)
    rng = random.Random(hashlib.blake2b(data, digest_size=8).digest())
    framer = StreamFramer()
    pieces: list[object] = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 2, 3, 5, 17, 100, 1500))
        pieces += framer.feed(data[i : i + n])
        i += n
    assert pieces == whole, (pieces, whole)
    for item in whole:
        if isinstance(item, bytes):
            _parse(item, True)


def run(data: bytes) -> None:
    _parse(data, False)
    _frame(data)


TARGET = Target("message", run, (), __doc__ or "")
