"""The operator's NetworkPolicy, enforced on the real node by kube-network-policies (tests/support/netpol.py),
checked with real packets from real pods: a probe pod in a namespace that `metricsFrom` names and one in a
namespace that nothing names (the registrar image, whose Python sends the probes), Kamailio on the host as the
main registrar and SIPp phones on the host.

In order, on one MidRegistrar (2 pods, etcd, mode contact, the Service's address advertised so that the
main registrar's requests land on either pod and are handed to the flow's owner):
the HTTP port answers the monitoring namespace and drops the other one; SIP answers everyone while
`sipFrom` is unset; with `sipFrom` narrowed, the unlisted pod's SIP is dropped while the listed peers still
get through and the pods still hand each other requests; with `networkPolicy.enabled: false` the HTTP port
answers the other namespace too, so the drops came from the policy, not from the rig.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import (
    ETCD_ENDPOINT,
    SELECTOR,
    Addr,
    Kube,
    call_every_device,
    diagnostics,
    midregistrar,
    pod_ready,
    wait_midreg_ready,
)
from tests.support.kamailio import KamailioMain
from tests.support.netpol import PolicyAgent
from tests.support.node import LINK_PREFIX, PHONE_IPS, Node
from tests.support.phones import Fleet
from tests.support.registrar import metric, parse_metrics
from tests.support.sip import sip_request
from tests.support.wait import poll

pytestmark = pytest.mark.node

NS = "voip-np"
NAME = "np-edge"
MONITORING = "np-monitoring"  # named in metricsFrom (and, narrowed, in sipFrom)
OTHER = "np-other"  # named nowhere
HTTP_PORT = 9090
SIP_PORT = 5060
LINK = f"{LINK_PREFIX}.0/24"  # the host's side of the node's link: Kamailio (main) and the phones
IMAGE = "ghcr.io/kube-midregistrar/registrar:0.1.0"
USERS = 10  # per fleet

# Run inside a probe pod: one HTTP GET or one UDP request from a fresh source port (a new flow, which the
# agent judges; an established one it would let through). A drop shows as a timeout.
PROBE = """
import base64, socket, sys, urllib.request
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == "http":
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=3) as r:
            print(r.status)
            print(r.read().decode())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.bind(("0.0.0.0", int(sys.argv[5])))
        s.sendto(base64.b64decode(sys.argv[4]), (host, port))
        print(s.recv(65535).split(b"\\r\\n", 1)[0].decode())
except OSError as e:
    print(f"no answer: {e}")
