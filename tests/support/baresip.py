"""baresip (Debian's `baresip-core`) as a real SIP phone on loopback: its config folder written by the test, run
headless (a sine tone as microphone, an in-process bridge as speaker, no UI module), stopped by its PID."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.sip import LOOPBACK

MODULE_PATH = Path("/usr/lib/baresip/modules")
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-sip-tools.sh"


def baresip_binary() -> str | None:
    return shutil.which("baresip")


def ensure_baresip() -> bool:
    """Install baresip with scripts/install-sip-tools.sh when missing; True when it is there."""
    if baresip_binary() is None and INSTALL_SCRIPT.exists():
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False, timeout=600)
    return baresip_binary() is not None


@dataclass
class Baresip:
    """One baresip process with one account (`account`: a line of baresip's accounts file, e.g.
    ``<sip:alice@example.com;transport=tls>;regint=30``). `cafile` becomes ``sip_cafile``, the CA for TLS
    servers (baresip 1.0 loads it but does not verify a server with it); `trace` adds ``-s``: every SIP
    message it sends or receives, with the transport and both addresses, in its log."""

    account: str
    workdir: Path | None = None
    cafile: Path | None = None
    sip_port: int = 0
    trace: bool = True
    extra_config: Sequence[str] = ()
    proc: Proc | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if baresip_binary() is None:
            raise RuntimeError("baresip not found: run `make sip-tools` (Debian package baresip-core)")
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="baresip-"))
        self.sip_port = self.sip_port or free_port()
        self.confdir = self.workdir / "conf"
        self.confdir.mkdir(parents=True, exist_ok=True)
        (self.confdir / "config").write_text("\n".join(self.config_lines()) + "\n")
        (self.confdir / "accounts").write_text(self.account + "\n")
        # Present and empty: baresip would otherwise write its template with three example contacts.
        (self.confdir / "contacts").write_text("")

    def config_lines(self) -> list[str]:
        """baresip's `config`: only what this test phone needs, every module named (baresip loads no other)."""
        lines = [
            "poll_method epoll",
            f"net_interface {LOOPBACK}",  # its SDP offers loopback for audio too, not the host's first interface
            f"sip_listen {LOOPBACK}:{self.sip_port}",
            "call_local_timeout 120",
            "call_max_calls 4",
            # No sound card: a sine tone is the microphone, the bridge swallows what it would play.
            "audio_source ausine,440",
            # ausine makes only 48 kHz stereo; baresip resamples that to the codec's 8 kHz mono.
            "ausrc_srate 48000",
            "ausrc_channels 2",
            "audio_player aubridge,nil",
            "audio_alert aubridge,nil",
            "audio_level no",
            "rtp_stats no",
            f"module_path {MODULE_PATH}",
            "module g711.so",
            "module ausine.so",
            "module aubridge.so",
            "module_tmp uuid.so",
            "module_tmp account.so",
            "module_app menu.so",  # answers a call itself when the account says answermode=auto
        ]
        if self.cafile is not None:
            lines.append(f"sip_cafile {self.cafile}")
        return [*lines, *self.extra_config]

    @property
    def argv(self) -> list[str]:
        exe = baresip_binary()
        assert exe is not None
        return [exe, "-f", str(self.confdir), *(["-s"] if self.trace else [])]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Baresip:
        assert self.workdir is not None
        self.proc = Proc(self.argv, self.workdir, "baresip")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop(timeout)

    def log(self) -> str:
        """What it printed so far (stdout then stderr): its events and, with `trace`, the SIP messages."""
        return self.proc.output() if self.proc else ""

    def __enter__(self) -> Baresip:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
