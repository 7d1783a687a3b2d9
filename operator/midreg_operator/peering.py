"""Active/standby operators through kopf peering: the options of `midregistrar-operator` and the settings
they turn into.

kopf has no leader election. Operators that share a peering object (a ClusterKopfPeering when watching the
whole cluster, a KopfPeering in each watched namespace otherwise) publish keep-alives there; an operator
pauses while a live peer has a HIGHER priority, and peers of EQUAL priority all pause (kopf cannot tell
which of them should act). So every replica needs its own priority: `--priority-from-env POD_NAME` hashes
the pod's name (downward API) into [1, 2**31), distinct for two pods with probability 1 - 2**-31 per pair,
stable for the pod's life and needing no configuration. The highest live priority acts; the others wait
and take over once its keep-alive is older than the peering lifetime (at once when it exits cleanly, as
it then withdraws its record).
"""

from __future__ import annotations

import argparse
import hashlib
import os

import kopf

PRIORITY_RANGE = 2**31 - 1  # hashed priorities fall in [1, 2**31); --priority above that outranks them all


def priority_from_name(name: str) -> int:
    """A stable priority in [1, 2**31) derived from a pod name (sha256: no per-process hash seed)."""
    digest = hashlib.sha256(name.encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % PRIORITY_RANGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peering (active/standby replicas; off by default: standalone)")
    g.add_argument(
        "--peering",
        metavar="NAME",
        default=os.environ.get("MIDREG_OPERATOR_PEERING") or None,
        help="join the kopf peering object NAME (mandatory: the operator fails if it is missing)",
    )
    prio = g.add_mutually_exclusive_group()
    prio.add_argument("--priority", type=int, default=None, help="this operator's peering priority")
    prio.add_argument(
        "--priority-from-env",
        metavar="VAR",
        default=None,
        help="derive a distinct, stable priority from the value of $VAR (e.g. POD_NAME)",
    )
    g.add_argument(
        "--peering-lifetime",
        type=int,
        default=int(os.environ.get("MIDREG_OPERATOR_PEERING_LIFETIME", "60")),
        help="seconds a keep-alive counts (standby take-over delay after a crash; default 60)",
    )


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the peering options and fill `args.priority` (None when standalone)."""
    if args.peering_lifetime < 2:
        p.error("--peering-lifetime must be at least 2 seconds")
    if args.priority_from_env is not None:
        value = os.environ.get(args.priority_from_env, "")
        if not value:
            p.error(f"--priority-from-env: ${args.priority_from_env} is unset or empty")
        args.priority = priority_from_name(value)
    if args.peering is None and args.priority is not None:
        p.error("--priority/--priority-from-env need --peering")
    if args.peering is not None and args.priority is None:
        p.error("--peering needs --priority or --priority-from-env (equal priorities pause every operator)")


def settings(args: argparse.Namespace) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.peering.lifetime = args.peering_lifetime
    # Keep-alives are logged at debug level only; pauses and resumes are always logged.
    s.peering.stealth = True
    return s
