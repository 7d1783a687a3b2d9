"""Run real SIP peers (SIPp, Kamailio, the `midregistrar` CLI) as processes on loopback.

Used by the integration tests and by `bench/run.py`. Everything here is plain subprocess and socket code:
- `free_port()` / `free_ports()`: loopback ports free for both UDP and TCP;
- `Proc`: a child process with its output in files, stopped by PID (terminate, then kill);
- `Sipp`: one SIPp run (stopped with SIGINT, which keeps its traces) with its traces (message log, `<log>` actions, statistics CSV, response times)
  collected in a private work directory; `SippResult` parses them;
- `Kamailio`: Kamailio in the foreground (`-DD -E`) with its own runtime dir, a config file written to a
  temporary directory, loopback only;
- `Registrar`: `midregistrar run …` as a subprocess, waiting for its ready line or `/readyz`;
- small raw-socket helpers: `sip_request()`, `options()`, `udp_exchange()`, `tcp_exchange()`;
- `tree_cpu_seconds()`: utime+stime of a process and its descendants from /proc.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.ports when a bench script imports this module

from tests.ports import free_port as free_port  # noqa: E402  (tests and benches take ports from here)

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sipp_binary() -> str | None:
    return shutil.which("sipp")


def kamailio_binary() -> str | None:
    found = shutil.which("kamailio")
    if found:
        return found
    return "/usr/sbin/kamailio" if os.access("/usr/sbin/kamailio", os.X_OK) else None


def ensure_sip_tools() -> bool:
    """Install SIPp and Kamailio with scripts/install-sip-tools.sh when missing; True when both exist."""
    if sipp_binary() and kamailio_binary():
        return True
    script = REPO / "scripts" / "install-sip-tools.sh"
    if script.exists():
        subprocess.run(["bash", str(script)], check=False, timeout=600)
    return bool(sipp_binary() and kamailio_binary())


# ---------------------------------------------------------------------------------------------- ports


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    return [free_port(host) for _ in range(n)]


def _proc_net_ports(kind: str) -> set[int]:
    """Local ports bound (UDP) or listening (TCP) on IPv4, from /proc/net/{udp,tcp}."""
    ports: set[int] = set()
    try:
        lines = Path(f"/proc/net/{kind}").read_text().splitlines()[1:]
    except OSError:
        return ports
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        port = int(parts[1].rsplit(":", 1)[1], 16)
        if kind == "tcp" and parts[3] != "0A":  # LISTEN
            continue
        ports.add(port)
    return ports


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the IPv4 UDP socket(s) bound to `port` (receive buffer full)."""
    total = 0
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) >= 13 and int(parts[1].rsplit(":", 1)[1], 16) == port:
            total += int(parts[-1])
    return total


def port_bound(port: int, kind: str = "udp") -> bool:
    return port in _proc_net_ports(kind)


def wait_port(port: int, kind: str = "udp", timeout: float = 10.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_bound(port, kind):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.returncode} before binding {kind}/{port}:\n{proc.tail()}"
            )
        time.sleep(0.02)
    raise TimeoutError(f"nothing bound {kind}/{port} within {timeout} s")


# ------------------------------------------------------------------------------------------ processes


