"""What the fuzz targets (tests/fuzz) found, each through the public surface: bytes in, a 400 (or nothing, or a
one-line configuration error, or a skipped etcd value) out, never an exception.

Before the fixes: ``str.isdigit`` let '²' or 5000 digits through to ``int()`` (ValueError out of the parser),
a non-numeric ``rport`` reached ``int()`` when the response peer was chosen (out of ``Stack.receive``), a
non-ASCII AoR in aor mode raised out of the core while relaying, so did a Route to a non-SIP URI (ValueError),
an empty Via line above the real one raised ParseError out of ``Stack.receive``, four regexes took seconds on a
run of blanks, a non-UTF-8 config file, a 5,000-digit integer in it and a number where a list belongs raised out
of the CLI, a listen address read back as another, and etcd values of the wrong shape
were decoded into bindings that failed later (or raised AttributeError/RecursionError out of the decoders).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from registrar.cli import main
from registrar.config import ConfigError, Listen, Settings, build_settings
from registrar.records import Binding, MainMeta
from registrar.sip.errors import FramingError, ParseError
from registrar.sip.framing import StreamFramer
from registrar.sip.message import parse_message
from registrar.sip.transport import Peer
from registrar.store.etcd_layout import (
    UNDECODABLE,
    decode_binding,
    decode_head_meta,
    decode_member,
    encode_binding,
)
from tests.unit.corekit import PHONE, Core, main_ok, register
from tests.unit.stackkit import MAIN, make_rig

SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() is True, int() raises
MANY_DIGITS = "7" * 5000  # past int()'s 4300-digit limit


def answers(data: bytes) -> list[tuple[int, Peer]]:
    """What the stack sends back for one datagram from the phone: (status, where) of each response."""
    rig = make_rig()
    rig.feed(data, PHONE)  # (a 400 copies the bad CSeq, so it is read from the raw bytes)
    return [(int(out[8:11]), p) for out, p in rig.raw if out.startswith(b"SIP/2.0 ")]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Max-Forwards: 70", f"Max-Forwards: {SUPERSCRIPT_TWO}".encode()),
        (b"Max-Forwards: 70", f"Max-Forwards: {MANY_DIGITS}".encode()),
        (b"CSeq: 10 REGISTER", f"CSeq: {SUPERSCRIPT_TWO} REGISTER".encode()),
        (b"CSeq: 10 REGISTER", f"CSeq: {MANY_DIGITS} REGISTER".encode()),
        (b"Content-Length: 0", f"Content-Length: {SUPERSCRIPT_TWO}".encode()),
        (b"Content-Length: 0", f"Content-Length: {MANY_DIGITS}".encode()),
        (b"Content-Length: 0", f"Expires: {SUPERSCRIPT_TWO}\r\nContent-Length: 0".encode()),
    ],
)
def test_numbers_that_are_not_ascii_digits_get_400(old: bytes, new: bytes) -> None:
    data = register().replace(old, new)
    assert data != register()
    with pytest.raises(ParseError) as err:
        parse_message(data)
    assert err.value.status == 400 and err.value.can_reply
    assert [s for s, _ in answers(data)] == [400]


def test_status_code_of_superscript_digits_is_dropped() -> None:
    data = f"SIP/2.0 {SUPERSCRIPT_TWO * 3} OK\r\n".encode() + register().partition(b"\r\n")[2]
    with pytest.raises(ParseError) as err:
        parse_message(data)
    assert not err.value.can_reply
    assert answers(data) == []


@pytest.mark.parametrize("rport", ["133:5060", "abc", "0", "65536", "99999999999"])
def test_an_rport_that_is_not_a_port_is_ignored(rport: str) -> None:
    """The answer goes where the Via's sent-by says, as if there were no rport (it raised ValueError)."""
    data = register(via_host="192.0.2.10:5070").replace(b";rport;", f";rport={rport};".encode())
    core = Core(mode="mirror")
    core.feed(data, PHONE)
    core.feed(main_ok(core.to_main()), MAIN)
    assert core.to_phone(Peer("udp", "192.0.2.10", 5070)).status == 200


