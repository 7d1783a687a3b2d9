"""StreamFramer: splitting a TCP byte stream into SIP messages (RFC 3261 §18.3, RFC 5626 §4.4.1)."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.sip.errors import FramingError
from registrar.sip.framing import PING, PONG, Ping, StreamFramer
from registrar.sip.message import parse_message
from tests.unit.sipdata import INVITE, REGISTER

RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.10:5062;branch=z9hG4bK-a1\r\n"
    b"From: <sip:alice@example.com>;tag=f1\r\n"
    b"To: <sip:alice@example.com>;tag=t1\r\n"
    b"Call-ID: c1@192.0.2.10\r\n"
    b"CSeq: 10 REGISTER\r\n"
    b"l: 5\r\n\r\n"
    b"hello"
)


def feed_all(framer: StreamFramer, *chunks: bytes) -> list[bytes | Ping | FramingError]:
    out: list[bytes | Ping | FramingError] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


def test_one_message() -> None:
    framer = StreamFramer()
    assert framer.feed(REGISTER) == [REGISTER]
    assert framer.buffered == 0 and not framer.closed


def test_several_messages_in_one_chunk() -> None:
    framer = StreamFramer()
    assert framer.feed(REGISTER + INVITE + RESPONSE + REGISTER) == [REGISTER, INVITE, RESPONSE, REGISTER]


def test_byte_by_byte() -> None:
    stream = b"\r\n\r\n" + INVITE + b"\r\n" + REGISTER + RESPONSE + b"\r\n\r\n"
    framer = StreamFramer()
    out = feed_all(framer, *(stream[i : i + 1] for i in range(len(stream))))
    assert out == [PING, INVITE, REGISTER, RESPONSE, PING]
    assert framer.buffered == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(INVITE) * 3), max_size=8))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    stream = INVITE + REGISTER + b"\r\n\r\n" + RESPONSE
    points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    assert feed_all(StreamFramer(), *chunks) == [INVITE, REGISTER, PING, RESPONSE]


def test_messages_parse_after_framing() -> None:
    out = StreamFramer().feed(INVITE + RESPONSE)
    assert all(isinstance(item, bytes) for item in out)
    invite, response = (parse_message(item, stream=True) for item in out if isinstance(item, bytes))
    assert invite.body == b"v=0\n" and response.body == b"hello"


def test_keepalive_ping_and_single_crlfs() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []  # maybe the first half of a ping: wait
    assert framer.buffered == 2
    assert framer.feed(b"\r\n") == [PING]
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == [PING, PING]
    # a lone CRLF (a pong, or the CRLF some stacks put before a message) is skipped silently
    assert framer.feed(b"\r\n" + REGISTER) == [REGISTER]
    assert PONG == b"\r\n"
    assert repr(PING) == "PING"


def test_ping_is_only_recognised_between_messages() -> None:
    body = b"\r\n\r\n\r\n"
    msg = INVITE.replace(b"Content-Length: 4\r\n\r\nv=0\n", b"Content-Length: 6\r\n\r\n" + body)
    assert StreamFramer().feed(msg) == [msg]


def test_content_length_compact_form_and_spacing() -> None:
    msg = REGISTER.replace(b"Content-Length: 0", b"content-length   :   3") + b"abc"
    assert StreamFramer().feed(msg + REGISTER) == [msg, REGISTER]


def test_missing_content_length_without_a_body_is_zero() -> None:
    msg = REGISTER.replace(b"Content-Length: 0\r\n", b"")
    assert StreamFramer().feed(msg + REGISTER) == [msg, REGISTER]


def test_missing_content_length_with_a_body_breaks_the_stream() -> None:
    msg = INVITE.replace(b"Content-Length: 4\r\n", b"")
    framer = StreamFramer()
    (error,) = framer.feed(msg)
    assert isinstance(error, FramingError) and "Content-Length missing" in error.reason
    assert framer.closed and framer.error == error


def test_content_length_too_small_is_caught_at_the_next_start_line() -> None:
    msg = INVITE.replace(b"Content-Length: 4", b"Content-Length: 1")
    framer = StreamFramer()
    first, error = framer.feed(msg + REGISTER)
    assert first == msg[: len(msg) - 3]  # what the sender said was the message
    assert isinstance(error, FramingError) and "not a SIP start line" in error.reason
    assert framer.closed


def test_content_length_too_large_swallows_the_next_message() -> None:
    msg = INVITE.replace(b"Content-Length: 4", b"Content-Length: 40")
    framer = StreamFramer()
    assert framer.feed(msg) == []
    swallowed, error = framer.feed(REGISTER)
    assert swallowed == msg + REGISTER[:36]  # framing cannot know better...
    assert isinstance(error, FramingError) and "not a SIP start line" in error.reason  # ...until here


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"-4", "bad Content-Length '-4'"),
        (b"four", "bad Content-Length 'four'"),
        (b"", "bad Content-Length ''"),
        (b"4, 4", "bad Content-Length '4, 4'"),
    ],
)
def test_bad_content_length_breaks_the_stream(value: bytes, reason: str) -> None:
    framer = StreamFramer()
    (error,) = framer.feed(INVITE.replace(b"Content-Length: 4", b"Content-Length: " + value))
    assert isinstance(error, FramingError) and error.reason == reason and error.status == 400


def test_two_different_content_lengths_break_the_stream() -> None:
    msg = INVITE.replace(b"Content-Length: 4\r\n", b"Content-Length: 4\r\nl: 2\r\n")
    (error,) = StreamFramer().feed(msg)
    assert isinstance(error, FramingError) and "conflicting Content-Length" in error.reason


def test_the_same_content_length_twice_is_framed_and_left_to_the_parser() -> None:
    msg = INVITE.replace(b"Content-Length: 4\r\n", b"Content-Length: 4\r\nl: 4\r\n")
    assert StreamFramer().feed(msg) == [msg]


def test_folded_content_length() -> None:
    msg = INVITE.replace(b"Content-Length: 4", b"Content-Length:\r\n  4")
    assert StreamFramer().feed(msg + REGISTER) == [msg, REGISTER]


def test_header_section_is_bounded() -> None:
    framer = StreamFramer(max_header=1024)
    head = b"OPTIONS sip:x@example.com SIP/2.0\r\n" + b"X-Filler: " + b"a" * 100 + b"\r\n"
    out = framer.feed(head)
    while not out:
        out = framer.feed(b"X-Filler: " + b"a" * 100 + b"\r\n")
    (error,) = out
    assert isinstance(error, FramingError) and error.status == 513 and "header section" in error.reason
    assert framer.buffered == 0 and framer.feed(REGISTER) == []


def test_default_header_bound_is_64_kib() -> None:
    framer = StreamFramer()
    big = REGISTER.replace(b"User-Agent: Foo/1.0", b"User-Agent: " + b"x" * 70_000)
    (error,) = framer.feed(big)
    assert isinstance(error, FramingError) and error.status == 513


def test_body_is_bounded() -> None:
    msg = INVITE.replace(b"Content-Length: 4", b"Content-Length: 100000")
    (error,) = StreamFramer().feed(msg)
    assert isinstance(error, FramingError) and error.status == 513


def test_start_line_without_end_is_bounded() -> None:
    framer = StreamFramer(max_header=100)
    (error,) = framer.feed(b"OPTIONS sip:" + b"x" * 200)
    assert isinstance(error, FramingError) and error.status == 513


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\r\n", b"hello\r\n"])
def test_garbage_breaks_the_stream_at_its_first_line(junk: bytes) -> None:
    framer = StreamFramer()
    (error,) = framer.feed(junk)
    assert isinstance(error, FramingError) and "not a SIP start line" in error.reason


def test_error_is_last_and_final() -> None:
    framer = StreamFramer()
    out = framer.feed(REGISTER + b"\r\n\r\n" + b"garbage\r\n" + REGISTER)
    assert out[:2] == [REGISTER, PING]
    assert isinstance(out[2], FramingError) and len(out) == 3
    assert framer.feed(REGISTER) == [] and framer.closed


def test_framing_errors_compare_by_value() -> None:
    assert FramingError("x") == FramingError("x")
    assert FramingError("x") != FramingError("x", status=513)
    assert len({FramingError("x"), FramingError("x")}) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_never_raise(data: bytes, step: int) -> None:
    framer = StreamFramer(max_header=256)
    out = feed_all(framer, *(data[i : i + step] for i in range(0, len(data), step)))
    errors = [item for item in out if isinstance(item, FramingError)]
    assert len(errors) <= 1 and (not errors or out[-1] is errors[0])
