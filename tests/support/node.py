"""A real Kubernetes node for the end-to-end tests: containerd + runc + CNI from Debian, kubelet, kube-proxy
(iptables mode) and CoreDNS built from Go modules (scripts/k8s-rig.sh node), the project's own images
imported into containerd (scripts/build-images.sh).

Everything the node does to networking happens inside a network namespace the rig creates:

    host namespace                              node namespace (midreg-node-<id>)
    control plane on HOST_IP ─── veth ───────── eth0 NODE_IP: containerd, kubelet, kube-proxy, CoreDNS
    Kamailio, SIPp (PHONE_IPS)                  pods on POD_CIDR (CNI ptp: one veth per pod, routed)
    routes: POD_CIDR, SERVICE_CIDR via NODE_IP  iptables of kube-proxy (Services, NodePorts)

The node namespace has no default route: pods reach the host's addresses on the link and nothing else, and
the host reaches pods and Services only through the veth. Processes share the host's mount namespace (the
kubelet's volume mounts must be visible to runc), so every mount lives under the rig's own directories and
is unmounted on teardown. Host-wide settings that the kubelet writes (vm.overcommit_memory, kernel.panic,
kernel.panic_on_oops) are saved first and restored on teardown; cgroups go under a cgroup root of the rig's
own. What teardown must undo is written to a state file before it is done, and a guardian process undoes
it if the test process dies without tearing down (SIGKILL, a crash); `python -m tests.support.node cleanup`
(make node-clean) undoes whatever a previous run left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.support import REPO
from tests.support.controlplane import ControlPlane, RigError, write_kubeconfig
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import WaitTimeout, wait_for

RIG_SCRIPT = REPO / "scripts" / "k8s-rig.sh"
IMAGES_SCRIPT = REPO / "scripts" / "build-images.sh"
STATE_DIR = Path("/run/kube-midregistrar")

# The link between the host and the node namespace, and the ranges behind it. Only these routes are added
# on the host, all through the rig's veth; nothing is routed beyond the node namespace.
LINK_PREFIX = "10.254.71"
HOST_IP = f"{LINK_PREFIX}.1"
NODE_IP = f"{LINK_PREFIX}.2"
PHONE_IPS = tuple(f"{LINK_PREFIX}.{i}" for i in range(11, 15))
POD_CIDR = "10.254.72.0/24"
SERVICE_CIDR = "10.254.73.0/24"
NODE_NAME = "midreg-node"
PAUSE_IMAGE = "localhost/kube-midregistrar/pause:3.10"
# Host-wide (not per-namespace) sysctls the kubelet sets; saved before it starts and restored after.
HOST_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
CGROUP_FS = Path("/sys/fs/cgroup")

NODE_TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "/usr/lib/cni/ptp": "containernetworking-plugins",
    "iptables": "iptables",
    "nsenter": "util-linux",
    "ip": "iproute2",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
}


class NodeRigError(RigError):
    pass


def check_prerequisites() -> None:
    """A clear error naming what is missing and the make target that installs it."""
    missing = []
    for tool, package in NODE_TOOLS.items():
        found = Path(tool).exists() if tool.startswith("/") else shutil.which(tool)
        if not found:
            missing.append(f"{tool} (Debian package {package})")
    if missing:
        raise NodeRigError(
            "the node tier needs: " + ", ".join(missing) + "; install them with `make node-tools`"
        )
    if os.geteuid() != 0:
        raise NodeRigError("the node tier runs containerd and a kubelet: it needs root")


def run(*argv: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, input=input
    )
    if check and proc.returncode != 0:
        raise NodeRigError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc.stdout


def build_node_binaries() -> Path:
    out = run("bash", str(RIG_SCRIPT), "node", timeout=3600)
    return Path(out.strip().splitlines()[-1])


def build_images() -> Path:
    """The registrar, operator and etcd images (Dockerfiles) and the pause image, as archives."""
    run("bash", str(IMAGES_SCRIPT), "pause", timeout=1800)
    out = run("bash", str(IMAGES_SCRIPT), "all", timeout=1800)
    return Path(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ state + teardown


@dataclass
class NodeState:
    """What teardown must undo; written before each step is done."""

    id: str
    owner_pid: int
    workdir: str
    rundir: str
    netns: str
    host_if: str
    cgroup_root: str
    sysctls: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return STATE_DIR / f"node-{self.id}.json"

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> NodeState:
        return cls(**json.loads(path.read_text()))


def _read_sysctl(name: str) -> str:
    return (Path("/proc/sys") / name).read_text().strip()


def _write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / name).write_text(value)


def _kill_tree(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _cgroup_dirs(root: str) -> list[Path]:
    """Every cgroup directory below the rig's cgroup root in every v1 hierarchy, deepest first."""
    out: list[Path] = []
    if not root:
        return out
    for hierarchy in CGROUP_FS.iterdir():
        top = hierarchy / root.strip("/")
        if top.is_dir():
            out.extend(p for p in top.rglob("*") if p.is_dir())
            out.append(top)
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def _kill_cgroups(root: str) -> None:
    for _ in range(20):
        pids: set[int] = set()
        for d in _cgroup_dirs(root):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _netns_pids(netns: str) -> list[int]:
    out = run("ip", "netns", "pids", netns, check=False)
    return [int(x) for x in out.split()]


