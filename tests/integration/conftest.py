"""Integration tests: real processes on loopback. `sipkit` (this folder) is importable from the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sipkit  # noqa: E402


@pytest.fixture(scope="session")
def sip_tools() -> None:
    """SIPp and Kamailio on PATH (installed by scripts/install-sip-tools.sh when missing), else skip."""
    if not sipkit.ensure_sip_tools():
        pytest.skip("sipp/kamailio unavailable and could not be installed (run `make sip-tools`)")
