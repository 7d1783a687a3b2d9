"""What the node tier's tests and its benchmark (bench.node_bench) share: kubectl on the node's control plane,
the chart installed from the images built here, the example MidRegistrars adapted to the rig's addresses,
and SIPp phone fleets whose per-REGISTER log gives failures and the longest wait for an answer."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO
from tests.support.helm import CHART, Helm
from tests.support.kamailio import KamailioMain
from tests.support.node import HOST_IP, NODE_IP, NODE_NAME, PHONE_IPS, Node
from tests.support.phones import DOMAIN, CallTarget, Fleet, place_calls
from tests.support.registrar import aor_view
from tests.support.wait import WaitTimeout, poll, wait_for

RELEASE = "kube-midregistrar"
SYSTEM_NS = "midreg-system"
ETCD_ENDPOINT = f"{RELEASE}-etcd.{SYSTEM_NS}.svc:2379"
ETCD_IMAGE_TAG = "v3.6.16"
STORAGE_CLASS = "midreg-local"


class Kube:
    """kubectl as cluster admin on the node's control plane, with JSON reads and waits."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.node.kubectl(*args, input=input, check=check).stdout

    def json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self(*args, "-o", "json"))
        return data

    def apply(self, obj: dict[str, Any] | str) -> None:
        self("apply", "-f", "-", input=obj if isinstance(obj, str) else json.dumps(obj))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return items

    def ready_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(namespace, selector) if pod_ready(p)]

    def wait(self, fn: Any, timeout: float, what: str, explain: Callable[[], str] | None = None) -> None:
        """``fn`` true within ``timeout``; else fail with the node's logs and ``explain()`` (the objects)."""
        try:
            wait_for(fn, timeout, what)
        except WaitTimeout as exc:
            state = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"{exc}{state}\n{self.node.logs(8)}") from None


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def local_volume(node: Node, kube: Kube, name: str) -> None:
    """A local PersistentVolume for the chart's etcd (the node has no provisioner), owned by its user."""
    path = node.workdir / "volumes" / name
    path.mkdir(parents=True)
    os.chown(path, 10001, 10001)
    path.chmod(0o700)
    kube.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
        }
    )
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "4Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": STORAGE_CLASS,
                "persistentVolumeReclaimPolicy": "Delete",
                "local": {"path": str(path)},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": [NODE_NAME],
                                    }
                                ]
                            }
                        ]
                    }
                },
            },
        }
    )


def install_chart(node: Node, kube: Kube, helm: Helm) -> float:
    """`helm install` of the chart with the locally built operator image and the chart's etcd; seconds taken."""
    local_volume(node, kube, "etcd-data-0")
    t0 = time.monotonic()
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        SYSTEM_NS,
        "--create-namespace",
        "--set", "etcd.enabled=true",
        "--set", "etcd.image.repository=ghcr.io/kube-midregistrar/etcd",
        "--set", f"etcd.image.tag={ETCD_IMAGE_TAG}",
        "--set", f"etcd.storage.storageClassName={STORAGE_CLASS}",
        "--set", "operator.resyncSeconds=5",
        "--set", "operator.retrySeconds=3",
        # prometheus-adapter's rule, read back from the API server by the autoscaling tests; a short rate()
        # window so the HPA sees a load change within seconds (the default is 2m).
        "--set", "prometheusAdapter.rules.enabled=true",
        "--set", "prometheusAdapter.rules.rateWindow=30s",
        "--wait",
        "--timeout", "240s",
        timeout=300,
    )  # fmt: skip
    return time.monotonic() - t0


def start_kamailio(workdir: Path) -> KamailioMain:
    """The main registrar, on the host's end of the node's link (the pods reach it there)."""
    return KamailioMain(workdir, auth=False, listen_ip=HOST_IP, extra_defines={"USE_PATH": 1}).start()


EXAMPLES = REPO / "examples"
USERS = 1000  # AoRs; two devices each
EXPIRES = 60
REFRESH_MS = 15000
SELECTOR = "app.kubernetes.io/name=midregistrar,app.kubernetes.io/instance={}"


@dataclass
class Addr:
    """Where a fleet sends: a Service's cluster IP, a NodePort or the node's address."""

    name: str
    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


