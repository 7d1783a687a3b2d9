"""Makes the test node enforce NetworkPolicies: SIG Network's kube-network-policies (built by
``scripts/k8s-rig.sh node``) runs on the node as a process, beside the ``ptp`` CNI, which enforces nothing.

The agent decides each new connection's fate in user space: the kernel hands it the first packet through an
nfqueue and it answers accept or drop from the NetworkPolicies, pods and namespaces it watches. It diverts
those packets with an nftables ``queue`` rule of its own, but this VM's kernel lacks that expression
(``CONFIG_NFT_QUEUE`` is not set: ``nft add rule … queue num 100`` fails with "No such file or directory"),
so its ruleset is refused as a whole. The kernel does have the xtables ``NFQUEUE`` target, so the rig diverts
the same packets to the agent's queue with iptables (:data:`DIVERT`), mirroring the agent's own rules: not
the node's own root-owned traffic (kubelet probes), not established flows, only packets to pods (the
policies are ingress policies). Where the kernel has ``nft_queue`` the agent's rules apply too and a packet is
judged twice, with the same verdict. Fail closed, as the agent is by default: with the rule in place and no
agent listening, new connections to pods are dropped, so :meth:`PolicyAgent.stop` removes the rule first.

The agent only knows the in-cluster configuration (a service account token and CA under
``/var/run/secrets/kubernetes.io/serviceaccount``, the API server from ``KUBERNETES_SERVICE_HOST``): it runs
in a mount namespace of its own with a tmpfs on ``/run`` where that directory links to the rig's, so nothing
is written to the host's ``/run``. Its NRI plugin finds no NRI socket there and stops (v0.8.0 starts it
whatever ``--disable-nri`` says); the pods' addresses then come from the API server alone.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.node import NODE_NAME, POD_CIDR, Node
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import wait_for

NAME = "kube-network-policies"
NAMESPACE = "kube-system"
QUEUE = 100
CHAIN = "MIDREG-NETPOL"
SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"
# The agent's nftables rules, as iptables rules in the node's mangle POSTROUTING (after Service DNAT).
DIVERT = (
    ("-m", "owner", "--uid-owner", "0", "-j", "RETURN"),
    ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"),
    ("-d", POD_CIDR, "-j", "NFQUEUE", "--queue-num", str(QUEUE)),
)
# The upstream install.yaml's RBAC: the agent lists and watches pods, namespaces and NetworkPolicies.
RBAC = [
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": NAMESPACE}},
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": NAME},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
            {
                "apiGroups": ["networking.k8s.io"],
                "resources": ["networkpolicies"],
                "verbs": ["list", "watch"],
            },
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    },
]


class PolicyAgent:
    """kube-network-policies on `node`, its packets diverted to it: `start()` returns once the node enforces
    NetworkPolicies, `stop()` once it no longer does."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.workdir = node.workdir / NAME
        self.proc: Proc | None = None

    def start(self) -> PolicyAgent:
        assert self.node.cp is not None and self.node.cp.pki is not None
        self.workdir.mkdir(exist_ok=True)
        for obj in RBAC:
            self.node.kubectl("apply", "-f", "-", input=json.dumps(obj))
        token = self.node.kubectl("create", "token", "-n", NAMESPACE, NAME, "--duration=2h").stdout
        sa = self.workdir / "serviceaccount"
        sa.mkdir(exist_ok=True)
        (sa / "token").write_text(token.strip())
        (sa / "ca.crt").write_bytes(self.node.cp.pki.ca.read_bytes())
        (sa / "namespace").write_text(NAMESPACE)
        api = urlsplit(self.node.cp.server)
        # In the node's network namespace, then a private mount namespace whose /run is a tmpfs holding only
        # the link to the token directory.
        setup = f'mount -t tmpfs -o size=1m {NAME} /run && mkdir -p {Path(SA_DIR).parent} && ln -s "$0" {SA_DIR} && exec "$@"'
        argv = self.node.in_netns(
            [
                "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup, str(sa),
                str(self.node.bindir / NAME),
                f"--hostname-override={NODE_NAME}",
                f"--nfqueue-id={QUEUE}",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                "--v=2",  # each verdict in the log: what a failed policy test needs
            ]
        )  # fmt: skip
        env = {"KUBERNETES_SERVICE_HOST": str(api.hostname), "KUBERNETES_SERVICE_PORT": str(api.port)}
        self.proc = Proc(argv, self.workdir, NAME, env=env)
        self.node.adopt([self.proc])
        wait_for(self._listening, 60, f"{NAME} bound to nfqueue {QUEUE}", proc=self.proc)
        self._iptables("-N", CHAIN)
        for rule in DIVERT:
            self._iptables("-A", CHAIN, *rule)
        self._iptables("-A", "POSTROUTING", "-j", CHAIN)
        return self

    def _listening(self) -> bool:
        """The agent's queue is bound (/proc/net is the reader's network namespace's)."""
        queues = self.node.ns("cat", "/proc/net/netfilter/nfnetlink_queue", check=False)
        return any(line.split()[:1] == [str(QUEUE)] for line in queues.splitlines())

    def _iptables(self, *args: str, check: bool = True) -> str:
        return self.node.ns("iptables", "-w", "-t", "mangle", *args, check=check)

    def log(self, n: int = 60) -> str:
        return self.proc.tail(n) if self.proc else ""

    def stop(self) -> None:
        """Divert nothing more, then stop the agent (SIGINT: it removes its own nftables table, if any)."""
        self._iptables("-D", "POSTROUTING", "-j", CHAIN, check=False)
        self._iptables("-F", CHAIN, check=False)
        self._iptables("-X", CHAIN, check=False)
        if self.proc is not None:
            self.proc.stop(timeout=15, first=signal.SIGINT)  # it exits 5 s after SIGINT (not on SIGTERM)
