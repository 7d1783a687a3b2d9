"""Kamailio on loopback: as a relay or registrar of the benchmarks (bench/kamailio/*.cfg) and as the main
registrar behind the mid-registrar (`KamailioMain`, main_registrar.cfg next to this module), read through its
control socket with kamcmd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from registrar.sip.transport import ip_reference
from tests.support.ports import free_port, wait_port
from tests.support.process import Proc
from tests.support.sip import LOOPBACK, wait_sip_ready
from tests.support.wait import poll

MAIN_CFG = Path(__file__).resolve().parent / "main_registrar.cfg"
COUNTERS = ("reg_total", "reg_challenged", "reg_saved", "dereg_trusted")


def kamailio_binary() -> str | None:
    found = shutil.which("kamailio")
    if found:
        return found
    return "/usr/sbin/kamailio" if os.access("/usr/sbin/kamailio", os.X_OK) else None


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
            argv += ["-A", f"LISTEN_IP={ip_reference(self.listen_ip)}"]
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


def kamcmd_binary() -> str | None:
    found = shutil.which("kamcmd")
    if found:
        return found
    return "/usr/sbin/kamcmd" if Path("/usr/sbin/kamcmd").exists() else None


@dataclass
class UlContact:
    aor: str
    address: str
    expires: int
    call_id: str
    cseq: int


class KamailioMain:
    """Kamailio started from main_registrar.cfg (next to this module) with a binrpc control socket in its work
    dir; `counters()` and `contacts()` read it with kamcmd (stats.get_statistics, ul.dump)."""

    def __init__(
        self,
        workdir: Path,
        *,
        mid_port: int | None = None,
        auth: bool = True,
        password: str = "s3cret",
        quiet: bool = False,
        children: int | None = None,
        config: Path = MAIN_CFG,
        extra_defines: Mapping[str, object] | None = None,
        listen_ip: str = LOOPBACK,
        mid_ip: str = LOOPBACK,
    ) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.ctl = workdir / "ctl.sock"
        defines: dict[str, object] = {"CTL_SOCK": f'"unix:{self.ctl}"', "AUTH_PASSWORD": f'"{password}"'}
        if mid_port is not None:
            defines["MID_IP"] = f'"{mid_ip}"'
            defines["MID_PORT"] = mid_port
        if not auth:
            defines["NO_AUTH"] = 1
        if quiet:
            defines["QUIET"] = 1
        defines.update(extra_defines or {})
        self.password = password
        self.kam = Kamailio(config, defines=defines, children=children, workdir=workdir, listen_ip=listen_ip)

    @property
    def port(self) -> int:
        return self.kam.port

    @property
    def addr(self) -> tuple[str, int]:
        return (self.kam.listen_ip, self.kam.port)

    @property
    def pid(self) -> int:
        return self.kam.pid

    @property
    def command(self) -> str:
        return self.kam.command

    def start(self) -> KamailioMain:
        self.kam.start()
        poll(self.ctl.exists, 10, 0.05)
        return self

    def stop(self) -> None:
        self.kam.stop()

    def log(self) -> str:
        return self.kam.log()

    def kamcmd(self, *args: str, timeout: float = 10.0) -> str:
        exe = kamcmd_binary()
        if exe is None:
            raise RuntimeError("kamcmd not found")
        p = subprocess.run(
            [exe, "-s", f"unix:{self.ctl}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if p.returncode != 0:
            raise RuntimeError(f"kamcmd {' '.join(args)} failed ({p.returncode}): {p.stderr or p.stdout}")
        return p.stdout

    def counter(self, name: str) -> int:
        """One of the statistics module's counters (atomic, unlike shared variables, which can lose increments)."""
        out = self.kamcmd("stats.get_statistics", name)
        m = re.search(rf"\b{re.escape(name)}\s*=\s*(-?\d+)", out)
        if m is None:
            raise RuntimeError(f"Kamailio has no counter {name!r}: {out!r}")
        return int(m.group(1))

    def counters(self) -> dict[str, int]:
        return {name: self.counter(name) for name in COUNTERS}

    def ul_dump(self) -> str:
        return self.kamcmd("ul.dump", timeout=30)

    def contacts(self) -> list[UlContact]:
        """Every contact of Kamailio's location table (`kamcmd ul.dump`; a few hundred at most: kamcmd refuses
        a larger reply, see `location_size()` and `lookup()`)."""
        return self._parse_contacts(self.ul_dump())

    def location_size(self) -> tuple[int, int]:
        """(AoRs, contacts) in the location table, from usrloc's statistics (any size)."""
        out = self.kamcmd("stats.get_statistics", "usrloc:")
        users = re.search(r"location_users\s*=\s*(\d+)", out)
        contacts = re.search(r"location_contacts\s*=\s*(\d+)", out)
        if users is None or contacts is None:
            raise RuntimeError(f"no usrloc statistics: {out!r}")
        return int(users.group(1)), int(contacts.group(1))

    def lookup(self, aor: str) -> list[UlContact]:
        """The contacts of one AoR (`kamcmd ul.lookup location AOR`); none when it has no binding."""
        try:
            return self._parse_contacts(self.kamcmd("ul.lookup", "location", aor))
        except RuntimeError as exc:
            if "not found" in str(exc).lower() or "404" in str(exc):
                return []
            raise

    @staticmethod
    def _parse_contacts(text: str) -> list[UlContact]:
        out: list[UlContact] = []
        aor = ""
        cur: dict[str, str] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("AoR:"):
                aor = line.split(":", 1)[1].strip()
            elif line.startswith("Contact: {"):
                cur = {}
            elif ":" in line and not line.endswith("{"):
                k, v = line.split(":", 1)
                cur[k.strip()] = v.strip()
                if k.strip() == "Last-Modified" and "Address" in cur:
                    out.append(
                        UlContact(
                            aor=aor,
                            address=cur["Address"],
                            expires=int(cur.get("Expires", "0")) if cur.get("Expires", "").isdigit() else -1,
                            call_id=cur.get("Call-ID", ""),
                            cseq=int(cur.get("CSeq", "0") or 0),
                        )
                    )
        return out

    def contacts_of(self, aor: str) -> list[UlContact]:
        return [c for c in self.contacts() if c.aor == aor]

    def register_lines(self) -> list[str]:
        return [ln for ln in self.log().splitlines() if "REGISTER n=" in ln]
