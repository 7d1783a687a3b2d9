"""The ``midregistrar`` command (DESIGN.md §8).

Every :class:`~registrar.config.Settings` field is an option (``--min-expires``), an environment variable
(``MIDREG_MIN_EXPIRES``) and a key of the ``--config`` YAML file, options winning. A bad value exits 2 with
one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from registrar.config import ConfigError, Settings, build_settings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="midregistrar", description="Kubernetes-native SIP mid-registrar.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("version", help="print the version")
    run = sub.add_parser(
        "run",
        help="run the mid-registrar",
        description="Run the mid-registrar. Every option can also come from MIDREG_<OPTION> or --config.",
    )
    run.add_argument("--config", help="YAML file with settings (keys as option names)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or f"default: {_default_text(field.default, field.default_factory)}"
        if _is_bool(field.annotation):
            run.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif _is_list(field.annotation):
            run.add_argument(flag, dest=name, action="append", default=None, metavar="VALUE", help=help_text)
        else:
            run.add_argument(flag, dest=name, default=None, metavar="VALUE", help=help_text)
    return parser


def _default_text(default: Any, factory: Any) -> str:
    if factory is not None:
        value = factory()
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if hasattr(default, "value"):
        return str(default.value)
    return str(default)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def package_version() -> str:
    try:
        return version("kube-midregistrar")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(package_version())
        return 0
    options = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = build_settings(options, config_file=args.config)
        if settings.main_registrar is None:
            raise ConfigError("invalid main-registrar: a main registrar SIP URI is required")
        if settings.store.value == "etcd":
            raise ConfigError("invalid store: the etcd store is not available in this version")
    except ConfigError as exc:
        print(f"midregistrar: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings)
    _run(settings)
    return 0


def _run(settings: Settings) -> None:
    from registrar.app import run

    loop_module: types.ModuleType | None
    try:
        import uvloop

        loop_module = uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_module = None
    if loop_module is not None:
        loop_module.run(run(settings))
    else:
        asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