def _unmount_under(*roots: str) -> None:
    roots_ = tuple(r.rstrip("/") + "/" for r in roots if r)
    for _ in range(3):
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(roots_) or point + "/" in roots_:
                mounts.append(point)
        if not mounts:
            return
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def teardown(state: NodeState) -> list[str]:
    """Undo everything the rig did (idempotent; each step is tried even when another fails)."""
    problems: list[str] = []
    _kill_tree(state.pids)
    if state.netns and Path(f"/run/netns/{state.netns}").exists():
        _kill_tree(_netns_pids(state.netns))
    _kill_cgroups(state.cgroup_root)
    time.sleep(0.3)
    _unmount_under(state.workdir, state.rundir)
    for d in _cgroup_dirs(state.cgroup_root):
        with contextlib.suppress(OSError):
            d.rmdir()
    left = [str(d) for d in _cgroup_dirs(state.cgroup_root)]
    if left:
        problems.append(f"cgroups left: {left[:3]}")
    if state.netns:
        run("ip", "netns", "delete", state.netns, check=False)
    if state.host_if:
        run("ip", "link", "delete", state.host_if, check=False)
    for name, value in state.sysctls.items():
        _write_sysctl(name, value)
        if _read_sysctl(name) != value:
            problems.append(f"{name} is {_read_sysctl(name)}, was {value}")
    for path in (state.rundir, state.workdir):
        if path:
            shutil.rmtree(path, ignore_errors=True)
    if not problems:
        with contextlib.suppress(FileNotFoundError):
            state.path.unlink()
    return problems


def cleanup_stale() -> list[str]:
    """Tear down every node a previous run left behind (its owner process is gone)."""
    done: list[str] = []
    if not STATE_DIR.is_dir():
        return done
    for path in sorted(STATE_DIR.glob("node-*.json")):
        try:
            state = NodeState.load(path)
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if _alive(state.owner_pid):
            continue  # a live node (this process's own, or another run's)
        teardown(state)
        done.append(state.id)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard(state_file: Path, owner: int) -> None:
    """Wait for the owner (the test process) to exit; tear the node down if it did not."""
    while _alive(owner):
        time.sleep(1)
    if state_file.exists():
        teardown(NodeState.load(state_file))


# ----------------------------------------------------------------------------------------------- the node


def _nsenter(netns: str, argv: Sequence[str]) -> list[str]:
    # The network namespace only: the kubelet's mounts must stay visible to containerd's runc.
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


