"""What the integration, cluster and node tests and the benchmarks share to run real processes: not part of
the product (neither the wheel nor the images carry it), imported as ``tests.support.<module>`` from the
repository's root (pytest's ``pythonpath``, or ``python -m bench.<name>``).

- ``process``: one child process, stopped by its PID, output in files; CPU use from /proc.
- ``wait``: polling a condition until it holds (sync and async).
- ``ports``: free loopback ports below the kernel's ephemeral range, never handed out twice at once.
- ``stats``: the one percentile definition every benchmark reports.
- ``pki``: a throw-away certificate authority (openssl).
- ``etcd``: a throw-away etcd member.
- ``sip``, ``sipp``, ``kamailio``, ``registrar``, ``phones``, ``cluster``: SIP peers and the ``midregistrar``
  process on loopback, alone or several sharing one etcd; ``scenarios/`` holds the SIPp scenarios and
  ``main_registrar.cfg`` the Kamailio main registrar.
- ``flood``: one flooding host (UDP datagrams from one source address at a fixed rate), as a process.
- ``controlplane``, ``helm``, ``node``, ``e2e``: a Kubernetes control plane on loopback, the helm binary, a real
  node in a network namespace, and what the end-to-end tests on that node share.
- ``netpol``: kube-network-policies on that node, so that it enforces NetworkPolicies.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
