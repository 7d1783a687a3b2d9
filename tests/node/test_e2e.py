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

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.e2e import (
    ETCD_ENDPOINT,
    EXPIRES,
    PHONES_BEHIND_NAT,
    REFRESH_MS,
    RELEASE,
    SELECTOR,
    SYSTEM_NS,
    USERS,
    Addr,
    Deployed,
    EndpointWatch,
    Kube,
    Phones,
    call_every_device,
    deploy_example,
    diagnostics,
    example,
    owner_pod,
    pod_ready,
    pods_aor_view,
    sample_users,
    wait_midreg_ready,
)
from tests.support.kamailio import KamailioMain
from tests.support.node import HOST_IP, NODE_IP, NODE_NAME, PHONE_IPS, Node
from tests.support.phones import DOMAIN, Fleet
from tests.support.registrar import http_get, metrics
from tests.support.wait import poll, wait_for

pytestmark = pytest.mark.node


def edge_diag(kube: Kube, edge: Deployed, kam: KamailioMain) -> Callable[[list[str]], str]:
    return lambda users: diagnostics(kube, edge.ns, edge.selector, kam, users)


@pytest.fixture(scope="module")
def edge(kube: Kube, platform: dict[str, float], kamailio: KamailioMain) -> Deployed:
    return deploy_example(kube, kamailio)


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
        code, body = http_get(pod["status"]["podIP"], 9090, "/readyz")
        assert (code, body.strip()) == (200, "ready")
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
    tmp_path: Path, kube: Kube, edge: Deployed, phones: Phones, kamailio: KamailioMain
) -> None:
    t0 = time.monotonic()
    phones.start()
    assert phones.wait_ok(1, 90), phones.describe()
    first_round = time.monotonic() - t0
    assert not phones.failures(), phones.failures()[:20]
    devices = 2 * USERS
    # The main registrar holds every device (mode contact: one contact each, relayed once).
    assert poll(lambda: kamailio.location_size() == (USERS, devices), 30), kamailio.location_size()
    for user in sample_users():
        held = kamailio.lookup(user)
        assert len(held) == 2, held
    # The registrar recorded each phone's real source address: no SNAT through the ClusterIP or NodePort.
    pods = kube.ready_pods(edge.ns, edge.selector)
    for user in sample_users():
        view = pods_aor_view(pods, f"{user}@{DOMAIN}")
        assert view is not None, user
        received = sorted(b["received"].split(":")[1] for b in view["bindings"])
        group = 0 if int(user[1:]) < USERS // 2 else 2
        assert received == sorted(PHONE_IPS[group : group + 2]), view
    # Both pods share state through etcd: every pod sees every AoR.
    for pod in pods:
        view = pods_aor_view([pod], f"u0003@{DOMAIN}")
        assert view is not None and len(view["bindings"]) == 2, view
    call_every_device(
        tmp_path, kamailio, phones.fleets, sample_users(), "first-calls", diag=edge_diag(kube, edge, kamailio)
    )

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
    tmp_path: Path, kube: Kube, edge: Deployed, phones: Phones, kamailio: KamailioMain
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
    call_every_device(
        tmp_path,
        kamailio,
        phones.fleets,
        sample_users(),
        "after-rollout",
        diag=edge_diag(kube, edge, kamailio),
    )
    print(
        f"rollout of {edge.spec['replicas']} pods under load: {rollout:.1f} s, longest wait "
        f"{phones.longest_wait(since, phones.clock()):.2f} s"
    )


def test_killed_container_and_force_deleted_pod(
    tmp_path: Path,
    node: Node,
    kube: Kube,
    edge: Deployed,
    phones: Phones,
    kamailio: KamailioMain,
) -> None:
    windows = {}
    slowest = {}
    for how in ("container-killed", "pod-force-deleted"):
        pod = owner_pod(kube, edge, phones.fleets[0])
        name = pod["metadata"]["name"]
        endpoints = EndpointWatch(kube, edge.ns, edge.name)
        since = phones.clock()
        killed_at = time.time()
        if how == "container-killed":
            (status,) = pod["status"]["containerStatuses"]
            cid = status["containerID"].split("://", 1)[1]
            node.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        else:
            kube("delete", "pod", "-n", edge.ns, name, "--force", "--grace-period=0")
        marks = phones.ok_counts()
        assert phones.wait_ok(marks, 90), phones.describe()
        assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
        endpoints.stop()
        windows[how] = phones.longest_wait(since, phones.clock())
        gone = endpoints.not_ready_at(pod["status"]["podIP"])
        slowest[how] = [
            f"endpoint not ready {gone - killed_at:.2f} s after" if gone else "endpoint change not seen",
            *phones.slowest(since, phones.clock(), 3),
        ]
        wait_midreg_ready(kube, edge.ns, edge.name, edge.spec["replicas"])
        if how == "container-killed":
            (again,) = [p for p in kube.pods(edge.ns, edge.selector) if p["metadata"]["name"] == name]
            assert again["status"]["containerStatuses"][0]["restartCount"] == status["restartCount"] + 1
        else:
            assert name not in {p["metadata"]["name"] for p in kube.pods(edge.ns, edge.selector)}
        print(
            how,
            name,
            "owner of",
            phones.fleets[0].name,
            "now",
            owner_pod(kube, edge, phones.fleets[0])["metadata"]["name"],
        )
        assert not phones.failures(since), (how, phones.failures(since)[:20])
        assert kamailio.location_size() == (USERS, 2 * USERS)
    call_every_device(
        tmp_path, kamailio, phones.fleets, sample_users(), "after-kill", diag=edge_diag(kube, edge, kamailio)
    )
    print(f"longest unanswered REGISTER: {windows}; {slowest}")
    assert all(w <= 2.0 for w in windows.values()), (windows, slowest)