class Proc:
    """A child process in its own session, output to files in `workdir`, stopped by its PID only."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        name: str,
        env: Mapping[str, str] | None = None,
        stdout: bool = True,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        out = open(self.stdout_path, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
        err = open(self.stderr_path, "wb")  # noqa: SIM115
        try:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
            err.close()
        self.pid = self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 5.0, first: int = signal.SIGTERM) -> int:
        """Send `first` (SIGTERM), wait, then SIGKILL; then reap any children left in its process group."""
        if self.popen.poll() is None:
            self.send_signal(first)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.popen.wait(timeout)
        # Children (Kamailio's workers) share the session we created for this PID: kill what is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.returncode

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 40) -> str:
        text = (self.stdout() + "\n" + self.stderr()).strip().splitlines()
        return "\n".join(text[-n:])

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process (all its threads), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the comm field: state(0) ppid(1) … utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its live descendants (Kamailio's workers), seconds."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


# -------------------------------------------------------------------------------------- raw SIP I/O


def sip_request(
    method: str,
    ruri: str,
    local: tuple[str, int],
    *,
    transport: str = "UDP",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    call_id: str | None = None,
    cseq: int = 1,
    from_uri: str = "sip:probe@127.0.0.1",
    to_uri: str | None = None,
) -> bytes:
    """A well-formed request (Via/From/To/Call-ID/CSeq/Max-Forwards/Content-Length) as bytes."""
    branch = "z9hG4bK-" + uuid.uuid4().hex[:16]
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};rport;branch={branch}",
        "Max-Forwards: 70",
        f"From: <{from_uri}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <{to_uri or ruri}>",
        f"Call-ID: {call_id or uuid.uuid4().hex + '@127.0.0.1'}",
        f"CSeq: {cseq} {method}",
    ]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status_code(data: bytes | None) -> int | None:
    if not data:
        return None
    m = re.match(rb"SIP/2\.0 (\d{3}) ", data)
    return int(m.group(1)) if m else None


def udp_exchange(
    dest: tuple[str, int],
    data: bytes,
    timeout: float = 2.0,
    sock: socket.socket | None = None,
    final_only: bool = True,
) -> bytes | None:
    """Send one datagram, return the first (final, unless final_only=False) response or None on timeout."""
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if own:
            s.bind((LOOPBACK, 0))
        s.sendto(data, dest)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            try:
                reply, _ = s.recvfrom(65535)
            except TimeoutError:
                return None
            code = status_code(reply)
            if not final_only or code is None or code >= 200:
                return reply
    finally:
        if own:
            s.close()


def options(dest: tuple[str, int], timeout: float = 2.0, transport: str = "UDP") -> int | None:
    """Send OPTIONS addressed to `dest` itself; return the final status code or None."""
    ruri = f"sip:{dest[0]}:{dest[1]}"
    if transport.upper() == "TCP":
        with socket.create_connection(dest, timeout=timeout) as s:
            local = s.getsockname()
            msg = sip_request(
                "OPTIONS", ruri, local, transport="TCP", headers=[("Accept", "application/sdp")]
            )
            return status_code(tcp_exchange_on(s, msg, timeout))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        msg = sip_request("OPTIONS", ruri, s.getsockname(), headers=[("Accept", "application/sdp")])
        return status_code(udp_exchange(dest, msg, timeout, sock=s))


def read_sip_stream_message(s: socket.socket, buf: bytearray, timeout: float) -> bytes | None:
    """Read one Content-Length framed SIP message from a stream socket (None on timeout/close)."""
    deadline = time.monotonic() + timeout
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = bytes(buf[:head_end])
            m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
            length = int(m.group(1)) if m else 0
            total = head_end + 4 + length
            if len(buf) >= total:
                msg = bytes(buf[:total])
                del buf[:total]
                return msg
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            chunk = s.recv(65535)
        except (TimeoutError, ConnectionError):
            return None
        if not chunk:
            return None
        buf.extend(chunk)


def tcp_exchange_on(s: socket.socket, data: bytes, timeout: float = 2.0) -> bytes | None:
    s.sendall(data)
    buf = bytearray()
    while True:
        msg = read_sip_stream_message(s, buf, timeout)
        if msg is None:
            return None
        code = status_code(msg)
        if code is None or code >= 200:
            return msg


def tcp_exchange(dest: tuple[str, int], data: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.create_connection(dest, timeout=timeout) as s:
        return tcp_exchange_on(s, data, timeout)


def wait_sip_ready(dest: tuple[str, int], timeout: float = 10.0, proc: Proc | None = None) -> int:
    """Poll with OPTIONS until any final response comes back; return its status code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}:\n{proc.tail()}")
        code = options(dest, timeout=0.3)
        if code is not None:
            return code
    raise TimeoutError(f"no SIP answer from {dest} within {timeout} s")


# ------------------------------------------------------------------------------------------------ SIPp


