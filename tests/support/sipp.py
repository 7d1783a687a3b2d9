"""SIPp runs: one process per run (stopped with SIGINT, which keeps its traces), its traces (message log,
`<log>` actions, statistics CSV, response times) in a private work directory, read back by `SippResult`; the
scenarios are the XML files in `scenarios/` next to this module."""

from __future__ import annotations

import contextlib
import csv
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from registrar.sip.transport import ip_reference
from tests.support import REPO
from tests.support.kamailio import kamailio_binary
from tests.support.ports import free_port, wait_port
from tests.support.process import Proc
from tests.support.sip import LOOPBACK, SipMessage

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def sipp_binary() -> str | None:
    return shutil.which("sipp")


def ensure_sip_tools() -> bool:
    """Install SIPp and Kamailio with scripts/install-sip-tools.sh when missing; True when both exist."""
    if sipp_binary() and kamailio_binary():
        return True
    script = REPO / "scripts" / "install-sip-tools.sh"
    if script.exists():
        subprocess.run(["bash", str(script)], check=False, timeout=600)
    return bool(sipp_binary() and kamailio_binary())


@dataclass
class SippResult:
    """What one SIPp run wrote into its work directory (read when asked: also while it still runs)."""

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


class Sipp:
    """One SIPp process. All trace files land in `workdir` under fixed names (see `SippResult`); `scenario` is
    a path or the name of a file in `scenarios/`."""

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
            argv.append(f"{ip_reference(remote[0])}:{remote[1]}")
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

    def traces(self) -> SippResult:
        """What SIPp has written so far (it may still be running)."""
        assert self.proc is not None
        return SippResult(
            returncode=self.proc.returncode,
            workdir=self.workdir,
            argv=self.argv,
            stdout=self.proc.stdout() if self.keep_stdout else "",
            stderr=self.proc.stderr(),
        )

    def log_lines(self, prefix: str = "") -> list[str]:
        """The scenario's `<log>` lines so far that start with `prefix`."""
        return [ln for ln in self.traces().logs if ln.startswith(prefix)]

    def _collect(self) -> SippResult:
        assert self.proc is not None
        # -trace_rtt has no file-name option: SIPp writes <scenario>_<pid>_rtt.csv in its cwd.
        for f in self.workdir.glob(f"*_{self.proc.pid}_rtt.csv"):
            target = self.workdir / "rtt.csv"
            if not target.exists():
                f.rename(target)
        self.result = self.traces()
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


def parse_trace(text: str) -> list[SipMessage]:
    """SIPp's -trace_msg file: blocks "---- date\\nUDP message received [n] bytes :\\n\\n<message>"."""
    out: list[SipMessage] = []
    for block in re.split(r"(?m)^-{20,}.*$", text):
        m = re.search(r"message (received|sent)[^\n]*\n", block)
        if not m:
            continue
        body = block[m.end() :].strip("\r\n")
        if body:
            out.append(SipMessage(m.group(1), body))
    return out