"""


class Probe:
    """A pod that sends probes from its own namespace."""

    def __init__(self, kube: Kube, ns: str) -> None:
        self.kube, self.ns = kube, ns

    @property
    def ip(self) -> str:
        ip: str = self.kube.json("get", "pod", "-n", self.ns, "probe")["status"]["podIP"]
        return ip

    def _run(self, *args: str) -> str:
        return self.kube("exec", "-n", self.ns, "probe", "--", "python3", "-c", PROBE, *args)

    def http(self, host: str) -> str:
        """The status line of GET /metrics and the body, or "no answer: …"."""
        return self._run("http", host, str(HTTP_PORT))

    def options(self, host: str) -> str:
        """The status line of the answer to an OPTIONS over UDP, or "no answer: …"."""
        port = random.randint(20000, 60000)
        msg = sip_request("OPTIONS", f"sip:{host}:{SIP_PORT}", (self.ip, port))
        return self._run("udp", host, str(SIP_PORT), base64.b64encode(msg).decode(), str(port)).strip()


def answered(out: str) -> bool:
    return not out.startswith("no answer")


def dropped(out: str) -> bool:
    """No answer because the packets were dropped (a refusal would say so at once)."""
    return out.startswith("no answer") and "timed out" in out


def probe_pod(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "probe",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", "import time; time.sleep(86400)"],
                }
            ],
        },
    }


def set_policy(kube: Kube, network_policy: dict[str, Any]) -> None:
    patch = {"spec": {"networkPolicy": network_policy}}
    kube("patch", "midreg", "-n", NS, NAME, "--type=merge", "-p", json.dumps(patch))


def policy(kube: Kube) -> dict[str, Any] | None:
    out = kube("get", "networkpolicy", "-n", NS, NAME, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def registrar_ips(kube: Kube) -> list[str]:
    return [p["status"]["podIP"] for p in kube.ready_pods(NS, SELECTOR.format(NAME))]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def enforcing(node: Node, platform: dict[str, float]) -> Iterator[PolicyAgent]:
    t0 = time.monotonic()
    agent = PolicyAgent(node).start()
    print(f"kube-network-policies enforcing {time.monotonic() - t0:.1f} s after its start")
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def probes(kube: Kube, platform: dict[str, float]) -> Iterator[dict[str, Probe]]:
    for ns in (MONITORING, OTHER):
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        kube.apply(probe_pod(ns))
    for ns in (MONITORING, OTHER):
        kube.wait(
            lambda ns=ns: pod_ready(kube.json("get", "pod", "-n", ns, "probe")), 90, f"{ns}/probe Ready"
        )
    yield {ns: Probe(kube, ns) for ns in (MONITORING, OTHER)}
    for ns in (MONITORING, OTHER):
        kube("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def tier(kube: Kube, platform: dict[str, float], kamailio: KamailioMain) -> Iterator[None]:
    """The MidRegistrar, its Service's cluster IP advertised (a second rollout: the address exists only once
    the Service does)."""
    metrics_from = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING}}}]
    mr = midregistrar(
        NS, NAME, kamailio,
        transports=[{"protocol": "udp", "port": SIP_PORT}, {"protocol": "tcp", "port": SIP_PORT}],
        etcd={"endpoints": [ETCD_ENDPOINT]}, replicas=2, httpPort=HTTP_PORT,
        networkPolicy={"metricsFrom": metrics_from},
    )  # fmt: skip
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    kube.apply(mr)
    wait_midreg_ready(kube, NS, NAME, 2)
    cluster_ip = kube.json("get", "service", "-n", NS, NAME)["spec"]["clusterIP"]
    first = {p["metadata"]["name"] for p in kube.pods(NS, SELECTOR.format(NAME))}
    mr["spec"]["network"]["advertise"] = cluster_ip
    kube.apply(mr)
    kube.wait(lambda: not first & {p["metadata"]["name"] for p in kube.pods(NS, SELECTOR.format(NAME))}, 120,
              "the pods replaced")  # fmt: skip
    wait_midreg_ready(kube, NS, NAME, 2)
    yield
    kube("delete", "namespace", NS, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------------- tests


def test_http_port_answers_only_the_metrics_namespace(
    kube: Kube, enforcing: PolicyAgent, probes: dict[str, Probe], tier: None
) -> None:
    assert policy(kube) is not None
    for ip in registrar_ips(kube):
        ok = probes[MONITORING].http(ip)
        assert ok.startswith("200"), (ip, ok[:200], enforcing.log())
        assert "midregistrar_" in ok
        assert poll(lambda ip=ip: dropped(probes[OTHER].http(ip)), 30, 0.5), (ip, enforcing.log())


def test_sip_answers_everyone_without_sip_from(
    kube: Kube, enforcing: PolicyAgent, probes: dict[str, Probe], tier: None
) -> None:
    for ip in registrar_ips(kube):
        for ns in (OTHER, MONITORING):
            out = probes[ns].options(ip)
            assert out.startswith("SIP/2.0 "), (ns, ip, out, enforcing.log())


def test_sip_from_narrowed_drops_unlisted_pods_and_keeps_the_hand_off(
    tmp_path: Path,
    kube: Kube,
    enforcing: PolicyAgent,
    probes: dict[str, Probe],
    tier: None,
    kamailio: KamailioMain,
) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING}}}
    set_policy(kube, {"metricsFrom": [monitoring], "sipFrom": [{"ipBlock": {"cidr": LINK}}, monitoring]})
    kube.wait(lambda: len((policy(kube) or {})["spec"]["ingress"]) == 3, 60, "the policy with sipFrom")
    ips = registrar_ips(kube)
    for ip in ips:
        assert poll(lambda ip=ip: dropped(probes[OTHER].options(ip)), 30, 0.5), (ip, enforcing.log())
        out = probes[MONITORING].options(ip)
        assert out.startswith("SIP/2.0 "), (ip, out, enforcing.log())

    # The pods' hand-off: one fleet of phones registers at each pod directly (each pod owns its fleet's
    # flows); Kamailio's calls all go to the advertised Service address and land on one pod (one flow from
    # Kamailio), which hands the other pod's calls over to it, from pod to pod, which only the policy's
    # own-pods rule allows.
    def handoffs() -> float:
        return sum(
            metric(parse_metrics(probes[MONITORING].http(ip).split("\n", 1)[1]), "midregistrar_handoffs")
            for ip in ips
        )

    before = handoffs()
    fleets = [
        Fleet(tmp_path, f"np{i}", [f"np{i}u{j:02d}" for j in range(USERS)], expires=600, every_ms=60000,
              local_ip=PHONE_IPS[i])
        for i in range(2)
    ]  # fmt: skip
    try:
        for fleet, ip in zip(fleets, ips, strict=True):
            fleet.start(Addr(ip, ip, SIP_PORT))
        for fleet in fleets:
            assert fleet.wait_ok(1, 30), fleet.describe()
        users = [u for f in fleets for u in f.users]
        call_every_device(
            tmp_path, kamailio, fleets, users, "np-calls",
            diag=lambda us: diagnostics(kube, NS, SELECTOR.format(NAME), kamailio, us) + enforcing.log(),
        )  # fmt: skip
    finally:
        for fleet in fleets:
            fleet.stop()
    handed = handoffs() - before
    assert handed >= USERS, (before, handed)
    print(f"{2 * USERS} calls through one pod reached every phone; hand-offs between the pods: {handed:.0f}")


def test_without_the_policy_the_http_port_answers_everyone(
    kube: Kube, enforcing: PolicyAgent, probes: dict[str, Probe], tier: None
) -> None:
    set_policy(kube, {"enabled": False})
    kube.wait(lambda: policy(kube) is None, 60, "the NetworkPolicy removed")
    for ip in registrar_ips(kube):
        assert poll(lambda ip=ip: probes[OTHER].http(ip).startswith("200"), 30, 0.5), (ip, enforcing.log())
