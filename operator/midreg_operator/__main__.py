"""`midregistrar-operator`: run the kopf operator with the project's settings.

    midregistrar-operator [--namespace NS ...] [--liveness http://0.0.0.0:8080/healthz] [--log-format json]

Without --namespace it watches the whole cluster (its RBAC must then be a ClusterRole).
"""

from __future__ import annotations

import argparse
import asyncio
import os

import kopf


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from . import handlers  # noqa: F401  (registers the handlers)

    log_format = {
        "json": kopf.LogFormat.JSON,
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
    }[args.log_format]
    kopf.configure(verbose=args.verbose, log_format=log_format)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=tuple(args.namespace),
            liveness_endpoint=args.liveness or None,
        )
    )


if __name__ == "__main__":
    main()
