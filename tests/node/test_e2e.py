"""End to end on a real node: the chart installed by helm from the images built here, registrar pods run by
containerd, SIP phones (SIPp) reaching them through Kubernetes Services (kube-proxy) and the node's address,
Kamailio on the host as the main registrar, state shared through the chart's etcd.

The tests of this module run in order on one MidRegistrar (examples/contact-loadbalancer.yaml, adapted only
in its addresses) while 2,000 phones (1,000 AoRs with two devices each, one through the ClusterIP and one
through the NodePort) keep refreshing: install, registration and calls, a rolling update, a killed container
and a force-deleted pod, scaling 2 → 4 → 2 with the operator pod replaced meanwhile. Each asserts from the
phones' side (SIPp's per-REGISTER log), from Kamailio's location table and from the registrars' own /metrics
and /v1/aors. A last MidRegistrar (examples/aor-hostnetwork.yaml) runs mode aor on the node's own address.
"""

from __future__ import annotations

import copy
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clusterkit as ck
import pytest
import thrkit
import yaml

from tests.node import noderig
from tests.node.conftest import ETCD_ENDPOINT, RELEASE, SYSTEM_NS, Kube, pod_ready

pytestmark = pytest.mark.node

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DOMAIN = ck.DOMAIN
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


def midreg(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return kube.json("get", "midreg", "-n", ns, name)


def http_get(ip: str, port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def http_json(ip: str, port: int, path: str) -> Any:
    return json.loads(http_get(ip, port, path))


def metrics(ip: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def aor_view(pods: list[dict[str, Any]], aor: str, port: int = 9090) -> dict[str, Any] | None:
    """GET /v1/aors/{aor} from the first ready pod that answers."""
    for pod in pods:
        try:
            return dict(
                http_json(pod["status"]["podIP"], port, "/v1/aors/" + urllib.parse.quote(aor, safe="@"))
            )
        except OSError:
            continue
    return None


# ----------------------------------------------------------------------------------------------- phones


@dataclass
class Outcome:
    user: str
    sent: int  # ms, the fleet's clock (CSeq)
    answered: int | None  # ms, None: no final answer (lost) or a failure code
    code: str


def outcomes(fleet: ck.Fleet) -> list[Outcome]:
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
        self.fleets: list[ck.Fleet] = []
        self.targets: list[Addr] = []
        for i, (group, target) in enumerate(((a, clusterip), (a, nodeport), (b, clusterip), (b, nodeport))):
            fleet = ck.Fleet(
                tmp, f"f{i}", group, expires=EXPIRES, every_ms=REFRESH_MS, local_ip=noderig.PHONE_IPS[i]
            )
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

    def longest_wait(self, since: int, until: int) -> float:
        """The longest a phone waited for an answer to a REGISTER sent in [since, until], in seconds: from the
        first send to the 200 (retransmissions included); a REGISTER left unanswered counts until the
        phone's next 200."""
        worst = 0
        for fleet in self.fleets:
            by_user: dict[str, list[Outcome]] = {}
            for o in outcomes(fleet):
                by_user.setdefault(o.user, []).append(o)
            for seq in by_user.values():
                for i, o in enumerate(seq):
                    if not since <= o.sent <= until:
                        continue
                    if o.answered is not None:
                        worst = max(worst, o.answered - o.sent)
                        continue
                    later = [n.answered for n in seq[i + 1 :] if n.answered is not None]
                    worst = max(worst, (later[0] if later else until) - o.sent)
        return worst / 1000

    def describe(self) -> str:
        return "\n".join(f.describe()[-3000:] for f in self.fleets)


def call_every_device(
    tmp: Path, kam: thrkit.KamailioMain, phones: Phones, users: list[str], name: str
) -> None:
    """Calls placed by Kamailio (its own lookup and forking) to `users`: every device of each gets the INVITE."""
    targets = [ck.CallTarget(u, f"sip:{u}@{DOMAIN}") for u in users]
    outcome = ck.place_calls(tmp, kam, targets, name, rate=10, wait=90, local_ip=noderig.HOST_IP)
    assert not outcome.failed(), f"calls failed: {outcome.failed()}\n{outcome.result.describe()}"
    missing = []
    for user in users:
        for fleet in phones.fleets:
            if user in fleet.users and not [
                ln for ln in fleet.log_lines("CALL invite ") if f"ruri=sip:{user}@" in ln
            ]:
                missing.append(f"{user} on {fleet.name}")
    assert not missing, f"devices that never got the INVITE: {missing}"


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


@pytest.fixture(scope="module")
def edge(
    node: noderig.Node, kube: Kube, platform: dict[str, float], kamailio: thrkit.KamailioMain
) -> Deployed:
    """examples/contact-loadbalancer.yaml, adapted in its addresses: the main registrar is Kamailio on the
    host, the etcd endpoint the chart's etcd, and no public address (no load balancer here: phones use the
    Service's cluster IP and node port)."""
    docs = example("contact-loadbalancer.yaml")
    (mr,) = [d for d in docs if d["kind"] == "MidRegistrar"]
    mr = copy.deepcopy(mr)
    spec = mr["spec"]
    spec["mainRegistrar"] = f"sip:{noderig.HOST_IP}:{kamailio.port}"
    spec["network"].pop("advertise")
    spec["etcd"]["endpoints"] = [ETCD_ENDPOINT]
    ns, name = mr["metadata"]["namespace"], mr["metadata"]["name"]
    for d in docs:
        if d["kind"] == "Namespace":
            kube.apply(d)
    t0 = time.monotonic()
    kube.apply(mr)
    wait_midreg_ready(kube, ns, name, spec["replicas"])
    platform["midreg_ready_s"] = time.monotonic() - t0
    svc = kube.json("get", "service", "-n", ns, name)
    udp = next(p for p in svc["spec"]["ports"] if p["protocol"] == "UDP")
    return Deployed(
        ns,
        name,
        spec,
        Addr("clusterip", svc["spec"]["clusterIP"], udp["port"]),
        Addr("nodeport", noderig.NODE_IP, udp["nodePort"]),
    )


@pytest.fixture(scope="module")
def phones(tmp_path_factory: pytest.TempPathFactory, edge: Deployed) -> Iterator[Phones]:
    p = Phones(tmp_path_factory.mktemp("phones"), edge.clusterip, edge.nodeport)
    yield p
    p.stop()


# ------------------------------------------------------------------------------------------------ tests


def test_operator_runs_from_the_chart_as_a_pod(kube: Kube, platform: dict[str, float]) -> None:
    (pod,) = kube.pods(SYSTEM_NS, "app.kubernetes.io/component=operator")
    assert pod_ready(pod)
    assert pod["spec"]["serviceAccountName"] == RELEASE
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "ghcr.io/kube-midregistrar/operator:0.1.0"
    # kubectl logs and exec reach the container through the real kubelet.
    logs = kube("logs", "-n", SYSTEM_NS, pod["metadata"]["name"], "--tail=200")
    assert logs.strip(), "no operator log"
    out = kube("exec", "-n", SYSTEM_NS, pod["metadata"]["name"], "--", "id", "-u")
    assert out.strip() == "10001"
    (etcd,) = kube.pods(SYSTEM_NS, "app.kubernetes.io/component=etcd")
    assert pod_ready(etcd)


def test_example_midregistrar_runs_real_pods(kube: Kube, edge: Deployed) -> None:
    pods = kube.ready_pods(edge.ns, edge.selector)
    assert len(pods) == edge.spec["replicas"]
    for pod in pods:
        (c,) = pod["status"]["containerStatuses"]
        assert c["ready"] and c["state"].get("running"), c
        # Ready means listening and etcd reachable: the pod runs the operator's ConfigMap (the etcd store).
        assert http_get(pod["status"]["podIP"], 9090, "/readyz").strip() == "ready"
        m = metrics(pod["status"]["podIP"], 9090)
        assert m.get("midregistrar_etcd_up") == 1.0, m
    log = kube("logs", "-n", edge.ns, pods[0]["metadata"]["name"])
    assert "ready" in log.lower(), log[-2000:]
    table = kube("get", "midreg", "-n", edge.ns, edge.name)
    header, row = table.strip().splitlines()
    cols = dict(zip(header.split(), row.split(), strict=False))
    n = edge.spec["replicas"]
    assert cols["READY"] == "True" and cols["REPLICAS"] == f"{n}/{n}", table


def test_phones_register_through_services_and_calls_reach_every_device(
    tmp_path: Path, kube: Kube, edge: Deployed, phones: Phones, kamailio: thrkit.KamailioMain
) -> None:
    t0 = time.monotonic()
    phones.start()
    assert phones.wait_ok(1, 90), phones.describe()
    first_round = time.monotonic() - t0
    assert not phones.failures(), phones.failures()[:20]
    devices = 2 * USERS
    # The main registrar holds every device (mode contact: one contact each, relayed once).
    assert thrkit.wait_for(lambda: kamailio.location_size() == (USERS, devices), 30), kamailio.location_size()
    for user in sample_users():
        held = kamailio.lookup(user)
        assert len(held) == 2, held
    # The registrar recorded each phone's real source address: no SNAT through the ClusterIP or NodePort.
    pods = kube.ready_pods(edge.ns, edge.selector)
    for user in sample_users():
        view = aor_view(pods, f"{user}@{DOMAIN}")
        assert view is not None, user
        received = sorted(b["received"].split(":")[1] for b in view["bindings"])
        group = 0 if int(user[1:]) < USERS // 2 else 2
        assert received == sorted(noderig.PHONE_IPS[group : group + 2]), view
    # Both pods share state through etcd: every pod sees every AoR.
    for pod in pods:
        view = aor_view([pod], f"u0003@{DOMAIN}")
        assert view is not None and len(view["bindings"]) == 2, view
    call_every_device(tmp_path, kamailio, phones, sample_users(), "first-calls")
    # kubectl get midreg counts what the phones registered.
    def contacts_column() -> str:
        header, row = kube("get", "midreg", "-n", edge.ns, edge.name).strip().splitlines()
        return dict(zip(header.split(), row.split(), strict=False))["CONTACTS"]

    kube.wait(lambda: contacts_column() == str(devices), 60, f"kubectl get midreg: CONTACTS {devices}")
    register_total = sum(
        v
        for pod in pods
        for k, v in metrics(pod["status"]["podIP"], 9090).items()
        if k.startswith("midregistrar_registers_total")
    )
    assert register_total >= devices
    print(f"first registration of {devices} devices: {first_round:.1f} s")


def test_rolling_update_under_load_loses_nothing(
    tmp_path: Path, kube: Kube, edge: Deployed, phones: Phones, kamailio: thrkit.KamailioMain
) -> None:
    assert phones.running()
    since = phones.clock()
    old = {p["metadata"]["name"] for p in kube.pods(edge.ns, edge.selector)}
    hash_before = kube.json("get", "deploy", "-n", edge.ns, edge.name)["spec"]["template"]["metadata"][
        "annotations"
    ]
    t0 = time.monotonic()
    kube("patch", "midreg", "-n", edge.ns, edge.name, "--type=merge", "-p", '{"spec":{"maxContacts":12}}')

    def rolled() -> bool:
        pods = kube.pods(edge.ns, edge.selector)
        names = {p["metadata"]["name"] for p in pods if pod_ready(p)}
        return len(names) == edge.spec["replicas"] and not names & old

    kube.wait(rolled, 240, "new pods Ready, old ones gone from the ready set")
    rollout = time.monotonic() - t0
    annotations = kube.json("get", "deploy", "-n", edge.ns, edge.name)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations != hash_before
    # Two more refreshes of every phone after the rollout: all answered.
    marks = phones.ok_counts()
    assert phones.wait_ok(marks, 60), phones.describe()
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    assert not phones.failures(since), phones.failures(since)[:20]
    assert kamailio.location_size() == (USERS, 2 * USERS)
    call_every_device(tmp_path, kamailio, phones, sample_users(), "after-rollout")
    print(
        f"rollout of {edge.spec['replicas']} pods under load: {rollout:.1f} s, longest wait "
        f"{phones.longest_wait(since, phones.clock()):.2f} s"
    )


def _owner_pod(kube: Kube, edge: Deployed, fleet: ck.Fleet) -> dict[str, Any]:
    """The pod holding `fleet`'s flow (the owner recorded on its bindings)."""
    pods = kube.ready_pods(edge.ns, edge.selector)
    view = aor_view(pods, f"{fleet.users[0]}@{DOMAIN}")
    assert view
    (binding,) = [b for b in view["bindings"] if fleet.local_ip in b["received"]]
    owner = binding["owner"]
    for pod in pods:
        if owner and (pod["metadata"]["name"] in owner or pod["status"]["podIP"] in owner):
            return pod
    raise AssertionError(f"no ready pod owns {owner!r}: {[p['metadata']['name'] for p in pods]}")


def test_killed_container_and_force_deleted_pod(
    tmp_path: Path,
    node: noderig.Node,
    kube: Kube,
    edge: Deployed,
    phones: Phones,
    kamailio: thrkit.KamailioMain,
) -> None:
    windows = {}
    for how in ("container-killed", "pod-force-deleted"):
        pod = _owner_pod(kube, edge, phones.fleets[0])
        name = pod["metadata"]["name"]
        since = phones.clock()
        if how == "container-killed":
            (status,) = pod["status"]["containerStatuses"]
            cid = status["containerID"].split("://", 1)[1]
            node.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        else:
            kube("delete", "pod", "-n", edge.ns, name, "--force", "--grace-period=0")
        marks = phones.ok_counts()
        assert phones.wait_ok(marks, 90), phones.describe()
        assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
        windows[how] = phones.longest_wait(since, phones.clock())
        wait_midreg_ready(kube, edge.ns, edge.name, edge.spec["replicas"])
        if how == "container-killed":
            (again,) = [p for p in kube.pods(edge.ns, edge.selector) if p["metadata"]["name"] == name]
            assert again["status"]["containerStatuses"][0]["restartCount"] == status["restartCount"] + 1
        else:
            assert name not in {p["metadata"]["name"] for p in kube.pods(edge.ns, edge.selector)}
        print(how, name, "owner of", phones.fleets[0].name, "now", _owner_pod(kube, edge, phones.fleets[0])["metadata"]["name"])
        assert not phones.failures(since), (how, phones.failures(since)[:20])
        assert kamailio.location_size() == (USERS, 2 * USERS)
    call_every_device(tmp_path, kamailio, phones, sample_users(), "after-kill")
    print(f"longest unanswered REGISTER: {windows}")
    assert all(w <= 2.0 for w in windows.values()), windows


def test_scale_out_and_in_under_load_with_the_operator_replaced(
    tmp_path: Path, kube: Kube, edge: Deployed, phones: Phones, kamailio: thrkit.KamailioMain
) -> None:
    since = phones.clock()
    t0 = time.monotonic()
    kube("scale", "midreg", "-n", edge.ns, edge.name, "--replicas=4")
    (op,) = kube.pods(SYSTEM_NS, "app.kubernetes.io/component=operator")
    kube("delete", "pod", "-n", SYSTEM_NS, op["metadata"]["name"], "--wait=false")
    wait_midreg_ready(kube, edge.ns, edge.name, 4, timeout=240)
    scale_out = time.monotonic() - t0
    (new_op,) = [p for p in kube.pods(SYSTEM_NS, "app.kubernetes.io/component=operator") if pod_ready(p)]
    assert new_op["metadata"]["name"] != op["metadata"]["name"]
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    kube("scale", "midreg", "-n", edge.ns, edge.name, "--replicas=2")
    wait_midreg_ready(kube, edge.ns, edge.name, 2, timeout=240)
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    assert not phones.failures(since), phones.failures(since)[:20]
    assert kamailio.location_size() == (USERS, 2 * USERS)
    call_every_device(tmp_path, kamailio, phones, sample_users(), "after-scale")
    print(f"scale-out 2 -> 4 Ready: {scale_out:.1f} s")


def test_pods_hold_their_security_context_under_the_real_runtime(kube: Kube, edge: Deployed) -> None:
    pods = kube.ready_pods(edge.ns, edge.selector)
    name = pods[0]["metadata"]["name"]

    def sh(script: str) -> str:
        return kube("exec", "-n", edge.ns, name, "--", "python3", "-c", script)

    assert sh("import os; print(os.getuid(), os.getgid())").split() == ["10001", "10001"]
    status = sh("print(open('/proc/self/status').read())")
    caps = dict(re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M))
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0, caps
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    refused = sh(
        "import errno\n"
        "out = []\n"
        "for p in ('/probe', '/tmp/probe', '/opt/venv/probe', '/etc/midregistrar/probe'):\n"
        "    try:\n"
        "        open(p, 'w')\n"
        "        out.append('WROTE ' + p)\n"
        "    except OSError as e:\n"
        "        out.append(errno.errorcode[e.errno])\n"
        "print(' '.join(out))"
    )
    assert "WROTE" not in refused, refused
    # The registrar itself runs as that user (PID 1 of the container).
    assert sh("print(open('/proc/1/status').read())").count("10001") >= 2


def test_mode_aor_on_the_node_address(
    tmp_path: Path, kube: Kube, platform: dict[str, float], kamailio: thrkit.KamailioMain
) -> None:
    """examples/aor-hostnetwork.yaml: one pod on the node's own address, phones there, Kamailio forks
    nothing (one aggregated contact per AoR) and the registrar forks the call to every device."""
    docs = example("aor-hostnetwork.yaml")
    (mr,) = [d for d in docs if d["kind"] == "MidRegistrar"]
    spec = mr["spec"]
    spec["mainRegistrar"] = f"sip:{noderig.HOST_IP}:{kamailio.port}"
    spec["etcd"] = {"endpoints": [ETCD_ENDPOINT]}
    spec["replicas"] = 1  # one node
    spec["transports"] = [{"protocol": "udp", "port": 5080}, {"protocol": "tcp", "port": 5080}]
    spec["httpPort"] = 9180
    ns, name = mr["metadata"]["namespace"], mr["metadata"]["name"]
    kube("label", "node", noderig.NODE_NAME, "sip.midregistrar.io/pool=edge", "--overwrite")
    for d in docs:
        if d["kind"] == "Namespace":
            kube.apply(d)
    kube.apply(mr)
    wait_midreg_ready(kube, ns, name, 1)
    (pod,) = kube.ready_pods(ns, SELECTOR.format(name))
    assert pod["spec"]["hostNetwork"] and pod["status"]["podIP"] == noderig.NODE_IP
    users = [f"h{i:03d}" for i in range(100)]
    fleets = [
        ck.Fleet(
            tmp_path, f"h{i}", users, expires=EXPIRES, every_ms=REFRESH_MS, local_ip=noderig.PHONE_IPS[i]
        )
        for i in range(2)
    ]
    target = Addr("node", noderig.NODE_IP, 5080)
    try:
        for f in fleets:
            f.start(target)
        assert all(f.wait_ok(1, 60) for f in fleets), "\n".join(f.describe() for f in fleets)
        view = aor_view([pod], f"h007@{DOMAIN}", port=9180)
        assert view and view["mode"] == "aor"
        assert sorted(b["received"].split(":")[1] for b in view["bindings"]) == sorted(noderig.PHONE_IPS[:2])
        # Kamailio holds ONE aggregated contact per AoR, at the node's address.
        for user in ("h007", "h042", "h099"):
            held = kamailio.lookup(user)
            assert len(held) == 1 and noderig.NODE_IP in held[0].address, held
        phones = Phones.__new__(Phones)
        phones.fleets = fleets
        call_every_device(tmp_path, kamailio, phones, ["h007", "h042"], "aor-calls")
    finally:
        for f in fleets:
            f.stop()
