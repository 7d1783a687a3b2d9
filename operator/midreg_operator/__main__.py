"""`midregistrar-operator`: run the kopf operator with the project's settings.

    midregistrar-operator [--namespace NS ...] [--liveness http://0.0.0.0:8080/healthz] [--log-format json]
                          [--peering NAME (--priority N | --priority-from-env POD_NAME)]

Without --namespace it watches the whole cluster (its RBAC must then be a ClusterRole). Without --peering
it runs standalone (one replica); with it, replicas are active/standby (see peering.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os

import kopf

from . import peering


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="midregistrar-operator", description=__doc__.split("\n")[0])
    p.add_argument(
        "--namespace",
        action="append",
        default=[n for n in os.environ.get("MIDREG_OPERATOR_NAMESPACES", "").split(",") if n],
        help="watch only this namespace (repeat for several; default: the whole cluster)",
    )
    p.add_argument(
        "--liveness",
        default=os.environ.get("MIDREG_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL ('' to disable)",
    )
    p.add_argument(
        "--log-format",
        choices=["json", "plain", "full"],
        default=os.environ.get("MIDREG_OPERATOR_LOG_FORMAT", "json"),
    )
    p.add_argument("--verbose", action="store_true", default=os.environ.get("MIDREG_OPERATOR_VERBOSE") == "1")
    peering.add_arguments(p)
    args = p.parse_args(argv)
    peering.resolve(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from . import handlers  # noqa: F401  (registers the handlers)

    log_format = {
        "json": kopf.LogFormat.JSON,
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
    }[args.log_format]
    # log_prefix=None: as `kopf run`, "[namespace/name]" before per-object messages in the text formats (JSON
    # carries the object in its "object" field).
    kopf.configure(verbose=args.verbose, log_format=log_format, log_prefix=None)
    asyncio.run(
        kopf.operator(
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=args.priority,
            settings=peering.settings(args),
            clusterwide=not args.namespace,
            namespaces=tuple(args.namespace),
            liveness_endpoint=args.liveness or None,
        )
    )


if __name__ == "__main__":
    main()
