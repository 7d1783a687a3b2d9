"""Operator replicas as active/standby through kopf peering, on the real control plane.

Two `midregistrar-operator` processes (the operator's ServiceAccount: operator/deploy/rbac.yaml) join one
KopfPeering with priorities hashed from their pod names, exactly as the chart's Deployment starts them.
Only the higher priority reconciles; when it dies (SIGKILL: no farewell keep-alive) the other resumes
within the peering lifetime and reconciles what comes next. Then the chart with replicas=2 renders the
peering bits and the API server accepts them.

Who acted is read from each operator's own log (kopf's JSON records name the object in their `object`
field): every operator applies with the same field manager and kopf progress annotations,
and the suite's standalone operator (tests/cluster/conftest.py) may be watching every namespace too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from midreg_operator.peering import priority_from_name
from tests.cluster.cluster_helpers import Cluster, midregistrar
from tests.support.controlplane import ControlPlane
from tests.support.helm import CHART, Helm
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import wait_for

pytestmark = pytest.mark.cluster

PEERING_CRDS = CHART / "crds" / "kopf-peering.yaml"
PEERING = "midreg-peering-test"
LIFETIME = 10  # seconds (the chart's default is 60; the shortest the chart allows is 10)


@pytest.fixture(scope="module")
def peering_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    for crd in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


@contextlib.contextmanager
def _environ(**env: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _operator(rig: ControlPlane, kubeconfig: Path, pod: str, ns: str) -> Proc:
    """One replica as the chart starts it: --peering and the pod-name priority (downward API: POD_NAME)."""
    exe = Path(sys.executable).parent / "midregistrar-operator"
    args = [
        f"--namespace={ns}",
        f"--liveness=http://127.0.0.1:{free_port()}/healthz",
        "--log-format=json",
        f"--peering={PEERING}",
        "--priority-from-env=POD_NAME",
        f"--peering-lifetime={LIFETIME}",
    ]
    with _environ(KUBECONFIG=str(kubeconfig), POD_NAME=pod, POD_ID=pod):
        return Proc([str(exe), *args], rig.workdir, f"{pod}-{ns}")


def _log(proc: Proc) -> str:
    return proc.output()


def _records(proc: Proc, ns: str) -> list[dict[str, Any]]:
    """The operator's JSON log records about objects in the namespace."""
    out = []
    for line in _log(proc).splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and (rec.get("object") or {}).get("namespace") == ns:
                out.append(rec)
    return out


def _acted_on(proc: Proc, ns: str, name: str) -> list[str]:
    """The messages of the handlers and timers that the operator ran for the object."""
    return [
        r["message"]
        for r in _records(proc, ns)
        if r["object"].get("name") == name and re.match(r"(Handler|Timer) '[^']+' succeeded", r["message"])
    ]


def _in_log(proc: Proc, text: str) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited:\n{proc.tail(40)}")
    return text in _log(proc)


