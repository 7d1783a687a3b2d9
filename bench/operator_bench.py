"""Operator benchmark on the loopback control plane (tests/support/controlplane.py), from the repository's
root:

    python -m bench.operator_bench [--runs 5] [--count 100]

Measures, with the operator running as its own process (`midregistrar-operator`, default settings):
- apply → Deployment: from the start of `kubectl apply` of one MidRegistrar to its Deployment existing;
- apply → Ready: to the MidRegistrar's Ready condition True (pods Running/Ready through kwok);
  repeated --runs times, each on a new MidRegistrar (2 replicas);
- 100 at once: `kubectl apply` of --count MidRegistrars (1 replica each) in one file, time until every
  one has its Deployment and until every one is Ready.

Polling uses the admin client certificate against the API server every 20 ms (50 ms for the batch), so
figures carry up to that much quantisation. Prints a markdown table and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import ssl
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import REPO
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.process import Proc

CRD = REPO / "crds" / "midregistrar.yaml"


class Api:
    def __init__(self, cp: ControlPlane) -> None:
        assert cp.pki is not None
        self.server = cp.server
        self.ctx = ssl.create_default_context(cafile=str(cp.pki.ca))
        self.ctx.load_cert_chain(str(cp.pki.dir / "admin.crt"), str(cp.pki.dir / "admin.key"))

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.server + path, context=self.ctx, timeout=5) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def midregistrar(name: str, namespace: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "sip.midregistrar.io/v1alpha1",
        "kind": "MidRegistrar",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "mainRegistrar": "sip:pbx.example.com:5060",
            "replicas": replicas,
            "network": {"serviceType": "ClusterIP"},
        },
    }


def is_ready(obj: dict[str, Any] | None) -> bool:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def wait(fn: Any, timeout: float, interval: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError


def single(cp: ControlPlane, api: Api, ns: str, i: int) -> tuple[float, float]:
    name = f"one-{i}"
    body = json.dumps(midregistrar(name, ns, 2))
    t0 = time.monotonic()
    cp.kubectl("apply", "-f", "-", input=body)
    t_dep = wait(lambda: api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}"), 60, 0.02)
    t_ready = wait(
        lambda: is_ready(api.get(f"/apis/sip.midregistrar.io/v1alpha1/namespaces/{ns}/midregistrars/{name}")),
        120,
        0.02,
    )
    return t_dep - t0, t_ready - t0


def batch(cp: ControlPlane, api: Api, ns: str, count: int) -> tuple[float, float, float]:
    items = [midregistrar(f"many-{i:03d}", ns, 1) for i in range(count)]
    text = "\n---\n".join(json.dumps(o) for o in items)
    t0 = time.monotonic()
    cp.kubectl("apply", "-f", "-", input=text)
    t_applied = time.monotonic()

    def all_deployments() -> bool:
        lst = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments") or {}
        return len(lst.get("items", [])) >= count

    def all_ready() -> bool:
        lst = api.get(f"/apis/sip.midregistrar.io/v1alpha1/namespaces/{ns}/midregistrars") or {}
        return sum(is_ready(o) for o in lst.get("items", [])) >= count

    t_dep = wait(all_deployments, 600, 0.05)
    t_ready = wait(all_ready, 900, 0.05)
    return t_applied - t0, t_dep - t0, t_ready - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args()
    with control_plane() as cp:
        cp.add_fake_node("kwok-node-0")
        cp.kubectl("apply", "--server-side", "-f", str(CRD))
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/midregistrars.sip.midregistrar.io", "--timeout=60s"
        )
        api = Api(cp)
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        operator = start_operator(cp, env)
        try:
            cp.kubectl("create", "namespace", "bench-one")
            cp.kubectl("create", "namespace", "bench-many")
            single(cp, api, "bench-one", 999)  # warm-up: the operator's first watch events and clients
            runs = [single(cp, api, "bench-one", i) for i in range(args.runs)]
            applied, many_dep, many_ready = batch(cp, api, "bench-many", args.count)
        finally:
            operator.stop()
    dep = [r[0] for r in runs]
    ready = [r[1] for r in runs]
    cmd = "python -m bench.operator_bench " + shlex.join([f"--runs={args.runs}", f"--count={args.count}"])
    print("## Operator\n")
    print(f"`{cmd}` on {platform.machine()} with {os.cpu_count()} cores; control plane v1.37.2 on loopback,")
    print("kwok pods, operator as a separate process with default settings (resync timer 30 s).\n")
    print("| measure | median | min | max |")
    print("|---|---|---|---|")
    print(f"| kubectl apply → Deployment created (n={len(dep)}) | {med(dep)} | {mn(dep)} | {mx(dep)} |")
    print(
        f"| kubectl apply → Ready, 2 kwok pods (n={len(ready)}) | {med(ready)} | {mn(ready)} | {mx(ready)} |"
    )
    print(f"| {args.count} MidRegistrars in one apply: kubectl apply returns | {applied:.2f} s | | |")
    print(f"| {args.count} MidRegistrars: all Deployments created | {many_dep:.2f} s | | |")
    print(f"| {args.count} MidRegistrars: all Ready (1 kwok pod each) | {many_ready:.2f} s | | |")
    return 0


def start_operator(cp: ControlPlane, env: dict[str, str]) -> Proc:
    exe = Path(sys.executable).parent / "midregistrar-operator"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "midreg_operator"]
    argv += ["--liveness", "", "--log-format", "plain"]
    proc = Proc(argv, cp.workdir, "operator", env={"KUBECONFIG": env["KUBECONFIG"]})
    time.sleep(3)
    if not proc.alive():
        raise RuntimeError(proc.tail())
    return proc


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s"


def mn(xs: list[float]) -> str:
    return f"{min(xs):.2f} s"


def mx(xs: list[float]) -> str:
    return f"{max(xs):.2f} s"


if __name__ == "__main__":
    sys.exit(main())