@dataclass
class SippResult:
    returncode: int | None
    workdir: Path
    argv: list[str]
    stdout: str = ""
    stderr: str = ""

    def _read(self, name: str) -> str:
        p = self.workdir / name
        try:
            return p.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def messages(self) -> str:
        """Every message sent and received (`-trace_msg`)."""
        return self._read("messages.log")

    @property
    def logs(self) -> list[str]:
        """Lines written by the scenario's `<log>` actions (`-trace_logs`)."""
        return [ln for ln in self._read("logs.log").splitlines() if ln.strip()]

    @property
    def errors(self) -> str:
        return self._read("errors.log")

    @property
    def screen(self) -> str:
        return self._read("screen.log")

    def log_values(self, key: str) -> list[str]:
        """Values of `KEY=value` tokens in `<log>` lines, e.g. log_values("contact")."""
        out = []
        for line in self.logs:
            m = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", line)
            if m:
                out.append(m.group(1))
        return out

    def stat_rows(self) -> list[dict[str, str]]:
        text = self._read("stat.csv")
        if not text.strip():
            return []
        return list(csv.DictReader(text.splitlines(), delimiter=";"))

    def stat(self, column: str, row: int = -1) -> str | None:
        rows = self.stat_rows()
        if not rows:
            return None
        return rows[row].get(column)

    def counter(self, column: str) -> int:
        """A cumulative counter from the last statistics row, e.g. "SuccessfulCall(C)"."""
        value = self.stat(column)
        return int(value) if value not in (None, "") else 0

    @property
    def successful(self) -> int:
        return self.counter("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.counter("FailedCall(C)")

    @property
    def retransmissions(self) -> int:
        return self.counter("Retransmissions(C)")

    def response_times_ms(self) -> list[float]:
        """Every response time recorded by `-trace_rtt` (ms), in arrival order."""
        out = []
        for line in self._read("rtt.csv").splitlines():
            parts = line.split(";")
            if len(parts) >= 2:
                with contextlib.suppress(ValueError):
                    out.append(float(parts[1]))
        return out

    def rtt_rows(self) -> list[tuple[float, float]]:
        """(timestamp ms since epoch, response time ms) pairs from `-trace_rtt`."""
        out = []
        for line in self._read("rtt.csv").splitlines():
            parts = line.split(";")
            if len(parts) >= 2:
                with contextlib.suppress(ValueError):
                    out.append((float(parts[0]), float(parts[1])))
        return out

    def describe(self) -> str:
        return (
            f"sipp rc={self.returncode} argv={' '.join(self.argv)}\n"
            f"--- stderr ---\n{self.stderr[-3000:]}\n--- errors ---\n{self.errors[-3000:]}\n"
            f"--- logs ---\n" + "\n".join(self.logs[-40:]) + f"\n--- messages ---\n{self.messages[-6000:]}"
        )


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


class Sipp:
    """One SIPp process. All trace files land in `workdir` under fixed names (see `SippResult`)."""

    def __init__(
        self,
        scenario: str | Path,
        remote: tuple[str, int] | None = None,
        *,
        port: int | None = None,
        local_ip: str = LOOPBACK,
        transport: str = "u1",
        keys: Mapping[str, object] | None = None,
        sets: Mapping[str, object] | None = None,
        calls: int | None = None,
        rate: float | None = None,
        rate_period_ms: int | None = None,
        limit: int | None = None,
        timeout_s: float | None = None,
        inf: str | Path | None = None,
        trace_msg: bool = True,
        trace_logs: bool = True,
        trace_stat: bool = True,
        trace_rtt: bool = False,
        rtt_freq: int = 1000,
        stat_freq_s: int = 1,
        send_bye_on_abort: bool = False,
        buff_size: int | None = None,
        extra: Sequence[str] = (),
        workdir: Path | None = None,
        name: str | None = None,
        keep_stdout: bool = False,
    ) -> None:
        exe = sipp_binary()
        if exe is None:
            raise RuntimeError("sipp not found: run `make sip-tools`")
        path = Path(scenario)
        if not path.is_absolute() and not path.exists():
            path = SCENARIOS / (path.name if path.suffix else f"{path.name}.xml")
        self.scenario = path
        self.name = name or path.stem
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"sipp-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        argv: list[str] = [exe]
        if remote is not None:
            argv.append(f"{remote[0]}:{remote[1]}")
        argv += ["-sf", str(path), "-i", local_ip, "-p", str(self.port), "-t", transport, "-nostdin"]
        for k, v in (keys or {}).items():
            argv += ["-key", k, str(v)]
        for k, v in (sets or {}).items():
            argv += ["-set", k, str(v)]
        if calls is not None:
            argv += ["-m", str(calls)]
        if rate is not None:
            argv += ["-r", str(rate)]
        if rate_period_ms is not None:
            argv += ["-rp", str(rate_period_ms)]
        if limit is not None:
            argv += ["-l", str(limit)]
        if timeout_s is not None:
            argv += ["-timeout", f"{timeout_s}s", "-timeout_error"]
        if inf is not None:
            argv += ["-inf", str(inf)]
        if buff_size is not None:
            argv += ["-buff_size", str(buff_size)]
        if trace_msg:
            argv += ["-trace_msg", "-message_file", "messages.log"]
        if trace_logs:
            argv += ["-trace_logs", "-log_file", "logs.log"]
        if trace_stat:
            argv += ["-trace_stat", "-stf", "stat.csv", "-fd", str(stat_freq_s)]
        if trace_rtt:
            # SIPp writes response times in batches of rtt_freq (the last partial batch is lost) with
            # millisecond resolution; the statistics CSV has the mean in microseconds.
            argv += ["-trace_rtt", "-rtt_freq", str(rtt_freq)]
        if not send_bye_on_abort:
            # SIPp's default answer to a failed REGISTER "call" is a BYE: noise for the system under test.
            argv += ["-default_behaviors", "all,-bye"]
        argv += ["-trace_err", "-error_file", "errors.log", "-trace_screen", "-screen_file", "screen.log"]
        argv += list(extra)
        self.argv = argv
        self.proc: Proc | None = None
        self.keep_stdout = keep_stdout
        self.result: SippResult | None = None

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def start(self) -> Sipp:
        self.proc = Proc(self.argv, self.workdir, "sipp", stdout=self.keep_stdout)
        return self

    def wait_bound(self, timeout: float = 5.0) -> Sipp:
        """Wait until SIPp's own UDP/TCP socket is bound (a UAS is then ready to receive)."""
        assert self.proc is not None
        kind = "tcp" if self.argv[self.argv.index("-t") + 1].startswith("t") else "udp"
        wait_port(self.port, kind, timeout, self.proc)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _collect(self) -> SippResult:
        assert self.proc is not None
        # -trace_rtt has no file-name option: SIPp writes <scenario>_<pid>_rtt.csv in its cwd.
        for f in self.workdir.glob(f"*_{self.proc.pid}_rtt.csv"):
            target = self.workdir / "rtt.csv"
            if not target.exists():
                f.rename(target)
        self.result = SippResult(
            returncode=self.proc.returncode,
            workdir=self.workdir,
            argv=self.argv,
            stdout=self.proc.stdout() if self.keep_stdout else "",
            stderr=self.proc.stderr(),
        )
        return self.result

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to finish by itself (scenario done, -m reached or -timeout); kill on `timeout`."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.stop(first=signal.SIGINT)
        return self._collect()

    def stop(self, timeout: float = 5.0) -> SippResult:
        """Stop SIPp now: SIGINT (SIPp exits at once and still writes its traces and statistics; SIGUSR1
        would wait for running calls, which a looping UAS never ends), then SIGKILL after `timeout`."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.stop(timeout=timeout, first=signal.SIGINT)
        return self._collect()

    def __enter__(self) -> Sipp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.result is None:
            self.stop()


def run_sipp(
    scenario: str | Path, remote: tuple[str, int] | None = None, *, wait: float = 60.0, **kwargs: object
) -> SippResult:
    """Start SIPp and wait for it to finish (at most `wait` seconds)."""
    s = Sipp(scenario, remote, **kwargs)  # type: ignore[arg-type]
    s.start()
    return s.wait(wait)


# -------------------------------------------------------------------------------------------- Kamailio


@dataclass
class Kamailio:
    """Kamailio in the foreground, loopback only, own runtime dir, config copied/written to `workdir`.

    `config` is a path (e.g. bench/kamailio/proxy.cfg) or the text of a config; `defines` become
    `-A NAME=value` pre-processor defines (use `'"text"'` for a string value).
    """

    config: str | Path
    port: int = 0
    defines: Mapping[str, object] = field(default_factory=dict)
    children: int | None = None
    shm_mb: int = 256
    pkg_mb: int = 16
    workdir: Path | None = None
    proc: Proc | None = None
    # The address it listens on (configs that read the LISTEN_IP define; the others listen on loopback).
    listen_ip: str = LOOPBACK

    def __post_init__(self) -> None:
        if kamailio_binary() is None:
            raise RuntimeError("kamailio not found: run `make sip-tools`")
        self.port = self.port or free_port()
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="kamailio-"))
        self.rundir = self.workdir / "run"
        self.rundir.mkdir(parents=True, exist_ok=True)
        cfg = Path(str(self.config)) if "\n" not in str(self.config) else None
        self.cfg_path = self.workdir / "kamailio.cfg"
        if cfg is not None and cfg.exists():
            shutil.copyfile(cfg, self.cfg_path)
        else:
            self.cfg_path.write_text(str(self.config))

    @property
    def argv(self) -> list[str]:
        exe = kamailio_binary()
        assert exe is not None
        argv = [
            exe,
            "-DD",
            "-E",
            "-f",
            str(self.cfg_path),
            "-Y",
            str(self.rundir),
            "-w",
            str(self.rundir),
            "-P",
            str(self.rundir / "kamailio.pid"),
            "-m",
            str(self.shm_mb),
            "-M",
            str(self.pkg_mb),
            "-A",
            f"SIP_PORT={self.port}",
        ]
        if self.children is not None:
            argv += ["-A", f"CHILDREN={self.children}"]
        if self.listen_ip != LOOPBACK:
            argv += ["-A", f"LISTEN_IP={self.listen_ip}"]
        for k, v in self.defines.items():
            argv += ["-A", f"{k}={v}"]
        return argv

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self) -> subprocess.CompletedProcess[str]:
        """`kamailio -c`: syntax-check the config with the same defines."""
        return subprocess.run([*self.argv, "-c"], capture_output=True, text=True, timeout=30, check=False)

    def start(self, ready_timeout: float = 15.0) -> Kamailio:
        assert self.workdir is not None
        self.proc = Proc(self.argv, self.workdir, "kamailio")
        wait_port(self.port, "udp", ready_timeout, self.proc)
        wait_sip_ready((self.listen_ip, self.port), ready_timeout, self.proc)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop(timeout)

    def log(self) -> str:
        return self.proc.stderr() if self.proc else ""

    def __enter__(self) -> Kamailio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------- the registrar CLI


def registrar_argv() -> list[str]:
    """How to start the CLI: $MIDREG_TEST_CLI (a command line, to test another build) when set, else the
    venv's console script when present, else `python -m registrar`."""
    override = os.environ.get("MIDREG_TEST_CLI")
    if override:
        return shlex.split(override)
    exe = Path(sys.executable).with_name("midregistrar")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "registrar"]


