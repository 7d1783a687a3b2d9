"""Short fault runs (tests/faults/faults.py) under steady SIPp load through three registrar processes sharing a
three-member etcd cluster, Kamailio as main, each checked by the history checker (tests/faults/history.py).
The long runs, with more phones, are `python -m tests.faults.run` in `make bench`.

Goals checked here: every property of the checker holds (no binding lost, no duplicate at main, no De-REGISTER
of a live binding, exactly one for each expired one, no other user's binding in a 200), and REGISTERs fail only
while etcd itself cannot answer (quorum lost, or this process cut from all of it): a fault that leaves a
quorum reachable costs no failed REGISTER (random packet loss only what the loss itself explains).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.faults import FAULTS, run
from tests.faults.rig import RigConfig

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.usefixtures("fault_tools")]

# Faults during which a registrar may have to answer 503 (etcd cannot answer it), and for how long at most
# beyond the fault itself.
OUTAGE_ALLOWED = {"quorum-loss": 20.0, "cut-etcd": 10.0, "refuse-etcd": 10.0}
# A's phones lose the REGISTER in flight when A is killed (they move to B at once).
OUTAGE_ALLOWED |= {name: 4.0 for name in FAULTS if name.startswith("skew")}
SLACK = 6.0  # s: detection (etcd deadline 1 s, member TTL 2 s) and the phones' retry interval (3 s)
# Faults whose own packet loss may lose a REGISTER outright, and how many at most. A SIPp phone sends one at
# most four times in its 4 s (T1 500 ms); the registrar answers each copy, and a copy succeeds when it and its
# answer both pass: at 10 % each way, a REGISTER is lost with p = (1 - 0.9²)⁴ = 0.13 %, so about one run in
# eight loses one of the ~100 sent during the fault (30 phones, every 3 s, 10 s; CI saw it once). Three lost
# (p = 0.04 %) is the registrar's doing.
LOST_TO_THE_NETWORK = {"loss-10": 2}
LOST_OUTAGE = 7.0  # s: one REGISTER lost (the phone's 4-s timeout, then its 3-s pause before the next)

CASES = [(name, "contact") for name in FAULTS] + [
    (name, "aor")
    for name in ("kill-leader", "stop-leader", "quorum-loss", "cut-main", "cut-peers", "skew+30")
]


@pytest.mark.parametrize(("fault", "mode"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_fault_keeps_every_property(tmp_path: Path, fault: str, mode: str) -> None:
    report = run(tmp_path, FAULTS[fault], RigConfig(mode=mode, phones=10))
    info = report.describe()
    assert report.ok, info
    assert report.calls >= 30, f"every refreshing phone was called from main\n{info}"
    assert report.deregisters >= 12, f"every leaver's binding expired with a De-REGISTER\n{info}"
    allowed = OUTAGE_ALLOWED.get(fault)
    if fault in LOST_TO_THE_NETWORK:
        assert report.failed_registers <= LOST_TO_THE_NETWORK[fault], f"more than the loss explains\n{info}"
        assert report.longest_outage <= LOST_OUTAGE + SLACK, f"more than one lost in a row\n{info}"
    elif allowed is None:
        assert report.failed_registers == 0, f"a quorum stayed reachable: no REGISTER may fail\n{info}"
    else:
        assert report.longest_outage <= allowed + SLACK, info
    skew = FAULTS[fault].skew
    if skew:  # B's clock is off: every live process says by how much
        off = abs(float(next(iter(skew.values())).rstrip("s")))
        assert report.clock_skew and all(
            abs(seen - off) < 1.0 if off > 1 else seen < off + 1.0 for seen in report.clock_skew.values()
        ), info
