"""Fault runs: real etcd members, Kamailio, registrar processes and SIPp inside a network namespace of the test's
own (root), with Debian's libfaketime for the clock-skew runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.faults import FAKETIME_LIB
from tests.support.etcd import INSTALL_HINT, find_etcd_binary
from tests.support.netns import available
from tests.support.sipp import ensure_sip_tools


@pytest.fixture(scope="session")
def fault_tools() -> None:
    """SIPp, Kamailio and libfaketime (installed by scripts/install-sip-tools.sh), etcd, root; else skip."""
    why = available()
    if why:
        pytest.skip(why)
    if not ensure_sip_tools() or not Path(FAKETIME_LIB).exists():
        pytest.skip("sipp/kamailio/libfaketime unavailable (run `make sip-tools`)")
    if not find_etcd_binary():
        pytest.skip(f"etcd not installed: {INSTALL_HINT}")