def _reconciled(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    obj = cluster.get("midreg", name, ns) or {}
    observed = obj.get("status", {}).get("observedGeneration")
    if observed != obj.get("metadata", {}).get("generation") or cluster.get("deployment", name, ns) is None:
        return None
    return obj


def test_only_the_higher_priority_acts_and_the_standby_takes_over(
    rig: ControlPlane, cluster: Cluster, operator_kubeconfig: Path, peering_crds: None, ns: str
) -> None:
    cluster.apply(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING, "namespace": ns}}
    )
    # Two pod names whose hashed priorities differ (as any two do, with probability 1 - 2**-31).
    low_pod, high_pod = sorted(
        [f"op-{uuid.uuid4().hex[:5]}", f"op-{uuid.uuid4().hex[:5]}"], key=priority_from_name
    )
    assert priority_from_name(low_pod) < priority_from_name(high_pod)

    # The lower priority first: it runs alone, then yields when the higher one appears (a rolling update).
    low = _operator(rig, operator_kubeconfig, low_pod, ns)
    procs = [low]
    try:
        wait_for(lambda: _in_log(low, "Activity 'configure' succeeded"), 30, f"{low_pod} started")
        high = _operator(rig, operator_kubeconfig, high_pod, ns)
        procs.append(high)
        wait_for(lambda: _in_log(low, "Pausing operations in favour of"), 30, f"{low_pod} pauses")
        # Peering is no lock: until the lower one has seen the higher one's first keep-alive, and while it
        # finishes a listing or handler already under way, both may act (harmless: reconciliation is
        # level-based server-side apply). Let that hand-over settle before the exclusive part.
        time.sleep(3)

        # Created while both run: reconciled by the active (higher) one only.
        cluster.apply(midregistrar("first", ns))
        wait_for(lambda: _reconciled(cluster, ns, "first"), 60, "first reconciled")
        wait_for(lambda: _acted_on(high, ns, "first"), 30, f"{high_pod} reconciles first")
        time.sleep(3)  # more than one resync interval (MIDREG_OPERATOR_RESYNC_SECONDS=2): the timer ran again
        assert len(_acted_on(high, ns, "first")) >= 2, high.tail(40)
        assert not _records(low, ns), low.tail(40)
        assert "Pausing" not in _log(high), high.tail(40)

        # The active one crashes: no farewell, so the standby waits for its keep-alive to expire.
        os.kill(high.pid, signal.SIGKILL)
        high.wait(10)
        killed = time.monotonic()
        wait_for(lambda: _in_log(low, "Resuming operations"), LIFETIME + 15, f"{low_pod} resumes")
        took = time.monotonic() - killed
        assert took <= LIFETIME + 5, f"take-over took {took:.1f}s (peering lifetime {LIFETIME}s)"

        cluster.apply(midregistrar("second", ns))
        wait_for(lambda: _reconciled(cluster, ns, "second"), 60, "second reconciled")
        wait_for(lambda: _acted_on(low, ns, "second"), 30, f"{low_pod} reconciles second after take-over")
        # Delete while an operator still runs: it removes its finalizer. First let the take-over settle (the
        # resumed operator's timer has run for both objects): a deletion within about a second of the
        # resume was seen to leave the finalizer in place although kopf logged "Deletion is processed".
        for name in ("first", "second"):
            wait_for(
                lambda n=name: any(m.startswith("Timer") for m in _acted_on(low, ns, n)),
                30,
                f"{low_pod} resyncs {name}",
            )
        proc = cluster.kubectl("delete", "midreg", "first", "second", "-n", ns, "--timeout=30s", check=False)
        left = cluster.kubectl("get", "midreg", "-n", ns, "-o", "yaml", check=False).stdout
        assert proc.returncode == 0, f"{proc.stderr}\n{left}"
    except (AssertionError, RuntimeError) as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(f"--- {p.name}:\n{p.tail(40)}" for p in procs)) from None
    finally:
        for p in procs:
            p.stop()
    for p in procs:
        refused = [line for line in _log(p).splitlines() if re.search(r" 403 |[Ff]orbidden", line)]
        assert not refused, "\n".join(refused[:10])
        assert "Traceback" not in _log(p), p.tail(60)


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_chart_with_two_replicas_renders_peering_and_passes_the_dry_run(
    rig: ControlPlane, cluster: Cluster, peering_crds: None, scope: str
) -> None:
    helm = Helm(rig)
    ns = f"dry-peer-{uuid.uuid4().hex[:6]}"
    watched = [f"w-{uuid.uuid4().hex[:6]}"] if scope == "namespaced" else []
    for n in [ns, *watched]:
        cluster.kubectl("create", "namespace", n)
    sets = ["--set", "replicas=2", "--set", "peering.lifetimeSeconds=30"]
    if watched:
        sets += ["--set", f"watchNamespaces={{{watched[0]}}}"]
    out = helm("template", "r", str(CHART), "-n", ns, "--include-crds", *sets).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"] for d in docs}
    peering_kind = "KopfPeering" if watched else "ClusterKopfPeering"
    assert peering_kind in kinds
    (peering,) = [d for d in docs if d["kind"] == peering_kind]
    assert peering["metadata"]["name"] == "r-kube-midregistrar"
    if watched:
        assert peering["metadata"]["namespace"] == watched[0]
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert {"--peering=r-kube-midregistrar", "--priority-from-env=POD_NAME", "--peering-lifetime=30"} <= set(
        c["args"]
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    proc = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=out, check=False)
    assert proc.returncode == 0, proc.stderr
    cluster.kubectl("delete", "namespace", ns, *watched, "--wait=false", check=False)
