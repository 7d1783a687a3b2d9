"""`midregistrar run --mode mirror` end to end with SIPp phones and a SIPp main registrar (issue 2, item 5).

Written against the command-line contract (docs/configuration.md) and behaviour §4 (mode 0): every test
starts the real CLI as a subprocess on free loopback ports, `--main-registrar` pointing at a SIPp UAS
scenario.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.kamailio import Kamailio
from tests.support.ports import free_port
from tests.support.registrar import Registrar, registrar_argv
from tests.support.sip import (
    LOOPBACK,
    options,
    read_sip_stream_message,
    sip_request,
    status_code,
    udp_exchange,
)
from tests.support.sipp import SCENARIOS, Sipp, SippResult, run_sipp

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sip_tools")]

CT_RE = re.compile(
    r"^<sip:(?P<user>[^@>]+)@(?P<host>[^:;>]+):(?P<port>\d+);ctid=(?P<ctid>\d+)>;expires=(?P<exp>\d+)$"
)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def main_uas(tmp_path: Path) -> Iterator[Callable[..., Sipp]]:
    """Start a SIPp main-registrar UAS (scenario name, e.g. "main_uas_403"); stopped after the test."""
    started: list[Sipp] = []

    def start(scenario: str = "main_uas", **keys: object) -> Sipp:
        uas = Sipp(scenario, None, keys=keys, timeout_s=170, workdir=tmp_path / f"uas-{len(started)}")
        uas.start().wait_bound()
        started.append(uas)
        return uas

    yield start
    for uas in started:
        if uas.result is None:
            uas.stop()


@pytest.fixture
def registrar(tmp_path: Path) -> Iterator[Callable[..., Registrar]]:
    """Start `midregistrar run --mode mirror` in front of a main UAS; stopped (SIGTERM) after the test."""
    started: list[Registrar] = []

    def start(main: Sipp | tuple[str, int], *extra: str) -> Registrar:
        addr = (LOOPBACK, main.port) if isinstance(main, Sipp) else main
        reg = Registrar(addr, mode="mirror", extra=extra, workdir=tmp_path / f"midreg-{len(started)}")
        started.append(reg)
        return reg.start(ready_timeout=20)

    yield start
    for reg in started:
        reg.stop()


def sipp_phone(
    scenario: str,
    reg: Registrar,
    tmp_path: Path,
    transport: str = "u1",
    wait: float = 40,
    **keys: object,
) -> SippResult:
    base = {"user": "alice", "domain": "example.test", "expires": 1800}
    base.update(keys)
    return run_sipp(
        scenario,
        reg.addr,
        keys=base,
        calls=1,
        transport=transport,
        wait=wait,
        workdir=tmp_path / f"phone-{scenario}-{time.monotonic_ns()}",
        extra=["-recv_timeout", "20000"],
    )


def reply_code(res: SippResult) -> int | None:
    """The final response code logged by phone_register_once.xml."""
    codes = res.log_values("code")
    return int(codes[-1]) if codes else None


def received_registers(uas: Sipp) -> list[dict[str, str]]:
    """The REGISTERs the main UAS logged, as dicts of cid/cseq/contact/expires_hdr/ruri."""
    res = uas.result or uas.stop()
    out = []
    for line in res.logs:
        if line.startswith("RX REGISTER"):
            out.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return out


def diag(*parts: object) -> str:
    text = []
    for p in parts:
        if isinstance(p, SippResult):
            text.append(p.describe())
        elif isinstance(p, Registrar):
            text.append(f"--- midregistrar: {p.command}\n{p.log()}")
        else:
            text.append(str(p))
    return "\n".join(text)


# ------------------------------------------------------------------------------- register / refresh


@pytest.mark.parametrize("transport", ["u1", "t1"], ids=["udp", "tcp"])
def test_register_refresh_deregister(main_uas, registrar, tmp_path, transport):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    phone = sipp_phone("phone_register", reg, tmp_path, transport=transport, expires=1800)
    got = received_registers(uas)
    info = diag(phone, reg, "--- main UAS logs:", *uas.result.logs if uas.result else [])

    assert phone.returncode == 0, "phone did not get 200 to REGISTER, refresh and de-REGISTER\n" + info
    assert len(got) == 3, f"main registrar should see exactly 3 REGISTERs, saw {len(got)}\n" + info

    cts = [CT_RE.match(r["contact"]) for r in got]
    assert all(cts), "Contact at main must be <sip:alice@127.0.0.1:PORT;ctid=DIGITS>;expires=N\n" + info
    first, refresh, dereg = cts  # type: ignore[misc]
    assert first["user"] == "alice"
    assert (first["host"], int(first["port"])) == reg.addr, "the contact must point at the mid-registrar"
    assert first["exp"] == "1800" and refresh["exp"] == "1800", "main sees the UA's requested lifetime"
    assert dereg["exp"] == "0", "de-REGISTER must reach main as ;expires=0"
    assert first["ctid"] == refresh["ctid"] == dereg["ctid"], "the contact id is kept for the same contact"
    assert got[0]["cid"] == got[1]["cid"] == got[2]["cid"], "one Call-ID towards main for one phone Call-ID"
    cseqs = [int(r["cseq"]) for r in got]
    assert cseqs[0] < cseqs[1] < cseqs[2], f"CSeq must grow towards main: {cseqs}"

    replies = {int(v): line for line in phone.logs for v in re.findall(r"step=(\d)", line)}
    own = f"<sip:alice@127.0.0.1:{phone_port(phone)}"
    for step in (1, 2):
        line = replies[step]
        ct = re.search(r"contact=(\S*)", line)
        assert ct and ct.group(1).startswith(own), f"reply {step} must list the phone's own contact\n{line}"
        exp = re.search(r";expires=(\d+)", ct.group(1))
        assert exp and 1790 <= int(exp.group(1)) <= 1800, f"remaining lifetime in reply {step}: {line}"
        assert "expires_hdr= " in line + " ", f"mirror 2xx to the phone has no Expires header: {line}"
    assert "ctid=" not in replies[1] + replies[2], "the phone must never see the rewritten contact"
    assert own not in replies[3], f"after de-REGISTER the binding is gone: {replies[3]}"


def phone_port(res: SippResult) -> int:
    return int(res.argv[res.argv.index("-p") + 1])


def test_main_shorter_lifetime_is_obeyed(main_uas, registrar, tmp_path):
    uas = main_uas("main_uas_grant", grant=600)
    reg = registrar(uas)
    phone = sipp_phone("phone_register_once", reg, tmp_path, expires=1800)
    assert reply_code(phone) == 200, diag(phone, reg)
    ct = phone.log_values("contact")[0]
    exp = re.search(r";expires=(\d+)", ct)
    assert exp and 590 <= int(exp.group(1)) <= 600, f"main granted 600, the phone must be told so: {ct}"


# ------------------------------------------------------------------------------------ error answers


@pytest.mark.parametrize(
    ("scenario", "code", "header"),
    [
        ("main_uas_401", 401, 'WWW-Authenticate: Digest realm="main.test", nonce="sipkit-nonce-0001"'),
        ("main_uas_403", 403, None),
        ("main_uas_503", 503, "Retry-After: 120"),
    ],
)
def test_error_answers_are_relayed_unchanged(main_uas, registrar, tmp_path, scenario, code, header):
    uas = main_uas(scenario)
    reg = registrar(uas)
    phone = sipp_phone("phone_register_once", reg, tmp_path)
    assert reply_code(phone) == code, f"phone expected {code}\n" + diag(phone, reg)
    assert len(received_registers(uas)) >= 1
    msgs = phone.messages
    final = msgs[msgs.rfind(f"SIP/2.0 {code} ") :]
    assert final, f"no {code} in the phone's message log\n{msgs[-3000:]}"
    if header:
        assert header in final, f"{header!r} must be relayed unchanged:\n{final[:1500]}"


def test_timeout_gives_408(main_uas, registrar, tmp_path):
    uas = main_uas("main_uas_silent")
    reg = registrar(uas, "--t1", "0.1")  # Timer F = 64*T1 = 6.4 s
    t0 = time.monotonic()
    phone = sipp_phone("phone_register_once", reg, tmp_path, wait=40)
    took = time.monotonic() - t0
    assert reply_code(phone) == 408, "phone must get 408 when main never answers\n" + diag(phone, reg)
    assert 5.0 <= took <= 15.0, f"408 should come after Timer F (6.4 s with --t1 0.1), took {took:.1f} s"
    assert len(received_registers(uas)) >= 1, "the REGISTER must have been forwarded to main"
    assert options(reg.addr) == 200, "still serving after the timeout"


# -------------------------------------------------------------------------------------------- calls


def test_invite_from_main_reaches_phone(main_uas, registrar, tmp_path):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    phone = Sipp(
        "phone_register_answer",
        reg.addr,
        keys={"user": "alice", "domain": "example.test", "expires": 300},
        calls=1,
        extra=["-oocsf", str(SCENARIOS / "phone_answer_ooc.xml"), "-d", "30000"],
        workdir=tmp_path / "phone",
    ).start()
    try:
        deadline = time.monotonic() + 10
        ctid = None
        while time.monotonic() < deadline and ctid is None:
            lines = (phone.workdir / "logs.log").read_text() if (phone.workdir / "logs.log").exists() else ""
            if "REPLY code=200" in lines:
                uas_logs = (uas.workdir / "logs.log").read_text()
                m = re.search(r";ctid=(\d+)>", uas_logs)
                ctid = m.group(1) if m else None
            time.sleep(0.1)
        assert ctid, "phone did not register through the mid-registrar\n" + diag(reg)
        ruri = f"sip:alice@{LOOPBACK}:{reg.port};ctid={ctid}"
        caller = run_sipp(
            "main_invite_uac",
            reg.addr,
            keys={"ruri": ruri, "caller": "pbx"},
            calls=1,
            wait=40,
            workdir=tmp_path / "caller",
            extra=["-recv_timeout", "20000"],
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "CALL done" not in (phone.workdir / "logs.log").read_text():
            time.sleep(0.1)
    finally:
        ph = phone.stop()
    info = diag(caller, ph, reg)
    assert caller.returncode == 0, (
        "INVITE → 200, ACK, BYE → 200 must complete through the mid-registrar\n" + info
    )
    assert any(line.startswith("INVITE final=200") for line in caller.logs), info
    assert any(line.startswith("BYE final=200") for line in caller.logs), info
    invites = [line for line in ph.logs if line.startswith("CALL invite")]
    assert invites, "the INVITE never reached the phone\n" + info
    assert f"ruri=sip:alice@127.0.0.1:{phone_port(ph)}" in invites[0], (
        f"R-URI must be the phone's contact: {invites}"
    )
    assert any(line.startswith("CALL acked") for line in ph.logs), "ACK must reach the phone\n" + info
    assert any(line.startswith("CALL done") for line in ph.logs), "BYE must reach the phone\n" + info


def test_invite_to_unknown_ctid_gets_404(main_uas, registrar, tmp_path):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        msg = sip_request(
            "INVITE",
            f"sip:nobody@{LOOPBACK}:{reg.port};ctid=987654321",
            s.getsockname(),
            headers=[("Contact", f"<sip:pbx@{LOOPBACK}:{s.getsockname()[1]}>")],
        )
        reply = udp_exchange(reg.addr, msg, timeout=5, sock=s)
    assert status_code(reply) == 404, f"unknown ctid must be 404, got {reply!r}\n" + diag(reg)


# ----------------------------------------------------------------------------------------- bad input


def test_options_to_itself(main_uas, registrar):
    reg = registrar(main_uas("main_uas"))
    assert options(reg.addr, transport="UDP") == 200
    assert options(reg.addr, transport="TCP") == 200


def _register_bytes(local: tuple[str, int], transport: str = "UDP", drop: str | None = None) -> bytes:
    msg = sip_request(
        "REGISTER",
        "sip:example.test",
        local,
        transport=transport,
        from_uri="sip:bob@example.test",
        to_uri="sip:bob@example.test",
        headers=[("Contact", f"<sip:bob@{local[0]}:{local[1]}>;expires=60")],
    ).decode()
    if drop:
        msg = "".join(line for line in msg.splitlines(keepends=True) if not line.lower().startswith(drop))
    return msg.encode()


def _udp_collect(dest: tuple[str, int], data: bytes, wait: float = 1.5) -> tuple[list[int | None], int]:
    """Send one datagram; collect every reply for `wait` seconds; return (codes, local port)."""
    codes: list[int | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.sendto(data, dest)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                reply, _ = s.recvfrom(65535)
            except TimeoutError:
                break
            codes.append(status_code(reply))
        return codes, s.getsockname()[1]


BAD_DATAGRAMS: dict[str, Callable[[tuple[str, int]], bytes]] = {
    "garbage": lambda local: bytes(range(256)) * 4,
    "text-garbage": lambda local: b"hello, this is not SIP at all\r\n\r\n",
    "truncated": lambda local: _register_bytes(local)[:90],
    "truncated-headers": lambda local: _register_bytes(local).split(b"\r\nCSeq")[0],
    "oversized-60k": lambda local: (
        b"REGISTER sip:example.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-x\r\nX-Pad: "
        + b"a" * 60000
    ),
    "no-call-id": lambda local: _register_bytes(local, drop="call-id"),
}


@pytest.mark.parametrize("name", list(BAD_DATAGRAMS))
def test_bad_datagram_then_still_serving(main_uas, registrar, name):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        local = probe.getsockname()
    data = BAD_DATAGRAMS[name](local)
    codes, _ = _udp_collect(reg.addr, data)
    if name == "no-call-id":
        assert codes == [400], f"a REGISTER without Call-ID must get exactly one 400, got {codes}\n" + diag(
            reg
        )
    else:
        assert all(c in (400, 413, 513) for c in codes), f"{name}: only 400 (or nothing) allowed, got {codes}"
    assert reg.proc is not None and reg.proc.poll() is None, "the process died\n" + diag(reg)
    assert options(reg.addr) == 200, f"after {name}: OPTIONS must still get 200\n" + diag(reg)
    assert not received_registers(uas), "nothing malformed may be relayed to main"


TCP_BAD: dict[str, Callable[[tuple[str, int]], bytes]] = {
    "content-length-not-a-number": lambda local: _register_bytes(local, "TCP").replace(
        b"Content-Length: 0", b"Content-Length: zero"
    ),
    "content-length-too-small": lambda local: (
        _register_bytes(local, "TCP")
        .replace(b"Content-Length: 0", b"Content-Length: 4")
        .replace(
            b"\r\n\r\n", b"\r\nContent-Type: text/plain\r\n\r\nthis body is longer than four bytes\r\n\r\n"
        )
    ),
    "content-length-negative": lambda local: _register_bytes(local, "TCP").replace(
        b"Content-Length: 0", b"Content-Length: -5"
    ),
}


@pytest.mark.parametrize("name", list(TCP_BAD))
def test_tcp_wrong_content_length_then_still_serving(main_uas, registrar, name):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    codes: list[int | None] = []
    with socket.create_connection(reg.addr, timeout=3) as s:
        s.sendall(TCP_BAD[name](s.getsockname()))
        buf = bytearray()
        deadline = time.monotonic() + 1.5
        while (left := deadline - time.monotonic()) > 0:
            msg = read_sip_stream_message(s, buf, left)
            if msg is None:
                break
            codes.append(status_code(msg))
    if name == "content-length-too-small":
        # The REGISTER with a 4-byte body is a valid message and may be relayed (any answer to it is fine);
        # the bytes after it are garbage: only 400 or a closed connection.
        codes = codes[1:] if codes and codes[0] != 400 else codes
    assert all(c == 400 for c in codes), f"{name}: only 400 (or a closed connection) allowed, got {codes}"
    assert reg.proc is not None and reg.proc.poll() is None, "the process died\n" + diag(reg)
    assert options(reg.addr, transport="TCP") == 200, f"after {name}: TCP OPTIONS\n" + diag(reg)
    assert options(reg.addr, transport="UDP") == 200, f"after {name}: UDP OPTIONS\n" + diag(reg)


# -------------------------------------------------------------------------------------- process life


def test_ready_line_and_sigterm_exits_0(main_uas, registrar):
    reg = registrar(main_uas("main_uas"))
    assert reg.readyz() == 200
    assert reg.ready_line() is not None, "one log line when ready\n" + diag(reg)
    assert reg.proc is not None
    reg.proc.send_signal(signal.SIGTERM)
    try:
        rc = reg.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("no exit within 15 s of SIGTERM\n" + diag(reg))
    assert rc == 0, f"SIGTERM must drain and exit 0, got {rc}\n" + diag(reg)


@pytest.mark.parametrize(
    "bad",
    [
        ["--mode", "bogus"],
        ["--listen", "nonsense"],
        ["--main-registrar", "http://example.test"],
        ["--t1", "-1"],
        ["--no-such-option"],
    ],
    ids=["mode", "listen", "main-registrar", "t1", "unknown"],
)
def test_bad_option_exits_2_with_one_line(bad):
    port = free_port()
    argv = [
        *registrar_argv(),
        "run",
        "--listen",
        f"udp:{LOOPBACK}:{port}",
        "--main-registrar",
        f"sip:{LOOPBACK}:9",
        "--store",
        "memory",
        *bad,
    ]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    err = p.stderr.strip()
    assert p.returncode == 2, f"{bad}: exit code {p.returncode}, stderr:\n{p.stderr}"
    assert err and "\n" not in err, f"{bad}: want a one-line reason on stderr, got:\n{p.stderr}"


# ----------------------------------------------------------------------------------- more of mode 0


def test_second_device_gets_own_ctid_and_both_listed(main_uas, registrar, tmp_path):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    a = sipp_phone("phone_register_once", reg, tmp_path, expires=300)
    b = sipp_phone("phone_register_once", reg, tmp_path, expires=300)
    assert reply_code(a) == 200 and reply_code(b) == 200, diag(a, b, reg)
    got = received_registers(uas)
    ctids = [m["ctid"] for r in got if (m := CT_RE.match(r["contact"]))]
    assert len(ctids) == 2 and ctids[0] != ctids[1], f"two devices need two contact ids: {got}"
    final = b.messages[b.messages.rfind("SIP/2.0 200 ") :]
    for port in (phone_port(a), phone_port(b)):
        assert f"<sip:alice@127.0.0.1:{port}>" in final, f"the 200 must list both devices:\n{final[:1500]}"


def test_retransmitted_register_is_absorbed(main_uas, registrar):
    uas = main_uas("main_uas")
    reg = registrar(uas)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        msg = _register_bytes(s.getsockname())
        s.sendto(msg, reg.addr)
        time.sleep(0.05)
        s.sendto(msg, reg.addr)
        codes = []
        deadline = time.monotonic() + 2.0
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                codes.append(status_code(s.recvfrom(65535)[0]))
            except TimeoutError:
                break
    assert 200 in codes, f"the REGISTER must be answered 200: {codes}\n" + diag(reg)
    assert len(received_registers(uas)) == 1, (
        "a retransmission must not be relayed again (server transaction)"
    )


def test_http_endpoints(main_uas, registrar, tmp_path):
    import urllib.request

    reg = registrar(main_uas("main_uas"))
    phone = sipp_phone("phone_register_once", reg, tmp_path)
    assert reply_code(phone) == 200, diag(phone, reg)
    base = f"http://{LOOPBACK}:{reg.http_port}"
    with urllib.request.urlopen(base + "/healthz", timeout=3) as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/metrics", timeout=3) as r:
        body = r.read().decode()
    assert "midregistrar_" in body, "metrics use the midregistrar_ prefix"
    assert "REGISTER" in body, "requests are counted by method"


# ------------------------------------------------------------------ Kamailio as the main registrar


def test_kamailio_main_registrar_with_digest_and_call(registrar, tmp_path):
    """Phone → mid-registrar → Kamailio registrar (digest auth); then Kamailio routes a call to the phone."""
    kam = Kamailio(
        REPO / "bench" / "kamailio" / "registrar.cfg",
        defines={"WITH_AUTH": 1, "AUTH_PASSWORD": '"s3cret"'},
        workdir=tmp_path / "kamailio",
    ).start()
    try:
        reg = registrar((LOOPBACK, kam.port))
        phone = Sipp(
            "phone_register_auth",
            reg.addr,
            keys={"user": "alice", "password": "s3cret", "domain": "example.test", "expires": 300},
            calls=1,
            extra=["-oocsf", str(SCENARIOS / "phone_answer_ooc.xml"), "-d", "30000"],
            workdir=tmp_path / "phone",
        ).start()
        logs = phone.workdir / "logs.log"
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and "REPLY code=200" not in (
                logs.read_text() if logs.exists() else ""
            ):
                time.sleep(0.1)
            assert "REPLY code=200" in (logs.read_text() if logs.exists() else ""), (
                "digest REGISTER through the mid-registrar to Kamailio failed\n"
                + diag(reg, kam.log()[-3000:])
            )
            caller = run_sipp(
                "main_invite_uac",
                (LOOPBACK, kam.port),
                keys={"ruri": "sip:alice@example.test", "caller": "pbx"},
                calls=1,
                wait=40,
                workdir=tmp_path / "caller",
                extra=["-recv_timeout", "20000"],
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "CALL done" not in logs.read_text():
                time.sleep(0.1)
        finally:
            ph = phone.stop()
    finally:
        kam.stop()
    info = diag(caller, ph, reg, "--- kamailio ---", kam.log()[-3000:])
    assert any(line.startswith("CHALLENGE code=401") for line in ph.logs), (
        "Kamailio's 401 must reach the phone"
    )
    assert caller.returncode == 0, "call from the main registrar to the phone must complete\n" + info
    assert any(line.startswith("CALL done") for line in ph.logs), info