def test_rport_garbage_through_the_stack_answers_at_the_via_port() -> None:
    data = register(via_host="192.0.2.10:5070").replace(b";rport;", b";rport=133:5060;")
    data = data.replace(b"Max-Forwards: 70", f"Max-Forwards: {SUPERSCRIPT_TWO}".encode())  # so it is answered
    assert [(s, (p.host, p.port)) for s, p in answers(data)] == [(400, ("192.0.2.10", 5070))]


def test_non_ascii_aor_in_aor_mode_is_refused_not_raised() -> None:
    core = Core(mode="aor", outgoing_expires=3600)
    core.feed(register(to="<sip:%C3%A9t%C3%A9@example.com>"), PHONE)
    response = core.to_phone()
    assert response.status == 500
    assert not core.rig.take_events()


def test_config_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"main_registrar: sip:\xfc.example.com\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        build_settings({}, environ={}, config_file=path)
    assert main(["run", "--config", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f"max_expires: -{MANY_DIGITS}\n", "cannot be read"),  # ValueError out of the YAML loader's int()
        ("main_credentials: 1\n", "invalid main-credentials"),  # TypeError: 'int' object is not iterable
    ],
)
def test_config_values_python_cannot_take_are_refused(
    text: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a million config inputs: both raised out of the loader instead of a configuration error."""
    path = tmp_path / "bad.yaml"
    path.write_text("main_registrar: sip:1.2.3.4\nlisten: udp:127.0.0.1:5060\n" + text)
    with pytest.raises(ConfigError, match=error):
        build_settings({}, environ={}, config_file=path)
    assert main(["run", "--config", str(path)]) == 2
    assert error in capsys.readouterr().err


@pytest.mark.parametrize(
    "listen", ["udp:127.0.0.1:realm:user:pw]", "udp:[::1]x", "udp:[example.com]:5060", "tcp:a:b:c"]
)
def test_listen_address_that_would_read_back_as_another_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match="invalid listen"):
        build_settings({"listen": [listen], "main_registrar": "sip:10.0.0.3"}, environ={})


@pytest.mark.parametrize("listen", ["udp:[::1]:5070", "udp:::1", "tcp:[2001:db8::1]", "udp:example.com:5060"])
def test_listen_addresses_round_trip_through_the_yaml_file(listen: str, tmp_path: Path) -> None:
    settings = Settings(listen=[Listen.parse(listen)], main_registrar="sip:10.0.0.3")
    path = tmp_path / "c.yaml"
    path.write_text(settings.to_yaml())
    assert build_settings({}, environ={}, config_file=path) == settings


GOOD = Binding(7, "sip:p@192.0.2.1", 1000.5, Peer("udp", "192.0.2.1", 5060), "c", 2, q=0.5, owner="a")


def _with(**changes: object) -> bytes:
    data = json.loads(encode_binding(GOOD, 1600.0))
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    "value",
    [
        b"0",
        b"[]",
        b'"text"',
        b"[" * 100_000,
        b"\xff",
        _with(expires_at="soon"),
        _with(expires_at=math.nan),
        _with(ctid="7"),
        _with(ctid=True),
        _with(path="<sip:p>"),
        _with(path=[1]),
        _with(source=[1, 2]),
        _with(source={"transport": "udp", "host": "h", "port": 70000}),
        _with(source={"transport": "udp", "host": "h", "port": "5060"}),
        _with(q="high"),
        _with(hold="later"),
        _with(hold=math.inf),
        _with(cseq=2**70),
        _with(expires_at=10**400),  # OverflowError from float()
        _with(hold=-(10**400)),
        _with(q=10**30),
        _with(unknown_field=1),
    ],
)
def test_etcd_binding_values_of_another_shape_do_not_decode(value: bytes) -> None:
    with pytest.raises(UNDECODABLE):
        decode_binding(value)


def test_etcd_binding_numbers_written_as_integers_still_decode() -> None:
    binding, hold = decode_binding(_with(expires_at=1000, hold=1600, q=1))
    assert binding.expires_at == 1000.0 and isinstance(binding.expires_at, float) and hold == 1600.0
    assert binding.q == 1.0


@pytest.mark.parametrize(
    "value",
    [
        b"[1]",
        b'{"meta": [1, 2]}',
        b'{"meta": {"from_uri": 1, "to_uri": "a", "ruri": "b"}}',
        b"{" * 50_000,
        b"nul",
    ],
)
def test_etcd_head_values_of_another_shape_do_not_decode(value: bytes) -> None:
    with pytest.raises(UNDECODABLE):
        decode_head_meta(value)


def test_etcd_head_meta_with_fields_of_a_later_version_still_decodes() -> None:
    meta = MainMeta("sip:a@b", "sip:a@b", "sip:b", cseq=3)
    value = json.dumps({"v": 1, "meta": meta.to_dict() | {"later": True}}).encode()
    assert decode_head_meta(value) == meta


@pytest.mark.parametrize("value", [b"[]", b"1", b'{"sip": 5}', b"[" * 100_000])
def test_etcd_member_values_of_another_shape_do_not_decode(value: bytes) -> None:
    with pytest.raises(UNDECODABLE):
        decode_member(value)


def test_empty_via_line_above_the_real_one_is_dropped() -> None:
    """``Via:`` with nothing, then the real Via: the stack took the top Via from one line and stamped another
    (ParseError out of Stack.receive). Now the parser drops it (no line to answer to)."""
    data = register().replace(b"Via: ", b"Via: \r\nVia: ", 1)
    with pytest.raises(ParseError, match="empty Via") as err:
        parse_message(data)
    assert not err.value.can_reply
    assert answers(data) == []
    assert answers(register().replace(b"Via: ", b"v: ,\r\nVia: ", 1)) == []
    response = b"SIP/2.0 200 OK\r\nVia:\r\n" + register().partition(b"\r\n")[2]
    assert answers(response) == []


def _routed(method: str, route: str) -> bytes:
    return (
        f"{method} sip:bob@example.org SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-r1\r\n"
        f"Max-Forwards: 70\r\nRoute: {route}\r\nFrom: <sip:alice@example.com>;tag=1\r\n"
        f"To: <sip:bob@example.org>\r\nCall-ID: r1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("route", ["<si7.0.0.1:5080>", "<tel:+15551234567>", "<urn:uuid:1>;lr"])
def test_a_route_to_a_non_sip_uri_gets_416(route: str) -> None:
    """``Route: <si7.0.0.1:5080>`` on a MESSAGE: the next hop was looked up for a URI with no host, and
    ValueError escaped the core (found by 10 million fuzz inputs through the UDP pipeline)."""
    core = Core(mode="contact", outgoing_expires=3600)
    core.feed(_routed("MESSAGE", route), PHONE)
    assert [out[:30] for out, _ in core.rig.raw] == [b"SIP/2.0 416 Unsupported URI Sc"]


@pytest.mark.parametrize("route", ["<tel:+15551234567>", "<sip:a@b", "<>"])
def test_an_ack_routed_to_nowhere_is_dropped(route: str) -> None:
    core = Core(mode="contact", outgoing_expires=3600)
    core.feed(_routed("ACK", route), PHONE)
    assert core.rig.raw == []
    core.feed(register(), PHONE)  # and the engine goes on
    assert core.to_main().method == "REGISTER"


# Inputs that took quadratic time (a regex backtracking over a run of blanks): seconds for one message.
BLANKS = 60_000


def _timed(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def test_display_name_of_blanks_is_parsed_in_linear_time() -> None:
    """From: a<60,000 blanks><abc (no '>'): 2.4 s through the engine before."""
    data = register().replace(b"From: <sip:alice@example.com>;tag=f1", b"From: a" + b" " * BLANKS + b"<abc")
    core = Core(mode="contact", outgoing_expires=3600)
    assert _timed(lambda: core.feed(data, PHONE)) < 0.5
    assert [out[:12] for out, _ in core.rig.raw] == [b"SIP/2.0 400 "]


@pytest.mark.parametrize(
    ("line", "reason", "well_formed"),
    [
        # ``l: 1<60,000 blanks>x``: the framer's regex took 28 s on it, stalling every connection
        (b"l: 1" + b" " * BLANKS + b"x", "Content-Length", b"Content-Length: 0 \t "),
        # ``l: <60,000 tabs>0<CR>x``: the blanks matched two quantifiers, and the bare CR made the framer try
        # every split of the run (14 s for 30,000 tabs in one 31-KB message, found by 10 million fuzz inputs).
        # A line cut by a bare CR is no Content-Length, as before: a body type without a length ends the stream.
        (b"l: " + b"\t" * BLANKS + b"0\rx", "missing", b"Content-Length:\t \t0 \t "),
    ],
    ids=["blanks-after-the-value", "blanks-ended-by-a-bare-cr"],
)
def test_content_length_over_a_run_of_blanks_is_framed_in_linear_time(
    line: bytes, reason: str, well_formed: bytes
) -> None:
    """A run of blanks in a Content-Length line is framed at once, and the value with blanks around it still read."""
    data = b"REGISTER sip:a SIP/2.0\r\n" + line + b"\r\nContent-Type: a/b\r\n\r\n"
    framer = StreamFramer()
    items: list[object] = []
    assert _timed(lambda: items.extend(framer.feed(data))) < 0.5
    assert len(items) == 1 and isinstance(items[0], FramingError) and reason in items[0].reason
    ok = register().replace(b"Content-Length: 0", well_formed)
    assert StreamFramer().feed(ok) == [ok]


def test_folded_header_with_a_run_of_blanks_is_unfolded_in_linear_time() -> None:
    """A folded header field holding 60,000 blanks: the unfolding regex took 18 s on it."""
    data = register().replace(b"Max-Forwards: 70", b"Subject: a" + b" " * BLANKS + b"b\r\n c")
    msg = parse_message(data)
    assert _timed(lambda: parse_message(data)) < 0.5
    assert msg.headers.get("subject") == "a" + " " * BLANKS + "b c"
    folded = parse_message(register().replace(b"Max-Forwards: 70", b"Subject: a \t\r\n \t b\r\n\tc"))
    assert folded.headers.get("subject") == "a b c"


@pytest.mark.parametrize(
    "text",
    [
        b"{" + b"[" * 30_000,
        b"[" * 1000 + b"]" * 1000,
        b"a:\n" + b"".join(b" " * i + b"- \n" for i in range(2000)),
    ],
)
def test_config_file_nested_too_deep_is_refused_at_once(
    text: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RecursionError out of PyYAML (a traceback from the CLI) after up to a second of quadratic scanning."""
    path = tmp_path / "deep.yaml"
    path.write_bytes(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nested deeper than 32"):
        build_settings({}, environ={}, config_file=path)
    assert time.perf_counter() - start < 0.5
    assert main(["run", "--config", str(path)]) == 2
    assert "nested deeper" in capsys.readouterr().err


def test_via_parameters_over_a_run_of_blanks_are_parsed_in_linear_time() -> None:
    """``;2port;bc1@<30,000 tabs>``: the parameter regex, searched from every position, took 0.8 s (3.8 s through
    the engine, which parses the Via twice); found by the udp target."""
    via = b"SIP/2.0/UDP 192.0.2.10:5062;2port;bc1@" + b"\t" * 30_000 + b"x;branch=z9hG4bK-1"
    data = register().replace(b"SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-a1", via)
    core = Core(mode="contact", outgoing_expires=3600)
    assert _timed(lambda: core.feed(data, PHONE)) < 0.5
    assert [out[:12] for out, _ in core.rig.raw] == [b"SIP/2.0 400 "]  # answered by the sent-by
    quoted = register().replace(b";rport;", b';rport;x="' + b" " * 30_000 + b";")
    assert _timed(lambda: answers(quoted)) < 0.5


@pytest.mark.parametrize("length", [b"7" * 8001, b"0" * 8000 + b"5", b"9" * 25])
def test_content_length_of_thousands_of_digits_ends_the_stream(length: bytes) -> None:
    """``Content-Length: 777…`` (8001 digits) on TCP: int() raised ValueError out of StreamFramer.feed (found by the
    tcp target). Now a framing error like any Content-Length past the limit (or, with leading zeros, its value)."""
    data = register().replace(b"Content-Length: 0", b"Content-Length: " + length)
    items = StreamFramer().feed(data)
    if length.lstrip(b"0") == b"5":
        assert items == []  # five bytes of body still to come
    else:
        assert len(items) == 1 and isinstance(items[0], FramingError) and items[0].status == 513
