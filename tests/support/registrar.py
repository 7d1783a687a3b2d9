"""The `midregistrar run` process on loopback ports, and its HTTP views (/readyz, /metrics, /v1/aors/{aor})
read from wherever a registrar listens (a local process, a pod)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from registrar.sip.transport import ip_reference
from tests.support.ports import free_port, port_bound
from tests.support.process import Proc
from tests.support.sip import LOOPBACK
from tests.support.wait import wait_for


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


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode(errors="replace")


def aor_view(host: str, port: int, aor: str) -> dict[str, Any] | None:
    """GET /v1/aors/{aor}: the AoR's bindings as the registrar holds them, None unless it answers 200."""
    code, body = http_get(host, port, "/v1/aors/" + urllib.parse.quote(aor, safe="@"))
    return dict(json.loads(body)) if code == 200 else None


def metrics(host: str, port: int) -> dict[str, float]:
    """GET /metrics, Prometheus text → {'name{labels}': value} (labels as written)."""
    return parse_metrics(http_get(host, port, "/metrics")[1])


def parse_metrics(body: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (for a body fetched elsewhere: from inside a pod)."""
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


class Registrar:
    """`midregistrar run …` on loopback ports (memory store unless `extra` says otherwise: a later `--store`
    wins); ready when /readyz answers 200 and its SIP port is bound. `start()` launches and waits; `launch()`
    and `wait_ready()` apart start several at once."""

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
        name: str = "midregistrar",
        host: str = LOOPBACK,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="midreg-"))
        argv = [*registrar_argv(), "run"]
        for t in transports:
            argv += ["--listen", f"{t}:{ip_reference(host)}:{self.port}"]
        if main is not None:
            argv += ["--main-registrar", f"sip:{ip_reference(main[0])}:{main[1]}"]
        argv += ["--mode", mode, "--store", "memory", "--http", f"{LOOPBACK}:{self.http_port}"]
        argv += list(extra)
        self.argv = argv
        self.env = dict(env or {})
        self.proc: Proc | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def readyz(self) -> int | None:
        try:
            return http_get(LOOPBACK, self.http_port, "/readyz", timeout=0.5)[0]
        except (OSError, ValueError, http.client.HTTPException):
            # Not listening yet. HTTPException too: polling a port nobody has bound yet can connect the
            # socket to itself (same source and destination port) and read back its own request.
            return None

    def ready_line(self) -> str | None:
        if self.proc is None:
            return None
        return next((line for line in self.proc.output().splitlines() if READY_RE.search(line)), None)

    def launch(self) -> Registrar:
        self.proc = Proc(self.argv, self.workdir, "midregistrar", env=self.env)
        return self

    def wait_ready(self, timeout: float = 15.0) -> Registrar:
        def ready() -> bool:
            return self.readyz() == 200 and (port_bound(self.port, "udp") or port_bound(self.port, "tcp"))

        wait_for(ready, timeout, f"{self.name} ready: {self.command}", interval=0.05, proc=self.proc)
        return self

    def start(self, ready_timeout: float = 15.0) -> Registrar:
        self.launch()
        try:
            return self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop(timeout)

    def log(self) -> str:
        return self.proc.tail(200) if self.proc else ""

    def aor_view(self, aor: str) -> dict[str, Any] | None:
        return aor_view(LOOPBACK, self.http_port, aor)

    def metrics(self) -> dict[str, float]:
        return metrics(LOOPBACK, self.http_port)

    def __enter__(self) -> Registrar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
