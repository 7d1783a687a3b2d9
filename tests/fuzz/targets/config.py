"""The config loader, from YAML text, as ``midregistrar run --config FILE`` loads it (registrar/cli.py): the
file is read and merged by ``build_settings``, which may raise only ConfigError (a one-line reason; the CLI
exits 2 with it). Settings it accepts must write back (``to_yaml``) into a file that loads to equal settings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from registrar.config import ConfigError, build_settings
from tests.fuzz.harness import Target

_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
_PATH = _DIR / f"midreg-fuzz-config-{os.getpid()}.yaml"


def load(text: bytes) -> object:
    _PATH.write_bytes(text)
    return build_settings({}, environ={}, config_file=_PATH)


def run(data: bytes) -> None:
    settings = load(data)
    again = load(settings.to_yaml().encode())  # type: ignore[attr-defined]
    assert again == settings, (again, settings)


# PyYAML reads about 2.5 µs a byte (pure Python): a 60 KB file takes 150 ms, in linear time. A settings file
# is a few hundred bytes, written by the operator or by hand, read once at start: 16 KB is plenty.
TARGET = Target("config", run, (ConfigError,), __doc__ or "", max_len=16384)