READY_RE = re.compile(r"\bready\b", re.IGNORECASE)


class Registrar:
    """`midregistrar run …` on loopback ports; ready when /readyz answers 200 (or a ready log line)."""

    def __init__(
        self,
        main: tuple[str, int] | None,
        *,
        mode: str = "mirror",
        port: int | None = None,
        http_port: int | None = None,
        transports: Sequence[str] = ("udp", "tcp"),
        extra: Sequence[str] = (),
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="midreg-"))
        argv = [*registrar_argv(), "run"]
        for t in transports:
            argv += ["--listen", f"{t}:{LOOPBACK}:{self.port}"]
        if main is not None:
            argv += ["--main-registrar", f"sip:{main[0]}:{main[1]}"]
        argv += ["--mode", mode, "--store", "memory", "--http", f"{LOOPBACK}:{self.http_port}"]
        argv += list(extra)
        self.argv = argv
        self.env = dict(env or {})
        self.proc: Proc | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def readyz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}/readyz", timeout=0.5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (OSError, ValueError, http.client.HTTPException):
            # Not listening yet. HTTPException too: polling a port nobody has bound yet can connect the
            # socket to itself (same source and destination port) and read back its own request.
            return None

    def ready_line(self) -> str | None:
        if self.proc is None:
            return None
        for line in (self.proc.stdout() + "\n" + self.proc.stderr()).splitlines():
            if READY_RE.search(line):
                return line
        return None

    def start(self, ready_timeout: float = 15.0) -> Registrar:
        self.proc = Proc(self.argv, self.workdir, "midregistrar", env=self.env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"midregistrar exited with {self.proc.returncode}:\n{self.proc.tail()}")
            if self.readyz() == 200 and (port_bound(self.port, "udp") or port_bound(self.port, "tcp")):
                return self
            time.sleep(0.05)
        self.proc.stop()
        raise TimeoutError(f"midregistrar not ready within {ready_timeout} s:\n{self.proc.tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop(timeout)

    def log(self) -> str:
        return self.proc.tail(200) if self.proc else ""

    def __enter__(self) -> Registrar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
