"""Integration tests: real processes on loopback, run with tests/support."""

from __future__ import annotations

import pytest

from tests.support.sipp import ensure_sip_tools


@pytest.fixture(scope="session")
def sip_tools() -> None:
    """SIPp and Kamailio on PATH (installed by scripts/install-sip-tools.sh when missing), else skip."""
    if not ensure_sip_tools():
        pytest.skip("sipp/kamailio unavailable and could not be installed (run `make sip-tools`)")