def test_scale_out_and_in_under_load_with_the_operator_replaced(
    tmp_path: Path, kube: Kube, edge: Deployed, phones: Phones, kamailio: KamailioMain
) -> None:
    since = phones.clock()
    t0 = time.monotonic()
    kube("scale", "midreg", "-n", edge.ns, edge.name, "--replicas=4")
    (op,) = kube.pods(SYSTEM_NS, "app.kubernetes.io/component=operator")
    kube("delete", "pod", "-n", SYSTEM_NS, op["metadata"]["name"], "--wait=false")
    wait_midreg_ready(kube, edge.ns, edge.name, 4, timeout=240)
    scale_out = time.monotonic() - t0
    # The new operator may reconcile a moment before it is Ready (its probe waits for the webhook to listen).
    (new_op,) = wait_for(
        lambda: kube.ready_pods(SYSTEM_NS, "app.kubernetes.io/component=operator"),
        60,
        "the new operator Ready",
    )
    assert new_op["metadata"]["name"] != op["metadata"]["name"]
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    # The Service keeps each phone's flow on its pod (ClientIP affinity), so the new pods took no phone and
    # the ReplicaSet would remove them first. Make it remove the pods holding the phones' flows instead, as
    # an operator would before draining busy pods: their phones have to move.
    owners = {owner_pod(kube, edge, f)["metadata"]["name"] for f in phones.fleets}
    for name in owners:
        kube("annotate", "pod", "-n", edge.ns, name, "controller.kubernetes.io/pod-deletion-cost=-1000")
    kube("scale", "midreg", "-n", edge.ns, edge.name, "--replicas=2")
    wait_midreg_ready(kube, edge.ns, edge.name, 2, timeout=240)
    survivors = {p["metadata"]["name"] for p in kube.ready_pods(edge.ns, edge.selector)}
    drained = owners - survivors
    assert drained, (owners, survivors)
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    assert phones.wait_ok(phones.ok_counts(), 60), phones.describe()
    assert not phones.failures(since), phones.failures(since)[:20]
    # Every fleet's flow is now held by a pod that stays.
    for f in phones.fleets:
        assert owner_pod(kube, edge, f)["metadata"]["name"] in survivors
    assert kamailio.location_size() == (USERS, 2 * USERS)
    # After the rollout, the lost pods and the scaling: every phone is callable.
    every = [f"u{i:04d}" for i in range(USERS)]
    call_every_device(
        tmp_path,
        kamailio,
        phones.fleets,
        every,
        "after-scale",
        rate=100,
        diag=edge_diag(kube, edge, kamailio),
    )
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
    tmp_path: Path, kube: Kube, platform: dict[str, float], kamailio: KamailioMain
) -> None:
    """examples/aor-hostnetwork.yaml: one pod on the node's own address, phones there, Kamailio forks
    nothing (one aggregated contact per AoR) and the registrar forks the call to every device."""
    docs = example("aor-hostnetwork.yaml")
    (mr,) = [d for d in docs if d["kind"] == "MidRegistrar"]
    spec = mr["spec"]
    spec["mainRegistrar"] = f"sip:{HOST_IP}:{kamailio.port}"
    spec["etcd"] = {"endpoints": [ETCD_ENDPOINT]}
    spec["replicas"] = 1  # one node
    spec["transports"] = [{"protocol": "udp", "port": 5080}, {"protocol": "tcp", "port": 5080}]
    spec["httpPort"] = 9180
    spec["limits"] = PHONES_BEHIND_NAT
    ns, name = mr["metadata"]["namespace"], mr["metadata"]["name"]
    kube("label", "node", NODE_NAME, "sip.midregistrar.io/pool=edge", "--overwrite")
    for d in docs:
        if d["kind"] == "Namespace":
            kube.apply(d)
    kube.apply(mr)
    wait_midreg_ready(kube, ns, name, 1)
    (pod,) = kube.ready_pods(ns, SELECTOR.format(name))
    assert pod["spec"]["hostNetwork"] and pod["status"]["podIP"] == NODE_IP
    users = [f"h{i:03d}" for i in range(USERS)]
    fleets = [
        Fleet(tmp_path, f"h{i}", users, expires=EXPIRES, every_ms=REFRESH_MS, local_ip=PHONE_IPS[i])
        for i in range(2)
    ]
    target = Addr("node", NODE_IP, 5080)
    try:
        for f in fleets:
            f.start(target)
        assert all(f.wait_ok(1, 60) for f in fleets), "\n".join(f.describe() for f in fleets)
        view = pods_aor_view([pod], f"h007@{DOMAIN}", port=9180)
        assert view and view["mode"] == "aor"
        assert sorted(b["received"].split(":")[1] for b in view["bindings"]) == sorted(PHONE_IPS[:2])
        # Kamailio holds ONE aggregated contact per AoR, at the node's address (next to the 2,000 contacts of
        # the mode contact MidRegistrar's phones, still registered).
        want = (2 * USERS, 2 * USERS + USERS)
        assert poll(lambda: kamailio.location_size() == want, 20), kamailio.location_size()
        for user in ("h007", "h042", "h999"):
            held = kamailio.lookup(user)
            assert len(held) == 1 and NODE_IP in held[0].address, held
        call_every_device(tmp_path, kamailio, fleets, ["h007", "h042"], "aor-calls")
    finally:
        for f in fleets:
            f.stop()
