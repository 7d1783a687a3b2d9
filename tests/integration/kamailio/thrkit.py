"""Helpers for the throttling tests and benchmarks (issue 3): Kamailio as the main registrar, read through its
control socket, and the mid-registrar's HTTP views. Built on `sipkit` (tests/integration)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import sipkit  # noqa: E402

MAIN_CFG = HERE / "main_registrar.cfg"
COUNTERS = ("reg_total", "reg_challenged", "reg_saved", "dereg_trusted")


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
    """Kamailio started from tests/integration/kamailio/main_registrar.cfg with a binrpc control socket in its
    work dir; `counters()` and `contacts()` read it with kamcmd (stats.get_statistics, ul.dump)."""

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
        listen_ip: str = sipkit.LOOPBACK,
    ) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.ctl = workdir / "ctl.sock"
        defines: dict[str, object] = {"CTL_SOCK": f'"unix:{self.ctl}"', "AUTH_PASSWORD": f'"{password}"'}
        if mid_port is not None:
            defines["MID_IP"] = f'"{sipkit.LOOPBACK}"'
            defines["MID_PORT"] = mid_port
        if not auth:
            defines["NO_AUTH"] = 1
        if quiet:
            defines["QUIET"] = 1
        defines.update(extra_defines or {})
        self.password = password
        self.kam = sipkit.Kamailio(
            config, defines=defines, children=children, workdir=workdir, listen_ip=listen_ip
        )

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
        deadline = time.monotonic() + 10
        while not self.ctl.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
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


# ------------------------------------------------------------------------------------ mid-registrar HTTP


def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    url = f"http://{sipkit.LOOPBACK}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode(errors="replace")


def aor_view(reg: sipkit.Registrar, aor: str) -> dict | None:
    code, body = http_get(reg.http_port, "/v1/aors/" + urllib.parse.quote(aor, safe="@"))
    return json.loads(body) if code == 200 else None


def metrics(reg: sipkit.Registrar) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (labels as written)."""
    _, body = http_get(reg.http_port, "/metrics")
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric(m: Mapping[str, float], name: str, **labels: str) -> float:
    """Value of a counter/gauge, with or without the `_total` suffix."""
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for candidate in (name, name + "_total"):
        key = f"{candidate}{{{lab}}}" if lab else candidate
        if key in m:
            return m[key]
    return 0.0


def wait_for(pred, timeout: float, interval: float = 0.1):
    """Poll `pred()` until it returns a truthy value (returned) or `timeout` passes (the last value)."""
    deadline = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = pred()
    return value


def log_lines(sipp: sipkit.Sipp, prefix: str) -> list[str]:
    p = sipp.workdir / "logs.log"
    try:
        text = p.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]