@dataclass
class Node:
    """One real node: `start()` brings up the namespace, the control plane, containerd, the images, the kubelet,
    kube-proxy and CoreDNS; `stop()` tears all of it down."""

    bindir: Path
    images: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    cp: ControlPlane | None = None
    procs: list[Proc] = field(default_factory=list)
    state: NodeState | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return f"midreg-node-{self.id}"

    @property
    def workdir(self) -> Path:
        assert self.state is not None
        return Path(self.state.workdir)

    @property
    def rundir(self) -> Path:
        assert self.state is not None
        return Path(self.state.rundir)

    @property
    def socket(self) -> Path:
        return self.rundir / "containerd.sock"

    def ns(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return run(*_nsenter(self.netns, argv), check=check, timeout=timeout)

    def in_netns(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the node's network namespace (for a process started beside the node)."""
        return _nsenter(self.netns, argv)

    def claim(self) -> None:
        """Record what teardown will have to undo and start the guardian, before anything is changed."""
        workdir = Path(tempfile.mkdtemp(prefix="midreg-node-"))
        rundir = STATE_DIR / f"node-{self.id}"
        self.state = NodeState(
            id=self.id,
            owner_pid=os.getpid(),
            workdir=str(workdir),
            rundir=str(rundir),
            netns=self.netns,
            host_if=f"mrn{self.id}",
            cgroup_root=f"midreg-{self.id}",
            sysctls={name: _read_sysctl(name) for name in HOST_SYSCTLS},
        )
        self.state.save()
        rundir.mkdir(parents=True, exist_ok=True)
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.node", "guard", str(self.state.path), str(os.getpid())],
            cwd=REPO,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> Node:
        check_prerequisites()
        cleanup_stale()
        self.claim()
        workdir = self.workdir
        try:
            t0 = time.monotonic()
            self._network()
            self.cp = ControlPlane(
                workdir=workdir / "cp",
                bindir=self.bindir,
                address=HOST_IP,
                service_cidr=SERVICE_CIDR,
                real_nodes=True,
            )
            self.cp.workdir.mkdir(parents=True)
            self.cp.start()
            self._record(self.cp.procs)
            self.timings["control_plane_s"] = time.monotonic() - t0
            t1 = time.monotonic()
            self._containerd()
            self._import_images()
            self.timings["images_imported_s"] = time.monotonic() - t1
            t2 = time.monotonic()
            self._cgroups()
            self._kubelet()
            self._kube_proxy()
            self._coredns()
            self.wait_ready()
            self.timings["node_ready_s"] = time.monotonic() - t2
        except BaseException:
            self.stop()
            raise
        return self

    def _record(self, procs: Sequence[Proc]) -> None:
        assert self.state is not None
        etcd = self.cp.etcd.pid if self.cp and self.cp.etcd else None
        for pid in [p.pid for p in procs] + ([etcd] if etcd else []):
            if pid not in self.state.pids:
                self.state.pids.append(pid)
        self.state.save()

    def adopt(self, procs: Sequence[Proc]) -> None:
        """Processes a test starts beside the node (the metrics pipeline): torn down with it if the test
        process dies first."""
        self._record(procs)

    def _start(self, name: str, argv: Sequence[str]) -> Proc:
        proc = Proc(_nsenter(self.netns, argv), self.workdir, name)
        self.procs.append(proc)
        self._record([proc])
        return proc

    # -- network

    def _network(self) -> None:
        assert self.state is not None
        ns, hif = self.netns, self.state.host_if
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "addr", "add", f"{HOST_IP}/24", "dev", hif)
        for ip in PHONE_IPS:
            run("ip", "addr", "add", f"{ip}/24", "dev", hif)
        run("ip", "link", "set", hif, "up")
        self.ns("ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        self.ns("ip", "link", "set", "lo", "up")
        self.ns("ip", "link", "set", "eth0", "up")
        # Per-namespace settings: forwarding between pods, the link and Services.
        self.ns("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for cidr in (POD_CIDR, SERVICE_CIDR):
            run("ip", "route", "add", cidr, "via", NODE_IP, "dev", hif)

    # -- containerd

    def _containerd(self) -> None:
        w, r = self.workdir, self.rundir
        cni_conf = w / "cni" / "net.d"
        cni_conf.mkdir(parents=True)
        (cni_conf / "10-midreg.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "midreg",
                    "plugins": [
                        {
                            # Point-to-point: every pod has its own routed veth, so all pod traffic (pod to
                            # Service to pod included) crosses the node's iptables and conntrack.
                            "type": "ptp",
                            "ipMasq": False,
                            "mtu": 1500,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(w / "cni" / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        config = w / "containerd.toml"
        config.write_text(
            f"""version = 2
root = "{w / "containerd-root"}"
state = "{r / "containerd-state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{r / "containerd-ttrpc.sock"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{w / "containerd-opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The VM has no CAP_SYS_RESOURCE: a negative oom_score_adj is refused.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"""
        )
        proc = self._start("containerd", ["containerd", "--config", str(config)])
        wait_for(self.socket.exists, 30, "containerd socket", interval=0.2, proc=proc)
        wait_for(
            lambda: (
                subprocess.run(
                    ["ctr", "--address", str(self.socket), "version"], capture_output=True, check=False
                ).returncode
                == 0
            ),
            30,
            "containerd answering",
            interval=0.2,
            proc=proc,
        )

    def ctr(self, *args: str, timeout: float = 300) -> str:
        return run("ctr", "--address", str(self.socket), "-n", "k8s.io", *args, timeout=timeout)

    def _import_images(self) -> None:
        for archive in sorted(self.images.glob("*.tar")):
            self.ctr("images", "import", "--no-unpack=false", str(archive))

    # -- kubelet, kube-proxy, CoreDNS

    def _cgroups(self) -> None:
        """The rig's cgroup root in every v1 hierarchy (the kubelet requires it to exist)."""
        assert self.state is not None
        for hierarchy in CGROUP_FS.iterdir():
            if not hierarchy.is_dir() or hierarchy.name == "unified" or hierarchy.is_symlink():
                continue
            d = hierarchy / self.state.cgroup_root
            d.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((hierarchy / f).read_text())

    def _kubeconfig(self, name: str, subject: str) -> Path:
        assert self.cp is not None and self.cp.pki is not None
        crt, key = self.cp.pki.sign(name, subject)
        return write_kubeconfig(
            self.workdir / f"{name}.kubeconfig", self.cp.server, self.cp.pki.ca, crt, key, name
        )

    def _kubelet(self) -> None:
        assert self.cp is not None and self.cp.pki is not None and self.state is not None
        kubeconfig = self._kubeconfig("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}")
        root = self.workdir / "kubelet"
        root.mkdir()
        config = self.workdir / "kubelet.yaml"
        self.kubelet_port = free_port()
        # A serving certificate from the cluster CA, so metrics-server verifies the kubelet it scrapes.
        serving_crt, serving_key = self.cp.pki.sign(
            "kubelet-serving", f"/CN={NODE_NAME}", san=f"IP:{NODE_IP},DNS:{NODE_NAME}", server=True
        )
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    # This VM's cgroups are v1 only.
                    "failCgroupV1": False,
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{self.state.cgroup_root}",
                    "containerRuntimeEndpoint": f"unix://{self.socket}",
                    "address": NODE_IP,
                    "port": self.kubelet_port,
                    "readOnlyPort": 0,
                    "tlsCertFile": str(serving_crt),
                    "tlsPrivateKeyFile": str(serving_key),
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": free_port(),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(self.cp.pki.ca)},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "clusterDNS": [NODE_IP],
                    "clusterDomain": "cluster.local",
                    "resolvConf": "",
                    "failSwapOn": False,
                    "oomScoreAdj": 0,
                    "protectKernelDefaults": False,
                    "makeIPTablesUtilChains": False,
                    "serializeImagePulls": False,
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                    },
                    "nodeStatusUpdateFrequency": "4s",
                    "syncFrequency": "5s",
                    "fileCheckFrequency": "5s",
                    "maxPods": 40,
                    "localStorageCapacityIsolation": False,
                    "enableControllerAttachDetach": True,
                    "volumePluginDir": str(self.workdir / "kubelet-plugins"),
                }
            )
        )
        self._start(
            "kubelet",
            [
                str(self.bindir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={root}",
                f"--cert-dir={root / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _kube_proxy(self) -> None:
        kubeconfig = self._kubeconfig("kube-proxy", "/CN=system:kube-proxy")
        config = self.workdir / "kube-proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "mode": "iptables",
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": f"127.0.0.1:{free_port()}",
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    # No cluster CIDR: traffic from outside the pod range keeps its source address (kube-proxy
                    # masquerades off-cluster ClusterIP traffic only when it knows the cluster CIDR).
                    "clusterCIDR": "",
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Leave the host-wide conntrack table size and timeouts alone.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                        "udpTimeout": "0s",
                        "udpStreamTimeout": "0s",
                    },
                    "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s", "masqueradeAll": False},
                }
            )
        )
        self._start("kube-proxy", [str(self.bindir / "kube-proxy"), f"--config={config}", "--v=1"])

    def _coredns(self) -> None:
        assert self.cp is not None
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        self._start("coredns", [str(self.bindir / "coredns"), "-conf", str(corefile)])

    # -- use

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self.cp is not None
        return self.cp.kubectl(*args, input=input, check=check)

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            proc = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if proc.returncode != 0:
                return False
            conds = json.loads(proc.stdout).get("status", {}).get("conditions", [])
            return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

        try:
            wait_for(ready, timeout, f"node {NODE_NAME} Ready")
        except WaitTimeout as exc:
            raise NodeRigError(f"{exc}\n{self.logs()}") from None

    def logs(self, n: int = 20) -> str:
        procs = [*self.procs, *(self.cp.procs if self.cp else [])]
        return "\n".join(f"--- {p.name} ---\n{p.tail(n)}" for p in procs)

    def stop(self) -> list[str]:
        if self.state is None:
            return []
        problems = teardown(self.state)
        self.procs.clear()
        if self.cp:
            self.cp.procs.clear()
        return problems


@contextlib.contextmanager
def running_node() -> Iterator[Node]:
    check_prerequisites()
    t0 = time.monotonic()
    bindir = build_node_binaries()
    t1 = time.monotonic()
    images = build_images()
    t2 = time.monotonic()
    n = Node(bindir=bindir, images=images)
    n.timings.update({"binaries_s": t1 - t0, "images_built_s": t2 - t1})
    n.start()
    try:
        yield n
    finally:
        problems = n.stop()
        if problems:
            raise NodeRigError("teardown left: " + "; ".join(problems))


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["guard"]:
        guard(Path(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["cleanup"]:
        for rid in cleanup_stale():
            print(f"tore down node {rid}")
        return 0
    print("usage: python -m tests.support.node guard STATE_FILE PID | cleanup", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
