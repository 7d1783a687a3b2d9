"""What the RFC 4475 and RFC 5118 torture tests check alike: a message goes through the engine's two
stages (``parse_message``, then ``check_fields``), and a refused one is refused at the expected stage, with
its status and reason, and can be answered when the refusal says a reply can be routed."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from registrar.sip.errors import ParseError
from registrar.sip.message import Request, Response, check_fields, make_response, parse_message

# name -> (stage, status, can_reply, reason): stage "parse" (parse_message refuses it) or "check".
Refusals = Mapping[str, tuple[str, int, bool, str]]


def parsed(data: bytes) -> Request | Response:
    msg = parse_message(data)
    check_fields(msg)
    return msg


def assert_refused(data: bytes, stage: str, status: int, can_reply: bool, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        msg = parse_message(data)
        assert stage == "check", "parse_message accepted it"
        check_fields(msg)
    exc = info.value
    assert reason in exc.reason
    assert (exc.status, exc.can_reply) == (status, can_reply)
    if can_reply:
        # The partly parsed request is there to build the answer from, headers as received.
        assert isinstance(exc.message, Request)
        answer = make_response(exc.message, exc.status)
        assert answer.status == status
        assert answer.headers.fields("via") == exc.message.headers.fields("via")


def assert_refused_on_a_stream(refusals: Refusals, load: Callable[[str], bytes]) -> None:
    """Same verdicts with stream=True: only the framing of the bytes differs there."""
    for name, (_stage, status, _reply, reason) in refusals.items():
        with pytest.raises(ParseError) as info:
            check_fields(parse_message(load(name), stream=True))
        assert reason in info.value.reason and info.value.status == status, name