def example(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def midregistrar(ns: str, name: str, kamailio: KamailioMain, **spec: Any) -> dict[str, Any]:
    """A MidRegistrar in mode contact in front of ``kamailio`` on the host, reached through a ClusterIP
    Service; ``spec`` adds or replaces fields (transports, replicas, tls, networkPolicy...)."""
    return {
        "apiVersion": "sip.midregistrar.io/v1alpha1",
        "kind": "MidRegistrar",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "mainRegistrar": f"sip:{HOST_IP}:{kamailio.port}",
            "mode": "contact",
            "expires": {"min": 10, "default": 600, "max": 3600},
            "network": {"mode": "service", "serviceType": "ClusterIP"},
        }
        | spec,
    }


def midreg(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return kube.json("get", "midreg", "-n", ns, name)


def pods_aor_view(pods: list[dict[str, Any]], aor: str, port: int = 9090) -> dict[str, Any] | None:
    """GET /v1/aors/{aor} from the first of `pods` that answers 200."""
    for pod in pods:
        try:
            view = aor_view(pod["status"]["podIP"], port, aor)
        except OSError:
            continue
        if view is not None:
            return view
    return None


# ----------------------------------------------------------------------------------------------- phones


@dataclass
class Outcome:
    user: str
    sent: int  # ms, the fleet's clock (CSeq)
    answered: int | None  # ms, None: no final answer (lost) or a failure code
    code: str


def outcomes(fleet: Fleet) -> list[Outcome]:
    out: list[Outcome] = []
    for ln in fleet.log_lines("REG "):
        m = re.match(r"REG (\S+) user=(\S+) cseq=(\d+)(?: at=(\d+))?", ln)
        if m:
            code, user, sent, at = m.groups()
            out.append(Outcome(user, int(sent), int(at) if code == "ok" and at else None, code))
    return out


class Phones:
    """Four SIPp fleets: AoRs 0-499 on PHONE_IPS[0] (ClusterIP) and [1] (NodePort), 500-999 on [2] and [3]."""

    def __init__(self, tmp: Path, clusterip: Addr, nodeport: Addr, users: int = USERS) -> None:
        half = users // 2
        a = [f"u{i:04d}" for i in range(half)]
        b = [f"u{i:04d}" for i in range(half, users)]
        self.fleets: list[Fleet] = []
        self.targets: list[Addr] = []
        for i, (group, target) in enumerate(((a, clusterip), (a, nodeport), (b, clusterip), (b, nodeport))):
            fleet = Fleet(tmp, f"f{i}", group, expires=EXPIRES, every_ms=REFRESH_MS, local_ip=PHONE_IPS[i])
            self.fleets.append(fleet)
            self.targets.append(target)

    def start(self) -> Phones:
        for fleet, target in zip(self.fleets, self.targets, strict=True):
            fleet.start(target)
        return self

    def stop(self) -> None:
        for fleet in self.fleets:
            fleet.stop()

    def running(self) -> bool:
        return all(f.running() for f in self.fleets)

    def wait_ok(self, at_least: int | list[dict[str, int]], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for i, fleet in enumerate(self.fleets):
            want = at_least if isinstance(at_least, int) else at_least[i]
            if not fleet.wait_ok(want, max(1.0, deadline - time.monotonic())):
                return False
        return True

    def ok_counts(self) -> list[dict[str, int]]:
        return [f.ok_counts() for f in self.fleets]

    def clock(self) -> int:
        """Now on the fleets' clock (ms since their cseq_base; all fleets of a run share one base second)."""
        return int((time.time() - self.fleets[0].cseq_base) * 1000)

    def failures(self, since: int = 0) -> list[str]:
        """REGISTERs sent at or after `since` that got no final answer or a failure."""
        bad = []
        for fleet in self.fleets:
            for o in outcomes(fleet):
                if o.sent >= since and o.code != "ok":
                    bad.append(f"{fleet.name} {o.user} cseq={o.sent} {o.code}")
        return bad

    def waits(self, since: int, until: int) -> list[tuple[int, str]]:
        """How long a phone waited for an answer to each REGISTER sent in [since, until], in ms, with what it
        was (fleet, user, when sent after `since`, outcome): from the first send to the 200 (retransmissions
        included); a REGISTER left unanswered counts until the phone's next 200."""
        out = []
        for fleet in self.fleets:
            by_user: dict[str, list[Outcome]] = {}
            for o in outcomes(fleet):
                by_user.setdefault(o.user, []).append(o)
            for seq in by_user.values():
                for i, o in enumerate(seq):
                    if not since <= o.sent <= until:
                        continue
                    end = o.answered
                    if end is None:
                        end = next((n.answered for n in seq[i + 1 :] if n.answered is not None), until)
                    out.append(
                        (
                            end - o.sent,
                            f"{fleet.name} {o.user} sent +{(o.sent - since) / 1000:.2f} s {o.code}",
                        )
                    )
        return out

    def longest_wait(self, since: int, until: int) -> float:
        """The longest of `waits`, in seconds."""
        return max((w for w, _ in self.waits(since, until)), default=0) / 1000

    def slowest(self, since: int, until: int, n: int = 5) -> list[str]:
        """The `n` longest of `waits`, described."""
        return [f"{w / 1000:.2f} s: {what}" for w, what in sorted(self.waits(since, until), reverse=True)[:n]]

    def describe(self) -> str:
        return "\n".join(f.describe()[-3000:] for f in self.fleets)


def invites(fleet: Fleet) -> Counter[str]:
    """INVITEs a fleet's phones answered so far, per user."""
    out: Counter[str] = Counter()
    for ln in fleet.log_lines("CALL invite "):
        m = re.search(r"ruri=sips?:([^@;>]+)@", ln)
        if m:
            out[m.group(1)] += 1
    return out


def diagnostics(kube: Kube, ns: str, selector: str, kam: KamailioMain, users: list[str]) -> str:
    """What a failed call needs to be understood: the registrar pods' logs and Kamailio's lines of `users`."""
    parts = []
    for pod in kube.pods(ns, selector):
        name = pod["metadata"]["name"]
        parts.append(f"--- pod {name} {pod['status'].get('podIP')} ready={pod_ready(pod)}")
        parts.append(kube("logs", "-n", ns, name, "--tail=60", check=False)[-6000:])
    lines = [ln for ln in kam.log().splitlines() if any(u in ln for u in users)]
    parts.append("--- kamailio\n" + "\n".join(lines[-60:]))
    return "\n".join(parts)


def call_every_device(
    tmp: Path,
    kam: KamailioMain,
    fleets: list[Fleet],
    users: list[str],
    name: str,
    rate: float = 20,
    diag: Callable[[list[str]], str] | None = None,
) -> None:
    """Calls placed by Kamailio (its own lookup and forking) to `users`: every device of each gets this
    call's INVITE."""
    before = [invites(f) for f in fleets]
    targets = [CallTarget(u, f"sip:{u}@{DOMAIN}") for u in users]
    wait = 60 + len(users) / rate
    outcome = place_calls(tmp, kam, targets, name, rate=rate, wait=wait, local_ip=HOST_IP)
    failed = outcome.failed()
    if failed:
        got = [invites(f) for f in fleets]
        arrived = {u: [f.name for i, f in enumerate(fleets) if got[i][u] > before[i][u]] for u in failed}
        raise AssertionError(
            f"calls failed: {list(failed.items())[:10]}; devices that got the INVITE: {arrived}\n"
            f"{outcome.result.describe()[-4000:]}\n{diag(list(failed)) if diag else ''}"
        )

    def missing() -> list[str]:
        now = [invites(f) for f in fleets]
        return [
            f"{user} on {fleet.name}"
            for user in users
            for i, fleet in enumerate(fleets)
            if user in fleet.users and now[i][user] <= before[i][user]
        ]

    poll(lambda: not missing(), 10)
    left = missing()
    assert not left, f"devices that did not get this call's INVITE: {left[:20]}"


def sample_users(n: int = 6) -> list[str]:
    step = USERS // n
    return [f"u{i * step + 7:04d}" for i in range(n)]


# ---------------------------------------------------------------------------------------- the registrar


@dataclass
class Deployed:
    ns: str
    name: str
    spec: dict[str, Any]
    clusterip: Addr
    nodeport: Addr

    @property
    def selector(self) -> str:
        return SELECTOR.format(self.name)


def wait_midreg_ready(kube: Kube, ns: str, name: str, replicas: int, timeout: float = 180) -> None:
    def ready() -> bool:
        obj = midreg(kube, ns, name)
        st = obj.get("status") or {}
        conds = {c["type"]: c["status"] for c in st.get("conditions") or []}
        pods = kube.ready_pods(ns, SELECTOR.format(name))
        return (
            conds.get("Ready") == "True"
            and st.get("readyReplicas") == replicas
            and len(pods) == replicas
            and len(kube.pods(ns, SELECTOR.format(name))) == replicas
        )

    kube.wait(ready, timeout, f"MidRegistrar {ns}/{name} Ready with {replicas} pods")


# Each phone fleet of these tests sends 500 or 1,000 phones from one address, as a NAT does, and a fleet
# starts them all within half a second. The examples say to trust such an address (`limits.trustedSources`):
# left to the per-source guard (500 messages/s), the first round is dropped in part and answered only on
# SIPp's retransmissions, up to 4 s later (2,493 drops in the hostNetwork test's first round).
PHONES_BEHIND_NAT = {"trustedSources": list(PHONE_IPS)}


def deploy_example(kube: Kube, kamailio: KamailioMain, replicas: int | None = None) -> Deployed:
    """examples/contact-loadbalancer.yaml, adapted in its addresses: the main registrar is Kamailio on the
    host, the etcd endpoint the chart's etcd, no public address (no load balancer here: phones use the
    Service's cluster IP and node port), and the phones' addresses trusted (PHONES_BEHIND_NAT)."""
    docs = example("contact-loadbalancer.yaml")
    (mr,) = [d for d in docs if d["kind"] == "MidRegistrar"]
    mr = copy.deepcopy(mr)
    spec = mr["spec"]
    spec["mainRegistrar"] = f"sip:{HOST_IP}:{kamailio.port}"
    spec["network"].pop("advertise")
    spec["etcd"]["endpoints"] = [ETCD_ENDPOINT]
    spec["limits"] = PHONES_BEHIND_NAT
    if replicas is not None:
        spec["replicas"] = replicas
    ns, name = mr["metadata"]["namespace"], mr["metadata"]["name"]
    for d in docs:
        if d["kind"] == "Namespace":
            kube.apply(d)
    kube.apply(mr)
    wait_midreg_ready(kube, ns, name, spec["replicas"])
    svc = kube.json("get", "service", "-n", ns, name)
    udp = next(p for p in svc["spec"]["ports"] if p["protocol"] == "UDP")
    return Deployed(
        ns,
        name,
        spec,
        Addr("clusterip", svc["spec"]["clusterIP"], udp["port"]),
        Addr("nodeport", NODE_IP, udp["nodePort"]),
    )


class EndpointWatch:
    """`kubectl get endpointslices --watch` of one Service, each change stamped as it arrives: when a pod's
    endpoint stopped being ready, the moment from which kube-proxy moves that pod's phones. It splits a phone's
    wait after a lost pod into Kubernetes noticing and the rest."""

    def __init__(self, kube: Kube, ns: str, service: str) -> None:
        assert kube.node.cp is not None
        argv = kube.node.cp.kubectl_command(
            "get", "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={service}", "--watch", "-o", "json"
        )  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.changes: list[tuple[float, dict[str, Any]]] = []  # (unix time of arrival, EndpointSlice)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: self.changes, 10, "the EndpointSlice watch to list the slices")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:  # one pretty-printed object per change
            buf += line
            try:
                obj, end = decoder.raw_decode(buf.strip())
            except ValueError:
                continue
            self.changes.append((time.time(), obj))
            buf = buf.strip()[end:]

    def not_ready_at(self, ip: str) -> float | None:
        """When (unix s) a change first showed `ip` not ready, or gone, after one showed it ready."""
        holding: set[str] = set()  # the slices that showed it ready
        for at, eps in list(self.changes):
            name = eps["metadata"]["name"]
            ready = [
                bool((e.get("conditions") or {}).get("ready"))
                for e in eps.get("endpoints") or []
                if ip in e.get("addresses", [])
            ]
            if any(ready):
                holding.add(name)
            elif name in holding:
                return at
        return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)


def owner_pod(kube: Kube, edge: Deployed, fleet: Fleet) -> dict[str, Any]:
    """The pod holding `fleet`'s flow (the owner recorded on its bindings)."""
    pods = kube.ready_pods(edge.ns, edge.selector)
    view = pods_aor_view(pods, f"{fleet.users[0]}@{DOMAIN}")
    assert view
    (binding,) = [b for b in view["bindings"] if fleet.local_ip in b["received"]]
    owner = binding["owner"]
    for pod in pods:
        if owner and (pod["metadata"]["name"] in owner or pod["status"]["podIP"] in owner):
            return pod
    raise AssertionError(f"no ready pod owns {owner!r}: {[p['metadata']['name'] for p in pods]}")
