"""The registrar on a real node (tests/support/node.py), from the repository's root, as root:

    python -m bench.node_bench [--kills 3]

Measures, with the images built here, the chart installed by helm and 2,000 SIPp phones (1,000 AoRs, two
devices each, half through the SIP Service's cluster IP and half through its node port, refreshing every
15 s) with Kamailio on the host as the main registrar:
- the node tier's own start: binaries (cached build), images (cached build), control plane, image import,
  node Ready;
- `helm install` (with --wait) to the first REGISTER answered through the Service by a registrar pod
  (examples/contact-loadbalancer.yaml applied right after the install);
- scale-out 2 → 4: `kubectl scale midreg` to 4 pods Ready;
- a rolling update of the 4 pods under the phones' load (a spec change that changes the configuration):
  duration until 4 new pods are Ready, REGISTERs that failed, the longest a phone waited for an answer;
- the unanswered window when a registrar pod is lost: the longest a phone of the pod's flows waited for an
  answer, after its container is killed (SIGKILL through containerd) and after the pod is force-deleted,
  --kills times each (median and worst).
Prints a markdown table and the exact command.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.support.e2e import (
    Deployed,
    Kube,
    Phones,
    deploy_example,
    install_chart,
    owner_pod,
    pod_ready,
    start_kamailio,
    wait_midreg_ready,
)
from tests.support.helm import Helm
from tests.support.node import PHONE_IPS, Node, running_node
from tests.support.phones import DOMAIN
from tests.support.sip import sip_request, status_code, udp_exchange


def first_register(target: tuple[str, int], timeout: float = 120) -> float:
    """Seconds until one REGISTER sent to `target` is answered 200 (one try per 100 ms)."""
    t0 = time.monotonic()
    call_id = f"first-register@{PHONE_IPS[0]}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((PHONE_IPS[0], 0))
        local = sock.getsockname()
        cseq = 1
        while time.monotonic() - t0 < timeout:
            msg = sip_request(
                "REGISTER",
                f"sip:{DOMAIN}",
                local,
                headers=[("Contact", f"<sip:bench@{local[0]}:{local[1]}>;expires=60")],
                call_id=call_id,
                cseq=cseq,
                from_uri=f"sip:bench@{DOMAIN}",
                to_uri=f"sip:bench@{DOMAIN}",
            )
            cseq += 1
            if status_code(udp_exchange(target, msg, timeout=0.1, sock=sock)) == 200:
                return time.monotonic() - t0
    raise TimeoutError(f"no 200 from {target} within {timeout} s")


def rollout_steps(pods: list[dict[str, Any]]) -> str:
    """For each pod, in creation order: seconds from the previous pod's creation and its own time to Ready
    (API timestamps, 1 s resolution)."""

    def ts(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    rows = []
    for pod in pods:
        ready = [
            c for c in pod["status"].get("conditions") or [] if c["type"] == "Ready" and c["status"] == "True"
        ]
        if ready:
            rows.append((ts(pod["metadata"]["creationTimestamp"]), ts(ready[0]["lastTransitionTime"])))
    rows.sort()
    out, prev = [], None
    for created, ready_at in rows:
        gap = "" if prev is None else f"+{created - prev:.0f} s, "
        out.append(f"{gap}ready in {ready_at - created:.0f} s")
        prev = created
    return "; ".join(out)


def lose_pod(node: Node, kube: Kube, edge: Deployed, phones: Phones, how: str) -> float:
    pod = owner_pod(kube, edge, phones.fleets[0])
    since = phones.clock()
    if how == "container":
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        node.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
    else:
        kube("delete", "pod", "-n", edge.ns, pod["metadata"]["name"], "--force", "--grace-period=0")
    phones.wait_ok(phones.ok_counts(), 90)
    phones.wait_ok(phones.ok_counts(), 60)
    window = phones.longest_wait(since, phones.clock())
    wait_midreg_ready(kube, edge.ns, edge.name, int(edge.spec["replicas"]))
    return window


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=3, help="pod losses of each kind (default 3)")
    args = ap.parse_args()
    command = "python -m bench.node_bench " + shlex.join(sys.argv[1:])
    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="node-bench-"))
    with running_node() as node:
        for k, v in node.timings.items():
            rows.append((f"node tier: {k.removesuffix('_s').replace('_', ' ')}", f"{v:.1f} s"))
        kube = Kube(node)
        assert node.cp is not None
        kam = start_kamailio(tmp / "kamailio")
        try:
            t0 = time.monotonic()
            helm_s = install_chart(node, kube, Helm(node.cp))
            edge = deploy_example(kube, kam)
            first_register(edge.clusterip.addr)
            rows.append(("helm install (--wait)", f"{helm_s:.1f} s"))
            rows.append(
                (
                    "helm install start → first REGISTER answered via the Service",
                    f"{time.monotonic() - t0:.1f} s",
                )
            )
            t1 = time.monotonic()
            kube("scale", "midreg", "-n", edge.ns, edge.name, "--replicas=4")
            wait_midreg_ready(kube, edge.ns, edge.name, 4, timeout=240)
            rows.append(("scale-out 2 → 4 pods Ready", f"{time.monotonic() - t1:.1f} s"))
            edge.spec["replicas"] = 4
            phones = Phones(tmp / "phones", edge.clusterip, edge.nodeport).start()
            assert phones.wait_ok(1, 90), phones.describe()
            since = phones.clock()
            old = {p["metadata"]["name"] for p in kube.pods(edge.ns, edge.selector)}
            t2 = time.monotonic()
            kube(
                "patch",
                "midreg",
                "-n",
                edge.ns,
                edge.name,
                "--type=merge",
                "-p",
                '{"spec":{"maxContacts":12}}',
            )

            def rolled() -> bool:
                ready = {p["metadata"]["name"] for p in kube.pods(edge.ns, edge.selector) if pod_ready(p)}
                return len(ready) == 4 and not ready & old

            kube.wait(rolled, 300, "rollout of 4 pods")
            rollout = time.monotonic() - t2
            steps = rollout_steps(kube.pods(edge.ns, edge.selector))
            phones.wait_ok(phones.ok_counts(), 60)
            phones.wait_ok(phones.ok_counts(), 60)
            failed = phones.failures(since)
            rows.append(("rollout of 4 pods under load (2,000 phones)", f"{rollout:.1f} s"))
            rows.append(("  each new pod: created → Ready", steps))
            rows.append(("  REGISTERs failed during the rollout", str(len(failed))))
            rows.append(
                ("  longest wait for an answer", f"{phones.longest_wait(since, phones.clock()):.2f} s")
            )
            for how in ("container", "pod"):
                windows = [lose_pod(node, kube, edge, phones, how) for _ in range(args.kills)]
                label = "container killed" if how == "container" else "pod force-deleted"
                rows.append(
                    (
                        f"unanswered window, {label} (×{args.kills})",
                        f"median {statistics.median(windows):.2f} s, worst {max(windows):.2f} s",
                    )
                )
            rows.append(("REGISTERs failed in all of the above", str(len(phones.failures(since)))))
            phones.stop()
        finally:
            kam.stop()
    print(f"\n`{command}`\n")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
